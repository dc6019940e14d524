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

public sealed record RoutedWorker(string Id, string Url, string CallKey, int Slots, IReadOnlySet<string> Resident)
{
    /// <summary>The worker's inference endpoint, parsed once per read of the workers rather than once per request.</summary>
    public Uri InferUri { get; } = new(Url.TrimEnd('/') + WorkerProtocol.InferPath);

    /// <summary>The <c>Authorization</c> value the server calls this worker with.</summary>
    public string Authorization { get; } = "Bearer " + CallKey;
}

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
            string[] keys = adapters.Count == 0 ? [] : adapters.Select(sha => $"{pool}|{sha}").ToArray();
            while (true)
            {
                var workers = await LiveWorkersAsync(pool, ct);
                if (workers.Count == 0)
                {
                    return (null, RouteRefusal.NoWorker);
                }
                if (options.Value.Routing == "random")
                {
                    workers = [workers[Random.Shared.Next(workers.Count)]];
                }
                // One pass: the least loaded holder with a free slot, the least loaded worker with a free slot, and the
                // least loaded worker of all (the first of equals wins each).
                RoutedWorker? freeHolder = null, free = null, least = null;
                var anyHolder = false;
                foreach (var worker in workers)
                {
                    var holds = Holds(worker, keys);
                    anyHolder |= holds;
                    var isFree = _inFlight.GetValueOrDefault(worker.Id) < worker.Slots;
                    if (holds && isFree && (freeHolder is null || Load(worker) < Load(freeHolder)))
                    {
                        freeHolder = worker;
                    }
                    if (isFree && (free is null || Load(worker) < Load(free)))
                    {
                        free = worker;
                    }
                    if (least is null || Load(worker) < Load(least))
                    {
                        least = worker;
                    }
                }
                // Waiting is for a worker that holds the adapters; without adapters every worker is as good as another.
                if (freeHolder is null && keys.Length > 0 && anyHolder && time.GetUtcNow() < waitUntil)
                {
                    await Task.Delay(HolderPoll, time, ct); // a holder is busy: its slot usually frees sooner than a load
                    continue;
                }
                var choice = freeHolder ?? free ?? least!;
                var resident = Holds(choice, keys);
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

    private static bool Holds(RoutedWorker worker, string[] keys)
    {
        foreach (var key in keys)
        {
            if (!worker.Resident.Contains(key))
            {
                return false;
            }
        }
        return true;
    }

    private async Task<IReadOnlyList<RoutedWorker>> LiveWorkersAsync(string pool, CancellationToken ct)
    {
        var now = time.GetUtcNow();
        var reuseFor = TimeSpan.FromMilliseconds(options.Value.RouterSnapshotMilliseconds);
        if (_snapshot is { } kept && now - kept.ReadAt < reuseFor && kept.Of(pool) is { Count: > 0 } fromSnapshot)
        {
            return fromSnapshot;
        }
        // No worker of the pool in the kept read is worth a fresh look: one may have registered since.
        var snapshot = new WorkersSnapshot(now, await ReadLiveWorkersAsync(now, ct));
        _snapshot = snapshot;
        return snapshot.Of(pool);
    }

    /// <summary>A worker registered, left or changed what it holds through this replica: the next request reads the table again.</summary>
    public void Forget() => _snapshot = null;

    private async Task<Dictionary<string, List<RoutedWorker>>> ReadLiveWorkersAsync(DateTimeOffset now, CancellationToken ct)
    {
        var alive = now.UtcDateTime - TimeSpan.FromSeconds(options.Value.TimeoutSeconds);
        await using var db = await contexts.CreateDbContextAsync(ct);
        var rows = await db.Workers
            .Where(w => w.LastHeartbeatAt >= alive)
            .Select(w => new { w.Id, w.Url, w.CallKey, w.Slots, w.PoolsJson, w.ResidentJson })
            .ToListAsync(ct);
        var byPool = new Dictionary<string, List<RoutedWorker>>(StringComparer.Ordinal);
        foreach (var row in rows)
        {
            var worker = new RoutedWorker(row.Id, row.Url, row.CallKey, Math.Max(1, row.Slots),
                (JsonSerializer.Deserialize(row.ResidentJson, ApiJson.Context.ListString) ?? []).ToHashSet(StringComparer.Ordinal));
            foreach (var pool in JsonSerializer.Deserialize(row.PoolsJson, ApiJson.Context.ListString) ?? [])
            {
                if (!byPool.TryGetValue(pool, out var workers))
                {
                    byPool[pool] = workers = [];
                }
                workers.Add(worker);
            }
        }
        return byPool;
    }

    /// <summary>One read of the live workers by pool, kept for <see cref="WorkersOptions.RouterSnapshotMilliseconds"/>.</summary>
    private sealed record WorkersSnapshot(DateTimeOffset ReadAt, Dictionary<string, List<RoutedWorker>> ByPool)
    {
        public IReadOnlyList<RoutedWorker> Of(string pool) => ByPool.TryGetValue(pool, out var workers) ? workers : [];
    }

    private static void Release(ConcurrentDictionary<string, int> counts, string key) => counts.AddOrUpdate(key, 0, (_, n) => Math.Max(0, n - 1));
}
