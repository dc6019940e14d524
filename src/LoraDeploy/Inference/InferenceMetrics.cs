using System.Diagnostics.Metrics;

namespace LoraDeploy.Inference;

/// <summary>Gateway metrics: routing (affinity hits), latency by route and status, outstanding requests per pool.</summary>
public sealed class InferenceMetrics
{
    public const string MeterName = "LoraDeploy.Inference";

    private readonly Counter<long> _routed;
    private readonly Counter<long> _adapterLoads;
    private readonly Histogram<double> _duration;
    private readonly Counter<long> _unloads;

    public InferenceMetrics(IMeterFactory meters)
    {
        var meter = meters.Create(MeterName);
        _routed = meter.CreateCounter<long>("loradeploy.inference.routed", description: "Requests routed, by pool and whether the worker already held the adapters (hit)");
        _adapterLoads = meter.CreateCounter<long>("loradeploy.inference.adapter_loads", description: "Adapters a worker had to load to answer a request, by pool");
        _unloads = meter.CreateCounter<long>("loradeploy.worker.adapter_unloads", description: "Adapters workers unloaded (LRU evictions and drops), by pool, as their heartbeats report");
        _duration = meter.CreateHistogram<double>("loradeploy.inference.duration", unit: "s", description: "Inference latency through the gateway, by route and status",
            tags: null, advice: new InstrumentAdvice<double> { HistogramBucketBoundaries = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300] });
    }

    public void Routed(string pool, bool hit) => _routed.Add(1,
        new KeyValuePair<string, object?>("pool", pool), new KeyValuePair<string, object?>("hit", hit));

    public void AdapterLoads(string pool, int count) => _adapterLoads.Add(count, new KeyValuePair<string, object?>("pool", pool));

    public void AdapterUnloaded(string pool) => _unloads.Add(1, new KeyValuePair<string, object?>("pool", pool));

    public void Finished(string route, int status, TimeSpan elapsed) => _duration.Record(elapsed.TotalSeconds,
        new KeyValuePair<string, object?>("route", route), new KeyValuePair<string, object?>("status", status));
}
