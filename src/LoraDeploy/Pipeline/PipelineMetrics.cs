using System.Diagnostics.Metrics;

namespace LoraDeploy.Pipeline;

/// <summary>The import pipeline's instruments (exported through OpenTelemetry at <c>/metrics</c>).</summary>
public sealed class PipelineMetrics
{
    public const string MeterName = "LoraDeploy.Pipeline";

    private readonly Counter<long> _importsStarted;
    private readonly Counter<long> _importsSucceeded;
    private readonly Counter<long> _importsFailed;
    private readonly Counter<long> _bytesDownloaded;
    private readonly Counter<long> _dedupHits;
    private readonly Histogram<double> _downloadDuration;

    public PipelineMetrics(IMeterFactory meters)
    {
        var meter = meters.Create(MeterName);
        _importsStarted = meter.CreateCounter<long>("loradeploy.imports.started", description: "Deploys the pipeline began importing");
        _importsSucceeded = meter.CreateCounter<long>("loradeploy.imports.succeeded", description: "Imports that reached deploying");
        _importsFailed = meter.CreateCounter<long>("loradeploy.imports.failed", description: "Imports that failed, by reason class");
        _bytesDownloaded = meter.CreateCounter<long>("loradeploy.download.bytes", unit: "By", description: "Bytes downloaded from sources");
        _dedupHits = meter.CreateCounter<long>("loradeploy.imports.dedup_hits", description: "Imports served by an already stored or in-flight file");
        _downloadDuration = meter.CreateHistogram<double>("loradeploy.download.duration", unit: "s", description: "Wall time of completed downloads");
    }

    public void ImportStarted() => _importsStarted.Add(1);
    public void ImportSucceeded() => _importsSucceeded.Add(1);
    public void ImportFailed(string reasonClass) => _importsFailed.Add(1, new KeyValuePair<string, object?>("reason", reasonClass));
    public void BytesDownloaded(long bytes) => _bytesDownloaded.Add(bytes);
    public void DedupHit(string kind) => _dedupHits.Add(1, new KeyValuePair<string, object?>("kind", kind));
    public void DownloadCompleted(TimeSpan duration) => _downloadDuration.Record(duration.TotalSeconds);
}
