using LoraDeploy.Pipeline;

namespace LoraDeploy.Exports;

/// <summary>Wakes the export runner when this process queues a job (other replicas find it by polling).</summary>
public sealed class ExportSignal
{
    private readonly PipelineSignal _signal = new();

    public void Wake() => _signal.Wake();

    public Task WaitAsync(TimeSpan timeout, TimeProvider time, CancellationToken ct) => _signal.WaitAsync(timeout, time, ct);
}
