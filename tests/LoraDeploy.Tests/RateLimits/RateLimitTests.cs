using System.Net;
using System.Text.Json;
using LoraDeploy.Data;
using Data = LoraDeploy.Data;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Time.Testing;

namespace LoraDeploy.Tests.RateLimits;

/// <summary>
/// The management routes' per-user request budget on the real host over SQLite, with the host's clock replaced by a
/// fake one so a test can stand 10 s into a minute and step over the window's end.
/// </summary>
public sealed class RateLimitTests
{
    private const int Limit = 5;

    // 10 s into a clock minute: the window ends in 50 s, whatever the real time is.
    private static FakeTimeProvider TenSecondsIntoAMinute()
    {
        var now = DateTimeOffset.UtcNow;
        return new FakeTimeProvider(new DateTimeOffset(now.Year, now.Month, now.Day, now.Hour, now.Minute, 10, TimeSpan.Zero));
    }

    private static Task<LoraDeployServer> StartAsync(FakeTimeProvider time, Dictionary<string, string?>? extra = null, TestDatabase database = TestDatabase.Sqlite)
    {
        var settings = new Dictionary<string, string?>
        {
            ["Pipeline:Enabled"] = "false",
            ["RateLimits:RequestsPerMinute"] = Limit.ToString(System.Globalization.CultureInfo.InvariantCulture),
        };
        foreach (var (key, value) in extra ?? [])
        {
            settings[key] = value;
        }
        return LoraDeployServer.StartAsync(database, settings: settings, configure: builder => builder.Services.AddSingleton<TimeProvider>(time));
    }

    private static async Task<string> DeployIdAsync(LoraDeployServer server, string userName)
    {
        // GET /deploy/{id} needs a deploy of the user's; a row is enough for the read.
        return await server.QueryAsync(async db =>
        {
            var userId = await db.Users.Where(u => u.Name == userName).Select(u => u.Id).SingleAsync();
            var now = DateTime.UtcNow;
            var lora = new Data.Lora
            {
                UserId = userId, Name = "rl", BaseModel = "SDXL 1.0", SourceType = "civitai", SourceUrl = "https://civitai.com/models/1",
                CreatedAt = now, UpdatedAt = now,
            };
            db.Loras.Add(lora);
            await db.SaveChangesAsync();
            var deploy = new Deploy
            {
                Id = "d" + Guid.NewGuid().ToString("N")[..20], UserId = userId, LoraId = lora.Id, ModelName = $"{userName}/rl",
                Type = "lora", Task = "text-to-image", Status = DeployStatus.Stopped, CreatedAt = now, UpdatedAt = now,
            };
            db.Deploys.Add(deploy);
            await db.SaveChangesAsync();
            return deploy.Id;
        });
    }

    [Fact]
    public async Task The_Nth_request_of_a_minute_passes_the_next_is_429_with_Retry_After_and_the_next_minute_passes_again()
    {
        var time = TenSecondsIntoAMinute();
        await using var server = await StartAsync(time);
        var alice = await server.CreateUserAsync("alice");

        for (var i = 1; i <= Limit; i++)
        {
            var passed = await alice.Client.GetAsync("/deploy/list");
            Assert.True(passed.StatusCode == HttpStatusCode.OK, $"request {i} of {Limit}: {(int)passed.StatusCode}");
        }
        var refused = await alice.Client.GetAsync("/deploy/list");
        var message = await refused.ExpectErrorAsync(HttpStatusCode.TooManyRequests);
        Assert.StartsWith("Rate limited", message, StringComparison.Ordinal);
        Assert.Contains($"{Limit} requests per minute", message, StringComparison.Ordinal);
        Assert.Equal(TimeSpan.FromSeconds(50), refused.Headers.RetryAfter?.Delta);
        // Other management routes share the one budget.
        await (await alice.Client.GetAsync("/v1/me/tokens")).ExpectErrorAsync(HttpStatusCode.TooManyRequests);

        time.Advance(TimeSpan.FromSeconds(49.5));
        var stillRefused = await alice.Client.GetAsync("/deploy/list");
        await stillRefused.ExpectErrorAsync(HttpStatusCode.TooManyRequests);
        Assert.Equal(TimeSpan.FromSeconds(1), stillRefused.Headers.RetryAfter?.Delta); // half a second left: rounded up, never 0

        time.Advance(TimeSpan.FromSeconds(0.5));
        for (var i = 1; i <= Limit; i++)
        {
            (await alice.Client.GetAsync("/deploy/list")).EnsureSuccessStatusCode();
        }
        await (await alice.Client.GetAsync("/deploy/list")).ExpectErrorAsync(HttpStatusCode.TooManyRequests);
    }

