using System.Net;
using LoraDeploy.Tests.Pipeline;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Quotas;

/// <summary>
/// Two <c>loradeploy serve</c> processes on one PostgreSQL database: parallel creates split over both cannot together
/// overshoot a user's quota, because the count and the insert are serialised on the user's row, not in a process.
/// </summary>
public sealed class QuotaReplicaTests
{
    [Fact]
    public async Task Twenty_parallel_creates_over_two_replicas_with_max_deploys_5_accept_exactly_5()
    {
        await using var replicas = await PostgresReplicas.StartAsync(new Dictionary<string, string?> { ["Quotas:MaxDeploys"] = "5" });
        var token = await replicas.CreateTokenAsync("alice");
        using var onA = replicas.A.CreateClient(token);
        using var onB = replicas.B.CreateClient(token);

        var responses = await Task.WhenAll(Enumerable.Range(0, 20).Select(i =>
            (i % 2 == 0 ? onA : onB).PostJsonAsync("/v1/lora/create",
                PipelineHarness.CreateBody($"parallel-{i}", $"https://civitai.com/models/1?modelVersionId={i + 1}"))));

        var statuses = responses.Select(r => r.StatusCode).ToList();
        Assert.True(statuses.Count(s => s == HttpStatusCode.OK) == 5, string.Join(", ", statuses));
        Assert.Equal(15, statuses.Count(s => s == HttpStatusCode.Forbidden));
        await using var db = replicas.OpenDatabase();
        Assert.Equal(5, await db.Deploys.CountAsync(TestContext.Current.CancellationToken));
        var quota = await (await onB.GetAsync("/v1/me/quota")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(5, quota.GetProperty("deploys").GetInt32());
    }
}
