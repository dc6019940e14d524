using System.Net;
using LoraDeploy.Auth;
using LoraDeploy.Data;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.RateLimits;

/// <summary>
/// Two <c>loradeploy serve</c> processes on one PostgreSQL database spend from one budget per user: the limit is a
/// row in the database, not a counter in either process.
/// </summary>
public sealed class RateLimitReplicaTests
{
    private const int Limit = 6;

    [Fact]
    public async Task Requests_spread_over_two_replicas_share_one_budget_the_next_on_either_is_429()
    {
        var connectionString = await TestBackend.CreatePostgresDatabaseAsync(); // first: without PostgreSQL this skips
        var root = Path.Combine(Path.GetTempPath(), "loradeploy-tests", Guid.NewGuid().ToString("N"));
        var settings = new Dictionary<string, string?>
        {
            ["Database:Provider"] = "postgres",
            ["ConnectionStrings:Postgres"] = connectionString,
            ["Pipeline:Enabled"] = "false",
            ["Storage:Path"] = Path.Combine(root, "blobs"),
            ["Logging:LogLevel:Default"] = "Warning",
            ["RateLimits:RequestsPerMinute"] = Limit.ToString(System.Globalization.CultureInfo.InvariantCulture),
        };
        var dirs = new[] { Path.Combine(root, "a"), Path.Combine(root, "b") };
        foreach (var dir in dirs)
        {
            Directory.CreateDirectory(dir);
        }
        var starts = dirs.Select(dir => ServerProcess.StartAsync(dir, settings)).ToArray();
        try
        {
            await Task.WhenAll(starts);
            var (a, b) = (await starts[0], await starts[1]);
            var token = await CreateTokenAsync(connectionString, "alice");
            using var onA = a.CreateClient(token);
            using var onB = b.CreateClient(token);

            // The processes run on the real clock: start early in a minute so the whole test stays in one window.
            var intoMinute = TimeSpan.FromMilliseconds(DateTimeOffset.UtcNow.ToUnixTimeMilliseconds() % 60_000);
            if (intoMinute > TimeSpan.FromSeconds(40))
            {
                await Task.Delay(TimeSpan.FromSeconds(60) - intoMinute + TimeSpan.FromMilliseconds(200));
            }
            await Task.WhenAll(Enumerable.Range(0, Limit).Select(async i =>
            {
                var response = await (i % 2 == 0 ? onA : onB).GetAsync("/deploy/list");
                Assert.True(response.StatusCode == HttpStatusCode.OK, $"request {i + 1} of {Limit}: {(int)response.StatusCode}");
            }));
            foreach (var client in new[] { onA, onB })
            {
                var refused = await client.GetAsync("/deploy/list");
                await refused.ExpectErrorAsync(HttpStatusCode.TooManyRequests);
                Assert.InRange(refused.Headers.RetryAfter?.Delta ?? TimeSpan.Zero, TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(60));
            }
            var limits = await (await onB.GetAsync("/v1/me/rate_limit")).ExpectAsync(HttpStatusCode.OK);
            Assert.Equal(0, limits.GetProperty("remaining").GetInt32());
        }
        finally
        {
            foreach (var start in starts.Where(s => s.IsCompletedSuccessfully))
            {
                await (await start).DisposeAsync();
            }
            await TestBackend.DropPostgresDatabaseAsync(connectionString);
            try
            {
                Directory.Delete(root, recursive: true);
            }
            catch (IOException)
            {
            }
        }
    }

    private static async Task<string> CreateTokenAsync(string connectionString, string user)
    {
        var options = new DbContextOptionsBuilder<PostgresLoraDeployContext>();
        DatabaseExtensions.ConfigurePostgres(options, connectionString);
        await using var db = new PostgresLoraDeployContext(options.Options);
        return await ApiTokens.CreateForUserAsync(db, user, isAdmin: false, "test", DateTime.UtcNow, CancellationToken.None);
    }
}