    [Fact]
    public async Task GET_deploy_by_id_is_limited_and_one_users_exhaustion_does_not_limit_another()
    {
        var time = TenSecondsIntoAMinute();
        await using var server = await StartAsync(time);
        var alice = await server.CreateUserAsync("alice");
        var bob = await server.CreateUserAsync("bob");
        var deployId = await DeployIdAsync(server, alice.Name);

        for (var i = 0; i < Limit; i++)
        {
            (await alice.Client.GetAsync($"/deploy/{deployId}")).EnsureSuccessStatusCode();
        }
        await (await alice.Client.GetAsync($"/deploy/{deployId}")).ExpectErrorAsync(HttpStatusCode.TooManyRequests);

        for (var i = 0; i < Limit; i++)
        {
            (await bob.Client.GetAsync("/deploy/list")).EnsureSuccessStatusCode();
        }
        await (await bob.Client.GetAsync("/deploy/list")).ExpectErrorAsync(HttpStatusCode.TooManyRequests);
    }

    [Fact]
    public async Task A_per_user_override_gives_that_user_its_own_limit_names_matched_without_case()
    {
        var time = TenSecondsIntoAMinute();
        await using var server = await StartAsync(time, new()
        {
            ["RateLimits:Users:Batch-Bot:RequestsPerMinute"] = "8",
            ["RateLimits:Users:tight:RequestsPerMinute"] = "2",
        });
        using var batch = server.CreateClient(await server.CreateTokenAsync("batch-bot"));
        using var tight = server.CreateClient(await server.CreateTokenAsync("tight"));
        using var plain = server.CreateClient(await server.CreateTokenAsync("plain"));

        foreach (var (client, limit) in new[] { (batch, 8), (tight, 2), (plain, Limit) })
        {
            for (var i = 1; i <= limit; i++)
            {
                (await client.GetAsync("/v1/me/tokens")).EnsureSuccessStatusCode();
            }
            var message = await (await client.GetAsync("/v1/me/tokens")).ExpectErrorAsync(HttpStatusCode.TooManyRequests);
            Assert.Contains($"{limit} requests per minute", message, StringComparison.Ordinal);
        }
    }

    [Fact]
    public async Task Inference_health_and_the_rate_limit_route_itself_are_not_limited()
    {
        var time = TenSecondsIntoAMinute();
        await using var server = await StartAsync(time);
        var alice = await server.CreateUserAsync("alice");
        for (var i = 0; i < Limit; i++)
        {
            (await alice.Client.GetAsync("/deploy/list")).EnsureSuccessStatusCode();
        }
        await (await alice.Client.GetAsync("/deploy/list")).ExpectErrorAsync(HttpStatusCode.TooManyRequests);

        for (var i = 0; i < 3; i++)
        {
            var inference = await alice.Client.PostAsync("/v1/inference/deploy/no-such-deploy", HttpAssertions.Json(new { prompt = "x" }));
            Assert.NotEqual(HttpStatusCode.TooManyRequests, inference.StatusCode);
            Assert.Equal(HttpStatusCode.OK, (await alice.Client.GetAsync("/health")).StatusCode);
            var limits = await (await alice.Client.GetAsync("/v1/me/rate_limit")).ExpectAsync(HttpStatusCode.OK);
            Assert.Equal(0, limits.GetProperty("remaining").GetInt32());
        }
    }

