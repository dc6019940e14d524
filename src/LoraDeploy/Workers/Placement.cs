using System.Text.Json;
using LoraDeploy.BaseModels;
using LoraDeploy.Data;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Workers;

/// <summary>
/// Keeps serving capacity matching what deploys ask for, from database state alone, so every replica can run it (each
/// pass is a handful of conditional statements; two replicas racing at worst place a copy the next pass removes):
/// <list type="bullet">
/// <item>workers silent for <see cref="WorkersOptions.TimeoutSeconds"/> are forgotten, and their instances with them;</item>
/// <item>every deploying/running deploy gets <c>min_instances</c> pinned instances on live workers of its pool
/// (least loaded first), and loses the extra ones when its settings shrink;</item>
/// <item><c>min_instances: 0</c> pins nothing: the first request loads the adapter on the worker it is routed to (its
/// LRU cache keeps it, later requests go there). Such a deploy is <c>running</c> while its pool has a live worker, with
/// <c>instances.running</c> = the workers that report it resident; with no worker it is <c>deploying</c>, 1 pending;</item>
/// <item>stopped, failed and deleted deploys lose their instances (their workers are told to drop the adapters);</item>
/// <item>an instance the engine refused fails its deploy with the engine's reason;</item>
/// <item>the deploy's status and counts mirror the instances: <c>running</c> once enough are ready, back to
/// <c>deploying</c> (with <c>pending</c>) when the pool loses them.</item>
/// </list>
/// Workers given something to load, unpin or drop are woken (<see cref="WorkerWaker"/>) so they heartbeat now rather
/// than at their next period.
/// </summary>
public sealed partial class Placement(
    IDbContextFactory<LoraDeployDbContext> contexts,
    BaseModelRegistry registry,
    WorkerWaker waker,
    IOptions<WorkersOptions> options,
    TimeProvider time,
    ILogger<Placement> logger) : BackgroundService
{
    /// <summary>How often a pass runs: well inside the heartbeat timeout, so a dead worker's deploys move within seconds.</summary>
    public static readonly TimeSpan Interval = TimeSpan.FromMilliseconds(500);

    // The same wake-up channel the pipeline uses: a pass right away when this process saw something change.
    private readonly Pipeline.PipelineSignal _wake = new();

    /// <summary>
    /// Runs a pass now rather than at the next interval: an import finished, a worker registered or reported an instance
    /// ready (or refused), a deploy was stopped, started or rescaled. Other replicas see the change at their next pass.
    /// </summary>
    public void Wake() => _wake.Wake();

    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        while (!stoppingToken.IsCancellationRequested)
        {
            try
            {
                await RunOnceAsync(stoppingToken);
            }
            catch (OperationCanceledException) when (stoppingToken.IsCancellationRequested)
            {
                break;
            }
            catch (Exception e)
            {
                logger.LogError(e, "Placement pass failed; retrying");
            }
            try
            {
                await _wake.WaitAsync(Interval, time, stoppingToken);
            }
            catch (OperationCanceledException)
            {
                break;
            }
        }
    }

    public async Task RunOnceAsync(CancellationToken ct)
    {
        await using var db = await contexts.CreateDbContextAsync(ct);
        var woken = new HashSet<string>(StringComparer.Ordinal);
        await PlaceAsync(db, woken, ct);
        if (woken.Count > 0)
        {
            var workers = await db.Workers.Where(w => woken.Contains(w.Id)).Select(w => new { w.Id, w.Url, w.CallKey }).ToListAsync(ct);
            waker.Wake(workers.Select(w => (w.Id, w.Url, w.CallKey)));
        }
    }

    /// <summary>One pass; <paramref name="woken"/> collects the workers whose assignments it changed.</summary>
    private async Task PlaceAsync(LoraDeployDbContext db, HashSet<string> woken, CancellationToken ct)
    {
        var now = time.GetUtcNow().UtcDateTime;
        var deadline = now - TimeSpan.FromSeconds(options.Value.TimeoutSeconds);

        var forgotten = await db.Workers.Where(w => w.LastHeartbeatAt < deadline).Select(w => w.Id).ToListAsync(ct);
        if (forgotten.Count > 0)
        {
            await db.Workers.Where(w => forgotten.Contains(w.Id) && w.LastHeartbeatAt < deadline).ExecuteDeleteAsync(ct);
            LogForgotten(string.Join(", ", forgotten), options.Value.TimeoutSeconds);
        }
        var orphaned = db.Instances
            .Where(i => !db.Deploys.Any(d => d.Id == i.DeployId && (d.Status == DeployStatus.Deploying || d.Status == DeployStatus.Running)));
        var dropping = await orphaned.Select(i => i.WorkerId).Distinct().ToListAsync(ct);
        if (dropping.Count > 0)
        {
            await orphaned.ExecuteDeleteAsync(ct);
            woken.UnionWith(dropping);
        }

        var deploys = await db.Deploys
            .Where(d => (d.Status == DeployStatus.Deploying || d.Status == DeployStatus.Running) && d.Lora!.AdapterSha256 != null)
            .Select(d => new { d.Id, d.Status, d.MinInstances, d.RunningInstances, d.PendingInstances, Pool = d.Lora!.BaseModel, Sha = d.Lora.AdapterSha256! })
            .ToListAsync(ct);
        if (deploys.Count == 0)
        {
            return;
        }
        var workers = (await db.Workers.Select(w => new { w.Id, w.PoolsJson, w.ResidentJson }).ToListAsync(ct))
            .Select(w => (w.Id, Pools: JsonSerializer.Deserialize(w.PoolsJson, ApiJson.Context.ListString) ?? [],
                Resident: JsonSerializer.Deserialize(w.ResidentJson, ApiJson.Context.ListString) ?? []))
            .ToList();
        var instances = await db.Instances.Select(i => new { i.Id, i.DeployId, i.WorkerId, i.AdapterSha256, i.State, i.FailReason, i.Since }).ToListAsync(ct);
        var perWorker = instances.GroupBy(i => i.WorkerId).ToDictionary(g => g.Key, g => g.Count());
        // Adapters pinned per (worker, pool): never more than the pool's MaxAdaptersPerWorker, which the worker's LRU could
        // not honour (it never evicts a pinned adapter, so everything else loaded there would be evicted at once). Counted
        // by bytes: deploys of the same adapter share one copy on a worker, so a second one costs no room there.
        var poolOf = deploys.ToDictionary(d => d.Id, d => d.Pool);
        var pinned = instances.Where(i => poolOf.ContainsKey(i.DeployId))
            .GroupBy(i => (i.WorkerId, Pool: poolOf[i.DeployId]))
            .ToDictionary(g => g.Key, g => g.Select(i => i.AdapterSha256).ToHashSet(StringComparer.Ordinal));
        bool HasRoom(string workerId, string pool, string sha, int cap) =>
            pinned.TryGetValue((workerId, pool), out var held) ? held.Contains(sha) || held.Count < cap : cap > 0;

        foreach (var deploy in deploys)
        {
            var mine = instances.Where(i => i.DeployId == deploy.Id).ToList();
            if (mine.FirstOrDefault(i => i.State == InstanceState.Failed) is { } refused)
            {
                var engine = registry.Find(deploy.Pool)?.Engine ?? "serving";
                var reason = $"The {engine} engine refused this adapter: {refused.FailReason}";
                if (await FailAsync(db, deploy.Id, reason, now, ct))
                {
                    LogRefused(deploy.Id, reason);
                }
                woken.UnionWith(mine.Select(i => i.WorkerId));
                continue;
            }

            var wanted = Math.Max(0, deploy.MinInstances);
            var have = mine.Count;
            if (have < wanted)
            {
                var cap = registry.Find(deploy.Pool)?.MaxAdaptersPerWorker ?? BaseModelEntry.DefaultMaxAdaptersPerWorker;
                var candidates = workers
                    .Where(w => w.Pools.Contains(deploy.Pool) && mine.All(i => i.WorkerId != w.Id) && HasRoom(w.Id, deploy.Pool, deploy.Sha, cap))
                    .OrderBy(w => perWorker.GetValueOrDefault(w.Id))
                    .ThenBy(w => w.Id, StringComparer.Ordinal)
                    .Take(wanted - have)
                    .ToList();
                foreach (var worker in candidates)
                {
                    db.Instances.Add(new Instance
                    {
                        DeployId = deploy.Id, WorkerId = worker.Id, AdapterSha256 = deploy.Sha, State = InstanceState.Loading,
                        Pinned = true, Since = now,
                    });
                    perWorker[worker.Id] = perWorker.GetValueOrDefault(worker.Id) + 1;
                    if (!pinned.TryGetValue((worker.Id, deploy.Pool), out var held))
                    {
                        pinned[(worker.Id, deploy.Pool)] = held = new HashSet<string>(StringComparer.Ordinal);
                    }
                    held.Add(deploy.Sha);
                    have++;
                }
                try
                {
                    await db.SaveChangesAsync(ct);
                }
                catch (DbUpdateException e) when (db.IsUniqueViolation(e))
                {
                    db.ChangeTracker.Clear(); // another replica placed it meanwhile; the next pass counts again
                    continue;
                }
                woken.UnionWith(candidates.Select(w => w.Id));
            }
            else if (have > wanted)
            {
                // Scale down: loading copies go first, then the newest; the worker keeps the adapter in its LRU cache.
                var extra = mine.OrderBy(i => i.State == InstanceState.Ready).ThenByDescending(i => i.Since).Take(have - wanted).Select(i => i.Id).ToList();
                await db.Instances.Where(i => extra.Contains(i.Id)).ExecuteDeleteAsync(ct);
                woken.UnionWith(mine.Where(i => extra.Contains(i.Id)).Select(i => i.WorkerId));
                mine = mine.Where(i => !extra.Contains(i.Id)).ToList();
                have = wanted;
            }

            var ready = mine.Count(i => i.State == InstanceState.Ready);
            var pending = have - ready + (wanted - have);
            var status = ready >= wanted ? DeployStatus.Running : DeployStatus.Deploying;
            if (wanted == 0)
            {
                // Loaded on first request: servable while the pool has a live worker; counted where a heartbeat says it is.
                var live = workers.Where(w => w.Pools.Contains(deploy.Pool)).ToList();
                ready = live.Count(w => w.Resident.Contains($"{deploy.Pool}|{deploy.Sha}"));
                pending = live.Count == 0 ? 1 : 0;
                status = live.Count == 0 ? DeployStatus.Deploying : DeployStatus.Running;
            }
            if (status != deploy.Status || ready != deploy.RunningInstances || pending != deploy.PendingInstances)
            {
                var changed = await db.Deploys
                    .Where(d => d.Id == deploy.Id && (d.Status == DeployStatus.Deploying || d.Status == DeployStatus.Running))
                    .ExecuteUpdateAsync(set => set
                        .SetProperty(d => d.Status, status)
                        .SetProperty(d => d.RunningInstances, ready)
                        .SetProperty(d => d.PendingInstances, pending)
                        .SetProperty(d => d.UpdatedAt, now), ct);
                if (changed == 1 && status != deploy.Status)
                {
                    LogStatus(deploy.Id, deploy.Status, status, ready, pending);
                }
            }
        }
    }

    private static async Task<bool> FailAsync(LoraDeployDbContext db, string deployId, string reason, DateTime now, CancellationToken ct)
    {
        await using var transaction = await db.Database.BeginTransactionAsync(ct);
        var failed = await db.Deploys
            .Where(d => d.Id == deployId && (d.Status == DeployStatus.Deploying || d.Status == DeployStatus.Running))
            .ExecuteUpdateAsync(set => set
                .SetProperty(d => d.Status, DeployStatus.Failed)
                .SetProperty(d => d.FailReason, reason.Length <= 2000 ? reason : reason[..2000])
                .SetProperty(d => d.FailClass, "engine_refused")
                .SetProperty(d => d.RunningInstances, 0)
                .SetProperty(d => d.PendingInstances, 0)
                .SetProperty(d => d.UpdatedAt, now), ct);
        await db.Instances.Where(i => i.DeployId == deployId).ExecuteDeleteAsync(ct);
        await transaction.CommitAsync(ct);
        return failed == 1;
    }

    [LoggerMessage(Level = LogLevel.Warning, Message = "Workers {WorkerIds} sent no heartbeat for {Seconds} s: out of routing, their instances are placed elsewhere")]
    private partial void LogForgotten(string workerIds, int seconds);

    [LoggerMessage(Level = LogLevel.Warning, Message = "Deploy {DeployId} failed: {Reason}")]
    private partial void LogRefused(string deployId, string reason);

    [LoggerMessage(Level = LogLevel.Information, Message = "Deploy {DeployId}: {From} → {To} ({Ready} ready, {Pending} pending)")]
    private partial void LogStatus(string deployId, string from, string to, int ready, int pending);
}
