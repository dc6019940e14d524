using LoraDeploy.Data;
using LoraDeploy.Inference;
using LoraDeploy.Workers;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;
using Microsoft.Extensions.Time.Testing;

namespace LoraDeploy.Tests.Serving;

/// <summary>
/// The router reads the workers table once per <see cref="WorkersOptions.RouterSnapshotMilliseconds"/> (the read per
/// request was what halved the gateway's throughput, docs/benchmarks.md), and reads again sooner when the kept read
/// has no worker for the pool or a worker registered, left or changed what it holds (<see cref="InferenceRouter.Forget"/>).
/// </summary>
public sealed class InferenceRouterSnapshotTests : IAsyncLifetime
{
    private LoraDeployServer _server = null!;
    private readonly FakeTimeProvider _time = new(new DateTimeOffset(2026, 12, 3, 6, 0, 0, TimeSpan.Zero));

    public async ValueTask InitializeAsync() => _server = await LoraDeployServer.StartAsync(settings: new Dictionary<string, string?> { ["Workers:Embedded"] = "false" });

    public async ValueTask DisposeAsync() => await _server.DisposeAsync();

    private InferenceRouter Router() => new(
        _server.Services.GetRequiredService<IDbContextFactory<LoraDeployDbContext>>(),
        Options.Create(new WorkersOptions { RouterSnapshotMilliseconds = 250 }),
        _server.Services.GetRequiredService<InferenceMetrics>(),
        _time);

    private Task ReplaceWorkersAsync(params (string Id, string Pool)[] workers) => _server.QueryAsync(async db =>
    {
        await db.Workers.ExecuteDeleteAsync();
        foreach (var (id, pool) in workers)
        {
            db.Workers.Add(new Worker
            {
                Id = id, Name = "gpu-box", Engine = "comfyui", PoolsJson = $"[\"{pool}\"]", Slots = 2, Url = $"http://{id}.invalid",
                Version = "test", CallKey = "key", RegisteredAt = _time.GetUtcNow().UtcDateTime, LastHeartbeatAt = _time.GetUtcNow().UtcDateTime,
            });
        }
        return await db.SaveChangesAsync();
    });

    private static async Task<string?> RouteAsync(InferenceRouter router, string pool)
    {
        var (lease, _) = await router.AcquireAsync(pool, [], CancellationToken.None);
        using (lease)
        {
            return lease?.Worker.Id;
        }
    }

    [Fact]
    public async Task One_read_serves_requests_for_the_snapshot_time_then_the_table_is_read_again()
    {
        var router = Router();
        await ReplaceWorkersAsync(("a", "pool-1"));
        Assert.Equal("a", await RouteAsync(router, "pool-1"));

        await ReplaceWorkersAsync(("b", "pool-1")); // behind the router's back: no Forget
        _time.Advance(TimeSpan.FromMilliseconds(200));
        Assert.Equal("a", await RouteAsync(router, "pool-1"));

        _time.Advance(TimeSpan.FromMilliseconds(60));
        Assert.Equal("b", await RouteAsync(router, "pool-1"));
    }

    [Fact]
    public async Task Forget_and_a_pool_missing_from_the_kept_read_both_read_the_table_at_once()
    {
        var router = Router();
        await ReplaceWorkersAsync(("a", "pool-1"));
        Assert.Equal("a", await RouteAsync(router, "pool-1"));

        // A worker of another pool registered since the read: that pool is not served from the kept read.
        await ReplaceWorkersAsync(("a", "pool-1"), ("c", "pool-2"));
        Assert.Equal("c", await RouteAsync(router, "pool-2"));

        await ReplaceWorkersAsync(("d", "pool-1"));
        router.Forget();
        Assert.Equal("d", await RouteAsync(router, "pool-1"));
    }
}
