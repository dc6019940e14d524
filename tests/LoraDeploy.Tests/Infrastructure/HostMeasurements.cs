using System.Collections.Concurrent;
using System.Diagnostics.Metrics;
using System.Globalization;

namespace LoraDeploy.Tests;

/// <summary>
/// Every measurement of one server's <c>loradeploy.*</c> instruments, read from its own <see cref="IMeterFactory"/>.
/// A scrape of <c>/metrics</c> is no good for exact values in this process: OpenTelemetry subscribes to meters by name,
/// so every host of every test running in parallel adds to the same lines.
/// </summary>
public sealed class HostMeasurements : IDisposable
{
    private readonly MeterListener _listener = new();
    private readonly ConcurrentQueue<Measured> _seen = new();

    public HostMeasurements(IServiceProvider services)
    {
        var meters = services.GetRequiredService<IMeterFactory>();
        _listener.InstrumentPublished = (instrument, listener) =>
        {
            if (ReferenceEquals(instrument.Meter.Scope, meters) && instrument.Name.StartsWith("loradeploy.", StringComparison.Ordinal))
            {
                listener.EnableMeasurementEvents(instrument);
            }
        };
        _listener.SetMeasurementEventCallback<long>((i, v, t, _) => Record(i, v, t));
        _listener.SetMeasurementEventCallback<int>((i, v, t, _) => Record(i, v, t));
        _listener.SetMeasurementEventCallback<double>((i, v, t, _) => Record(i, v, t));
        _listener.Start();
    }

    public sealed record Measured(string Name, double Value, IReadOnlyDictionary<string, string> Tags)
    {
        public string? Tag(string key) => Tags.GetValueOrDefault(key);
    }

    /// <summary>Everything recorded so far, oldest first.</summary>
    public IReadOnlyList<Measured> All => [.. _seen];

    /// <summary>The observable instruments (gauges) sampled now: what they report.</summary>
    public IReadOnlyList<Measured> Observe()
    {
        var before = _seen.Count;
        _listener.RecordObservableInstruments();
        return [.. _seen.Skip(before)];
    }

    /// <summary>The sum of <paramref name="name"/>'s measurements that <paramref name="where"/> accepts.</summary>
    public double Sum(string name, Func<Measured, bool>? where = null) =>
        _seen.Where(m => m.Name == name && (where is null || where(m))).Sum(m => m.Value);

    public void Dispose() => _listener.Dispose();

    private void Record(Instrument instrument, double value, ReadOnlySpan<KeyValuePair<string, object?>> tags)
    {
        var named = new Dictionary<string, string>();
        foreach (var tag in tags)
        {
            named[tag.Key] = Convert.ToString(tag.Value, CultureInfo.InvariantCulture)!;
        }
        _seen.Enqueue(new Measured(instrument.Name, value, named));
    }
}
