using System.Net;

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
        await using var replicas = await PostgresReplicas.StartAsync(new Dictionary<string, string?>
        {
            ["RateLimits:RequestsPerMinute"] = Limit.ToString(System.Globalization.CultureInfo.InvariantCulture),
        });
        var token = await replicas.CreateTokenAsync("alice");
        using var onA = replicas.A.CreateClient(token);
        using var onB = replicas.B.CreateClient(token);

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
}
