using System.Security.Cryptography;
using System.Text;
using LoraDeploy.BaseModels;

namespace LoraDeploy.Workers.Host;

/// <summary>
/// What one worker process serves: one <see cref="WorkerUnit"/> per engine that has pools (each registers on its
/// own, since a registration names one engine), and the call key the server must present.
/// </summary>
public sealed class WorkerRuntime
{
    private readonly byte[] _callKeyHash;

    public WorkerRuntime(IReadOnlyList<WorkerUnit> units)
    {
        Units = units;
        // A fresh secret per process start: a registration of an earlier run cannot be used to call this one.
        CallKey = Convert.ToBase64String(RandomNumberGenerator.GetBytes(32)).TrimEnd('=').Replace('+', '-').Replace('/', '_');
        _callKeyHash = SHA256.HashData(Encoding.UTF8.GetBytes(CallKey));
    }

    public IReadOnlyList<WorkerUnit> Units { get; }

    public string CallKey { get; }

    /// <summary>Every engine has loaded its base models and can serve.</summary>
    public bool Ready => Units.All(u => u.Started && u.Engine.Problem is null);

    public WorkerUnit? FindUnit(string? pool) => pool is null ? null : Units.FirstOrDefault(u => u.Pools.ContainsKey(pool));

    /// <summary>True for <c>Bearer {call key}</c>; compared in constant time (hashes of equal length).</summary>
    public bool IsCallKey(string? authorization)
    {
        const string scheme = "Bearer ";
        if (authorization is null || !authorization.StartsWith(scheme, StringComparison.Ordinal))
        {
            return false;
        }
        var presented = SHA256.HashData(Encoding.UTF8.GetBytes(authorization[scheme.Length..].Trim()));
        return CryptographicOperations.FixedTimeEquals(presented, _callKeyHash);
    }
}

/// <summary>One engine of a worker with its pools, its adapters and its slots.</summary>
public sealed class WorkerUnit(IServingEngine engine, IReadOnlyDictionary<string, BaseModelEntry> pools, AdapterResidency residency, int slots)
{
    private volatile bool _started;
    private TaskCompletionSource _wake = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public IServingEngine Engine => engine;

    public IReadOnlyDictionary<string, BaseModelEntry> Pools => pools;

    public AdapterResidency Residency => residency;

    public WorkerSlots Slots { get; } = new(slots);

    /// <summary>The engine has loaded its base models.</summary>
    public bool Started
    {
        get => _started;
        internal set => _started = value;
    }

    /// <summary>Asks for a heartbeat now (an adapter changed state), rather than at the next period.</summary>
    public void Wake() => Volatile.Read(ref _wake).TrySetResult();

    /// <summary>Waits for the period or a <see cref="Wake"/>, whichever comes first.</summary>
    internal async Task WaitForNextBeatAsync(TimeSpan period, TimeProvider time, CancellationToken ct)
    {
        var signal = Volatile.Read(ref _wake);
        using var delay = CancellationTokenSource.CreateLinkedTokenSource(ct);
        await Task.WhenAny(Task.Delay(period, time, delay.Token), signal.Task);
        await delay.CancelAsync();
        ct.ThrowIfCancellationRequested();
        if (signal.Task.IsCompleted)
        {
            Interlocked.CompareExchange(ref _wake, new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously), signal);
        }
    }
}

/// <summary>At most N requests at once; the rest wait (and are counted as the queue depth).</summary>
public sealed class WorkerSlots(int slots)
{
    private readonly SemaphoreSlim _gate = new(slots, slots);
    private int _queued;
    private int _busy;

    public int Count => slots;

    public int QueueDepth => Volatile.Read(ref _queued);

    public int BusySlots => Volatile.Read(ref _busy);

    /// <summary>A slot, held until the result is disposed.</summary>
    public async Task<IDisposable> EnterAsync(CancellationToken ct)
    {
        Interlocked.Increment(ref _queued);
        try
        {
            await _gate.WaitAsync(ct);
        }
        finally
        {
            Interlocked.Decrement(ref _queued);
        }
        Interlocked.Increment(ref _busy);
        return new Slot(this);
    }

    private sealed class Slot(WorkerSlots owner) : IDisposable
    {
        private int _disposed;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) == 0)
            {
                Interlocked.Decrement(ref owner._busy);
                owner._gate.Release();
            }
        }
    }
}
