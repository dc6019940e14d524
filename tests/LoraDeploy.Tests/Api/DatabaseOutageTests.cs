using System.Data.Common;
using System.Net;
using LoraDeploy.Data;
using Microsoft.AspNetCore.Builder;
using Microsoft.EntityFrameworkCore;
using Microsoft.EntityFrameworkCore.Diagnostics;

namespace LoraDeploy.Tests.Api;

/// <summary>
/// A database that cannot be reached or written is an outage the client should wait out (503 with
/// <c>Retry-After</c>), not a server bug (500); <c>/ready</c> says so too (issue 16, findings 18 and 20).
/// </summary>
public sealed class DatabaseOutageTests
{
    private static readonly Dictionary<string, string?> PipelineOff = new() { ["Pipeline:Enabled"] = "false" };

    [Fact]
    public async Task Postgres_that_cannot_be_reached_answers_503_with_Retry_After()
    {
        // Nothing listens on the port: what a stopped PostgreSQL looks like to the server.
        await using var server = await LoraDeployServer.StartAsync(settings: new Dictionary<string, string?>
        {
            ["Pipeline:Enabled"] = "false",
            ["Database:Provider"] = "postgres",
            ["ConnectionStrings:Postgres"] = $"Host=127.0.0.1;Port={ServerProcess.FreePort()};Username=u;Password=p;Database=d;Timeout=5",
            ["Database:MigrateAtStart"] = "false",
        });
        using var client = server.CreateClient("ld_abcdefghijkl_" + new string('a', 43));

        await AssertUnavailableAsync(await client.GetAsync("/deploy/list"));
        await AssertUnavailableAsync(await client.PostAsync("/v1/lora/create", HttpAssertions.Json(CreateBody)));
        await AssertUnavailableAsync(await client.GetAsync("/ready"), error: false);
    }

    [Fact]
    public async Task Sqlite_that_cannot_be_written_answers_503_and_ready_says_so()
    {
        // PRAGMA query_only makes SQLite refuse writes as a read-only file does, even for root (chmod does not stop root).
        var readOnly = new QueryOnlySwitch();
        await using var server = await LoraDeployServer.StartAsync(settings: PipelineOff, configure: builder =>
            builder.Services.ConfigureDbContext<SqliteLoraDeployContext>(db => db.AddInterceptors(readOnly)));
        var token = await server.CreateTokenAsync("alice");
        using var client = server.CreateClient(token);
        (await client.GetAsync("/ready")).EnsureSuccessStatusCode();
        (await client.PostAsync("/v1/lora/create", HttpAssertions.Json(CreateBody))).EnsureSuccessStatusCode();

        readOnly.On = true;
        Microsoft.Data.Sqlite.SqliteConnection.ClearAllPools(); // connections opened from here on are read-only

        await AssertUnavailableAsync(await client.GetAsync("/ready"), error: false);
        await AssertUnavailableAsync(await client.PostAsync("/v1/lora/create",
            HttpAssertions.Json(new { lora_name = "second", base_model = "black-forest-labs/FLUX-1-dev", source = new { type = "civitai", civit_url = "https://civitai.com/models/1102?modelVersionId=1002" }, @private = true })));
        await AssertUnavailableAsync(await client.DeleteAsync("/v1/lora/first"));
        // Reads still work: only writes are refused.
        (await client.GetAsync("/deploy/list")).EnsureSuccessStatusCode();
    }

    [Fact]
    public async Task Ready_says_the_database_disk_is_full_when_free_space_is_below_the_minimum()
    {
        // No test can fill a real disk; a minimum above any disk's size stands in for one with no room left.
        await using var server = await LoraDeployServer.StartAsync(settings: new Dictionary<string, string?>
        {
            ["Pipeline:Enabled"] = "false",
            ["Health:MinFreeBytes"] = long.MaxValue.ToString(System.Globalization.CultureInfo.InvariantCulture),
        });
        using var client = server.CreateClient("unused");

        var ready = await client.GetAsync("/ready");

        Assert.Equal(HttpStatusCode.ServiceUnavailable, ready.StatusCode);
        Assert.NotNull(ready.Headers.RetryAfter);
        Assert.StartsWith("database disk full (", (await ready.ExpectAsync(HttpStatusCode.ServiceUnavailable)).GetProperty("status").GetString());
    }

    private static readonly object CreateBody = new
    {
        lora_name = "first",
        base_model = "black-forest-labs/FLUX-1-dev",
        source = new { type = "civitai", civit_url = "https://civitai.com/models/1102?modelVersionId=1002" },
        @private = true,
    };

    private static async Task AssertUnavailableAsync(HttpResponseMessage response, bool error = true)
    {
        var body = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == HttpStatusCode.ServiceUnavailable, $"Expected 503, got {(int)response.StatusCode}: {body}");
        Assert.True(response.Headers.RetryAfter?.Delta > TimeSpan.Zero, $"no Retry-After on {response.RequestMessage?.RequestUri}");
        Assert.Contains("database unavailable", body);
        if (error)
        {
            Assert.StartsWith("database unavailable", (await response.ExpectErrorAsync(HttpStatusCode.ServiceUnavailable)));
        }
    }

    /// <summary>Turns every SQLite connection EF opens read-only (<c>PRAGMA query_only</c>) once switched on.</summary>
    private sealed class QueryOnlySwitch : DbConnectionInterceptor
    {
        public volatile bool On;

        public override void ConnectionOpened(DbConnection connection, ConnectionEndEventData eventData) => Apply(connection);

        public override Task ConnectionOpenedAsync(DbConnection connection, ConnectionEndEventData eventData, CancellationToken cancellationToken = default)
        {
            Apply(connection);
            return Task.CompletedTask;
        }

        private void Apply(DbConnection connection)
        {
            using var command = connection.CreateCommand();
            command.CommandText = On ? "PRAGMA query_only = ON" : "PRAGMA query_only = OFF";
            command.ExecuteNonQuery();
        }
    }
}
