using System.Collections.Concurrent;
using System.Text.Json;
using LoraDeploy.Data;
using LoraDeploy.Workers;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Inference;

/// <summary>A worker chosen for one request, held until the answer is streamed; disposing releases its slot.</summary>
public sealed class WorkerLease(RoutedWorker worker, Action release) : IDisposable
{
    private int _released;

    public RoutedWorker Worker { get; } = worker;

    /// <summary>True when the worker already held every adapter of the request (an affinity hit).</summary>
    public required bool Resident { get; init; }

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _released, 1) == 0)
        {
            release();
        }
    }
}

public sealed record RoutedWorker(string Id, string Url, string CallKey, int Slots, IReadOnlySet<string> Resident);

public enum RouteRefusal
{
    /// <summary>The pool has more outstanding requests than Workers:MaxOutstandingPerPool: 429.</summary>
    RateLimited,
    /// <summary>No live worker serves the pool: 503.</summary>
    NoWorker,
}

/// <summary>
/// Picks the worker for each request, the way serving.md § C6 says: a worker that already holds the request's adapters
/// and has a free slot; else, after a short bounded wait for such a holder, any worker with a free slot; else the least
/// loaded. Workers come from the database (every replica sees every worker); slots in use are this replica's own count
/// (plus what the worker last reported), and so is the per-pool limit of outstanding requests.
/// </summary>
public sealed class InferenceRouter(
    IDbContextFactory<LoraDeployDbContext> contexts,
    IOptions<WorkersOptions> options,
    InferenceMetrics metrics,
    TimeProvider time)
{
    private static readonly TimeSpan HolderPoll = TimeSpan.FromMilliseconds(25);
    private readonly ConcurrentDictionary<string, int> _outstanding = new(StringComparer.Ordinal);
    private readonly ConcurrentDictionary<string, int> _inFlight = new(StringComparer.Ordinal);
    private volatile WorkersSnapshot? _snapshot;

    public int Outstanding(string pool) => _outstanding.GetValueOrDefault(pool);

    public IEnumerable<KeyValuePair<string, int>> OutstandingByPool => _outstanding;

    public async Task<(WorkerLease? Lease, RouteRefusal? Refusal)> AcquireAsync(string pool, IReadOnlyList<string> adapters, CancellationToken ct)
    {
        if (_outstanding.AddOrUpdate(pool, 1, (_, n) => n + 1) > options.Value.MaxOutstandingPerPool)
        {
            Release(_outstanding, pool);
            return (null, RouteRefusal.RateLimited);
        }
        var keepOutstanding = false;
        try
        {
            var waitUntil = time.GetUtcNow() + TimeSpan.FromMilliseconds(options.Value.HolderWaitMilliseconds);
            while (true)
            {
                var workers = await LiveWorkersAsync(pool, ct);
                if (workers.Count == 0)
                {
                    return (null, RouteRefusal.NoWorker);
                }
                var keys = adapters.Select(sha => $"{pool}|{sha}").ToList();
                bool Holds(RoutedWorker w) => keys.All(w.Resident.Contains);
                if (options.Value.Routing == "random")
                {
                    workers = [workers[Random.Shared.Next(workers.Count)]];
                }
                bool Free(RoutedWorker w) => _inFlight.GetValueOrDefault(w.Id) < w.Slots;

                var holders = workers.Where(Holds).ToList();
                var choice = holders.Where(Free).OrderBy(Load).FirstOrDefault();
                // Waiting is for a worker that holds the adapters; without adapters every worker is as good as another.
                if (choice is null && adapters.Count > 0 && holders.Count > 0 && time.GetUtcNow() < waitUntil)
                {
                    await Task.Delay(HolderPoll, time, ct); // a holder is busy: its slot usually frees sooner than a load
                    continue;
                }
                choice ??= workers.Where(Free).OrderBy(Load).FirstOrDefault() ?? workers.OrderBy(Load).First();
                var resident = Holds(choice);
                metrics.Routed(pool, resident);
                _inFlight.AddOrUpdate(choice.Id, 1, (_, n) => n + 1);
                keepOutstanding = true;
                var id = choice.Id;
                return (new WorkerLease(choice, () =>
                {
                    Release(_inFlight, id);
                    Release(_outstanding, pool);
                }) { Resident = resident }, null);
            }
        }
        finally
        {
            if (!keepOutstanding)
            {
                Release(_outstanding, pool);
            }
        }
    }

    private double Load(RoutedWorker w) => (double)_inFlight.GetValueOrDefault(w.Id) / w.Slots;

    private async Task<List<RoutedWorker>> LiveWorkersAsync(string pool, CancellationToken ct)
    {
        var now = time.GetUtcNow();
        var reuseFor = TimeSpan.FromMilliseconds(options.Value.RouterSnapshotMilliseconds);
        if (_snapshot is { } kept && now - kept.ReadAt < reuseFor && Of(kept) is { Count: > 0 } fromSnapshot)
        {
            return fromSnapshot;
        }
        // No worker of the pool in the kept read is worth a fresh look: one may have registered since.
        var snapshot = new WorkersSnapshot(now, await ReadLiveWorkersAsync(now, ct));
        _snapshot = snapshot;
        return Of(snapshot);

        List<RoutedWorker> Of(WorkersSnapshot s) => s.Workers.Where(w => w.Pools.Contains(pool)).Select(w => w.Worker).ToList();
    }

    /// <summary>A worker registered, left or changed what it holds through this replica: the next request reads the table again.</summary>
    public void Forget() => _snapshot = null;

    private async Task<List<(IReadOnlyList<string> Pools, RoutedWorker Worker)>> ReadLiveWorkersAsync(DateTimeOffset now, CancellationToken ct)
    {
        var alive = now.UtcDateTime - TimeSpan.FromSeconds(options.Value.TimeoutSeconds);
        await using var db = await contexts.CreateDbContextAsync(ct);
        var rows = await db.Workers
            .Where(w => w.LastHeartbeatAt >= alive)
            .Select(w => new { w.Id, w.Url, w.CallKey, w.Slots, w.PoolsJson, w.ResidentJson })
            .ToListAsync(ct);
        return rows
            .Select(w => ((IReadOnlyList<string>)(JsonSerializer.Deserialize(w.PoolsJson, ApiJson.Context.ListString) ?? []),
                new RoutedWorker(w.Id, w.Url, w.CallKey, Math.Max(1, w.Slots),
                    (JsonSerializer.Deserialize(w.ResidentJson, ApiJson.Context.ListString) ?? []).ToHashSet(StringComparer.Ordinal))))
            .ToList();
    }

    /// <summary>One read of the live workers, kept for <see cref="WorkersOptions.RouterSnapshotMilliseconds"/>.</summary>
    private sealed record WorkersSnapshot(DateTimeOffset ReadAt, List<(IReadOnlyList<string> Pools, RoutedWorker Worker)> Workers);

    private static void Release(ConcurrentDictionary<string, int> counts, string key) => counts.AddOrUpdate(key, 0, (_, n) => Math.Max(0, n - 1));
}
