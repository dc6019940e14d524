using System.Diagnostics.Metrics;
using System.Text.Json;
using LoraDeploy.Data;
using LoraDeploy.Workers;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Inference;

/// <summary>
/// Per-pool gauges for dashboards and autoscalers (KEDA/HPA scale a pool's workers on its queue depth): workers by pool
/// and state, the pool's queue depth (what its workers report waiting plus this replica's requests in flight to it),
/// and this replica's outstanding requests. Sampled from the database every couple of seconds; a scrape never queries.
/// </summary>
public sealed class PoolGauge : BackgroundService
{
    private static readonly TimeSpan Interval = TimeSpan.FromSeconds(2);
    private readonly IDbContextFactory<LoraDeployDbContext> _contexts;
    private readonly InferenceRouter _router;
    private readonly IOptions<WorkersOptions> _options;
    private readonly TimeProvider _time;
    private readonly ILogger<PoolGauge> _logger;
    private volatile IReadOnlyList<(string Pool, string State, int Workers, int Queue)> _sample = [];

    public PoolGauge(IMeterFactory meters, IDbContextFactory<LoraDeployDbContext> contexts, InferenceRouter router,
        IOptions<WorkersOptions> options, TimeProvider time, ILogger<PoolGauge> logger)
    {
        (_contexts, _router, _options, _time, _logger) = (contexts, router, options, time, logger);
        var meter = meters.Create(InferenceMetrics.MeterName);
        meter.CreateObservableGauge("loradeploy.workers", () => _sample.Select(s => new Measurement<int>(s.Workers,
            new KeyValuePair<string, object?>("pool", s.Pool), new KeyValuePair<string, object?>("state", s.State))),
            description: "Registered workers by pool and state (live, or stale: missed heartbeats, about to be forgotten)");
        meter.CreateObservableGauge("loradeploy.pool.queue_depth", () => _sample.Where(s => s.State == "live")
            .Select(s => new Measurement<int>(s.Queue + _router.Outstanding(s.Pool), new KeyValuePair<string, object?>("pool", s.Pool))),
            description: "Requests waiting or running in a pool: what its workers report queued plus requests in flight through this replica");
        meter.CreateObservableGauge("loradeploy.pool.outstanding", () => _router.OutstandingByPool
            .Select(p => new Measurement<int>(p.Value, new KeyValuePair<string, object?>("pool", p.Key))),
            description: "Requests this replica has in flight per pool (429 above Workers:MaxOutstandingPerPool)");
    }

    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        using var timer = new PeriodicTimer(Interval, _time);
        do
        {
            try
            {
                await using var db = await _contexts.CreateDbContextAsync(stoppingToken);
                var live = _time.GetUtcNow().UtcDateTime - TimeSpan.FromSeconds(_options.Value.HeartbeatSeconds * 2);
                var workers = await db.Workers.Select(w => new { w.PoolsJson, w.QueueDepth, w.LastHeartbeatAt }).ToListAsync(stoppingToken);
                _sample = workers
                    .SelectMany(w => (JsonSerializer.Deserialize(w.PoolsJson, ApiJson.Context.ListString) ?? [])
                        .Select(pool => (Pool: pool, State: w.LastHeartbeatAt >= live ? "live" : "stale", w.QueueDepth)))
                    .GroupBy(x => (x.Pool, x.State))
                    .Select(g => (g.Key.Pool, g.Key.State, g.Count(), g.Sum(x => x.QueueDepth)))
                    .ToList();
            }
            catch (Exception e) when (e is not OperationCanceledException)
            {
                _logger.LogWarning(e, "Could not sample workers");
            }
        }
        while (await timer.WaitForNextTickAsync(stoppingToken));
    }
}