    [Fact]
    public async Task Me_rate_limit_reports_the_inference_limit_no_tpm_limit_and_the_management_budget_without_spending_it()
    {
        var time = TenSecondsIntoAMinute();
        await using var server = await StartAsync(time, new() { ["Workers:MaxOutstandingPerPool"] = "7" });
        var alice = await server.CreateUserAsync("alice");

        var fresh = await (await alice.Client.GetAsync("/v1/me/rate_limit")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(
            """{"rate_limit":7,"tpm_rate_limit":0,"requests_per_minute":5,"remaining":5,"reset_seconds":50}""",
            JsonSerializer.Serialize(fresh));

        (await alice.Client.GetAsync("/deploy/list")).EnsureSuccessStatusCode();
        (await alice.Client.GetAsync("/deploy/list")).EnsureSuccessStatusCode();
        time.Advance(TimeSpan.FromSeconds(20.2));
        var used = await (await alice.Client.GetAsync("/v1/me/rate_limit")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(3, used.GetProperty("remaining").GetInt32());
        Assert.Equal(30, used.GetProperty("reset_seconds").GetInt32());

        time.Advance(TimeSpan.FromSeconds(30));
        var next = await (await alice.Client.GetAsync("/v1/me/rate_limit")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(5, next.GetProperty("remaining").GetInt32());
    }

    [Fact]
    public async Task On_SQLite_the_budget_is_counted_in_the_process_and_writes_nothing()
    {
        // Every commit would make every kept /deploy body stale (KeptReadsTests shows what that costs the polls).
        var time = TenSecondsIntoAMinute();
        await using var server = await StartAsync(time);
        var alice = await server.CreateUserAsync("alice");
        for (var i = 0; i < Limit; i++)
        {
            (await alice.Client.GetAsync("/deploy/list")).EnsureSuccessStatusCode();
        }
        await (await alice.Client.GetAsync("/deploy/list")).ExpectErrorAsync(HttpStatusCode.TooManyRequests);
        Assert.Equal(0, await server.QueryAsync(db => db.RateLimitWindows.CountAsync()));
    }

    [Fact]
    public async Task Disabled_limits_let_everything_through_and_report_no_management_budget()
    {
        var time = TenSecondsIntoAMinute();
        await using var server = await StartAsync(time, new() { ["RateLimits:Enabled"] = "false", ["RateLimits:RequestsPerMinute"] = "1" });
        var alice = await server.CreateUserAsync("alice");
        for (var i = 0; i < 10; i++)
        {
            (await alice.Client.GetAsync("/deploy/list")).EnsureSuccessStatusCode();
        }
        var limits = await (await alice.Client.GetAsync("/v1/me/rate_limit")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(JsonValueKind.Null, limits.GetProperty("requests_per_minute").ValueKind);
        Assert.Equal(JsonValueKind.Null, limits.GetProperty("remaining").ValueKind);
        Assert.Equal(0, await server.QueryAsync(db => db.RateLimitWindows.CountAsync()));
    }

    [Fact]
    public async Task Windows_older_than_the_last_minute_are_deleted_by_the_first_request_of_a_minute()
    {
        // The windows live in the database on PostgreSQL; SQLite (one replica) counts them in the process.
        var time = TenSecondsIntoAMinute();
        await using var server = await StartAsync(time, database: TestDatabase.Postgres);
        var alice = await server.CreateUserAsync("alice");
        var bob = await server.CreateUserAsync("bob");
        for (var minute = 0; minute < 4; minute++)
        {
            (await alice.Client.GetAsync("/deploy/list")).EnsureSuccessStatusCode();
            (await bob.Client.GetAsync("/deploy/list")).EnsureSuccessStatusCode();
            time.Advance(TimeSpan.FromMinutes(1));
        }
        (await alice.Client.GetAsync("/deploy/list")).EnsureSuccessStatusCode();

        var windows = await server.QueryAsync(db => db.RateLimitWindows.Select(w => w.Window).Distinct().OrderBy(w => w).ToListAsync());
        var current = time.GetUtcNow().ToUnixTimeSeconds() / 60;
        Assert.Equal([current - 1, current], windows);
    }

    [Fact]
    public async Task Permits_are_claimed_from_the_row_in_batches_of_a_sixteenth_of_what_is_left()
    {
        var time = TenSecondsIntoAMinute();
        await using var server = await StartAsync(time, new() { ["RateLimits:RequestsPerMinute"] = "160" }, TestDatabase.Postgres);
        var alice = await server.CreateUserAsync("alice");
        var userId = await server.QueryAsync(db => db.Users.Where(u => u.Name == alice.Name).Select(u => u.Id).SingleAsync());
        Task<int> ClaimedAsync() => server.QueryAsync(db => db.RateLimitWindows.Where(w => w.UserId == userId).Select(w => w.Count).SingleAsync());

        (await alice.Client.GetAsync("/deploy/list")).EnsureSuccessStatusCode();
        Assert.Equal(10, await ClaimedAsync()); // 160 / 16
        for (var i = 0; i < 9; i++)
        {
            (await alice.Client.GetAsync("/deploy/list")).EnsureSuccessStatusCode();
        }
        Assert.Equal(10, await ClaimedAsync()); // served from the batch: no write
        (await alice.Client.GetAsync("/deploy/list")).EnsureSuccessStatusCode();
        Assert.Equal(10 + 150 / 16, await ClaimedAsync());
    }

    [Fact]
    public async Task Many_concurrent_requests_let_exactly_the_limit_through()
    {
        var time = TenSecondsIntoAMinute();
        await using var server = await StartAsync(time, new() { ["RateLimits:RequestsPerMinute"] = "64" });
        var alice = await server.CreateUserAsync("alice");

        var statuses = await Task.WhenAll(Enumerable.Range(0, 100).Select(async _ => (await alice.Client.GetAsync("/deploy/list")).StatusCode));
        Assert.Equal(64, statuses.Count(s => s == HttpStatusCode.OK));
        Assert.Equal(36, statuses.Count(s => s == HttpStatusCode.TooManyRequests));
    }

    [Fact]
    public async Task An_override_out_of_range_stops_the_host_at_start_naming_the_setting()
    {
        var error = await Assert.ThrowsAnyAsync<Exception>(() => StartAsync(TenSecondsIntoAMinute(), new()
        {
            ["RateLimits:Users:bob:RequestsPerMinute"] = "0",
        }));
        Assert.Contains("RateLimits:Users:bob:RequestsPerMinute", error.Message, StringComparison.Ordinal);
    }
}
