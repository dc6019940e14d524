using System.Threading.Channels;

namespace LoraDeploy.Pipeline;

/// <summary>
/// Wakes the import pipeline as soon as there is new work in this process. The database stays the queue;
/// this only saves the wait for the next poll (other replicas find the work by polling).
/// </summary>
public sealed class PipelineSignal
{
    private readonly Channel<bool> _channel = Channel.CreateBounded<bool>(
        new BoundedChannelOptions(1) { FullMode = BoundedChannelFullMode.DropWrite });

    public void Wake() => _channel.Writer.TryWrite(true);

    /// <summary>Waits for a wake-up or the timeout, whichever comes first.</summary>
    public async Task WaitAsync(TimeSpan timeout, TimeProvider time, CancellationToken ct)
    {
        // The timeout runs on the injected clock (a fake one in tests), the stop token on the host's.
        using var timeoutSource = new CancellationTokenSource(timeout, time);
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(ct, timeoutSource.Token);
        try
        {
            await _channel.Reader.ReadAsync(linked.Token);
        }
        catch (OperationCanceledException) when (!ct.IsCancellationRequested)
        {
        }
    }
}
