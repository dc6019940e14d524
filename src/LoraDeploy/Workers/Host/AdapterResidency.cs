using LoraDeploy.BaseModels;

namespace LoraDeploy.Workers.Host;

/// <summary>States reported in <see cref="ResidentAdapter.State"/>.</summary>
public static class AdapterStates
{
    public const string Loading = "loading";
    public const string Ready = "ready";
    public const string Failed = "failed";
}

/// <summary>The outcome of <see cref="AdapterResidency.AcquireAsync"/>.</summary>
/// <param name="Use">Set when loaded: the adapter is held for the caller until this is disposed.</param>
/// <param name="LoadedNow">The caller waited for a load (a cache miss).</param>
/// <param name="Failure">Why not.</param>
/// <param name="Transient">False for the engine's refusal or a refused blob (no retry helps); true when the server could not be reached.</param>
public sealed record AdapterAcquisition(IDisposable? Use, bool LoadedNow, string? Failure, bool Transient)
{
    public bool Ready => Use is not null;
}

/// <summary>
/// Which adapters one engine holds on each of its pools, and in what state. Loads are single-flight per
/// (pool, adapter); each pool keeps at most <see cref="BaseModelEntry.MaxAdaptersPerWorker"/> adapters, evicting the
/// least recently used one that is neither pinned (held for the server) nor in use by a request.
/// </summary>
public sealed class AdapterResidency(
    IServingEngine engine, IReadOnlyDictionary<string, BaseModelEntry> pools, WorkerBlobCache cache, ILogger logger, CancellationToken stopping)
{
    /// <summary>Failed entries kept per pool for the server to see (oldest dropped beyond it).</summary>
    private const int MaxFailedPerPool = 64;

    private readonly Lock _lock = new();
    private readonly Dictionary<(string Pool, string Sha256), Resident> _residents = [];
    /// <summary>
    /// Unloads decided (under the lock) but not yet done. A new load of the same key waits for them: otherwise the engine
    /// refuses it ("being unloaded") or answers "already loaded" just before the unload removes it.
    /// </summary>
    private readonly Dictionary<(string Pool, string Sha256), Task> _unloads = [];
    private HashSet<(string Pool, string Sha256)> _hold = [];
    private long _clock;

    public IServingEngine Engine => engine;

    /// <summary>Every adapter resident or loading (and the failed ones), for the heartbeat.</summary>
    public IReadOnlyList<ResidentAdapter> Snapshot()
    {
        lock (_lock)
        {
            return _residents.Select(r => new ResidentAdapter(r.Key.Sha256, r.Key.Pool, r.Value.State, r.Value.Reason))
                .Take(WorkerProtocol.MaxReportedAdapters).ToList();
        }
    }

    /// <summary>The server's assignments: unload the dropped adapters now, pin the held ones and start loading what is missing.</summary>
    public void Apply(WorkerAssignments assignments, Action onChange)
    {
        foreach (var sha in assignments.Drop)
        {
            Drop(sha);
        }
        var missing = new List<AdapterAssignment>();
        lock (_lock)
        {
            _hold = assignments.Hold.Select(h => (h.Pool, h.Sha256)).ToHashSet();
            foreach (var held in assignments.Hold)
            {
                if (!pools.ContainsKey(held.Pool))
                {
                    _residents.TryAdd((held.Pool, held.Sha256), new Resident
                    {
                        State = AdapterStates.Failed,
                        Reason = $"this worker does not serve pool '{held.Pool}' (its {engine.Engine} pools: {string.Join(", ", pools.Keys)}).",
                        LastUse = ++_clock,
                    });
                }
                else if (!_residents.ContainsKey((held.Pool, held.Sha256)))
                {
                    missing.Add(held);
                }
            }
        }
        cache.SetPinned(assignments.Hold.Select(h => h.Sha256));
        foreach (var held in missing)
        {
            _ = PreloadAsync(held, onChange);
        }
    }

    private async Task PreloadAsync(AdapterAssignment held, Action onChange)
    {
        try
        {
            var acquired = await AcquireAsync(held.Pool, held.Sha256, held.SizeBytes, stopping);
            acquired.Use?.Dispose();
        }
        catch (OperationCanceledException) when (stopping.IsCancellationRequested)
        {
            return;
        }
        onChange();
    }

    /// <summary>
    /// The adapter loaded on <paramref name="pool"/> and held for the caller until the use is disposed; loads it first
    /// when missing (waiting for a load already under way).
    /// </summary>
    public async Task<AdapterAcquisition> AcquireAsync(string pool, string sha256, long? sizeBytes, CancellationToken ct)
    {
        var key = (pool, sha256);
        var waited = false;
        for (var attempt = 0; attempt < 4; attempt++)
        {
            Task<string?> loading;
            lock (_lock)
            {
                if (_residents.TryGetValue(key, out var resident))
                {
                    switch (resident.State)
                    {
                        case AdapterStates.Ready:
                            resident.InUse++;
                            resident.LastUse = ++_clock;
                            return new AdapterAcquisition(new Use(this, key, resident), waited, null, false);
                        case AdapterStates.Failed:
                            return new AdapterAcquisition(null, waited, resident.Reason, false);
                    }
                    loading = resident.Loading!;
                }
                else if (!pools.ContainsKey(pool))
                {
                    return new AdapterAcquisition(null, false, $"this worker does not serve pool '{pool}'.", false);
                }
                else
                {
                    resident = new Resident { State = AdapterStates.Loading, LastUse = ++_clock };
                    _residents[key] = resident;
                    loading = resident.Loading = Task.Run(() => LoadAsync(key, resident, sizeBytes), CancellationToken.None);
                }
            }
            waited = true;
            if (await loading.WaitAsync(ct) is { } transient)
            {
                return new AdapterAcquisition(null, true, transient, true);
            }
        }
        return new AdapterAcquisition(null, true, $"adapter {sha256} was evicted again as soon as it loaded; the pool's MaxAdaptersPerWorker is too small for its load.", true);
    }

    /// <summary>Ends a request's use of an adapter; one dropped meanwhile is unloaded when its last use ends.</summary>
    private void Release((string Pool, string Sha256) key, Resident resident)
    {
        TaskCompletionSource? unload = null;
        lock (_lock)
        {
            resident.InUse--;
            if (resident.Detached && resident.InUse == 0)
            {
                unload = PendingUnload(key);
            }
        }
        if (unload is not null)
        {
            _ = UnloadAsync(key.Pool, key.Sha256, "dropped by the server", unload);
        }
    }

    private sealed class Use(AdapterResidency owner, (string Pool, string Sha256) key, Resident resident) : IDisposable
    {
        private int _disposed;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) == 0)
            {
                owner.Release(key, resident);
            }
        }
    }

    /// <summary>Loads; returns null when done (ready or failed, recorded on the entry) or a transient failure (entry removed).</summary>
    private async Task<string?> LoadAsync((string Pool, string Sha256) key, Resident resident, long? sizeBytes)
    {
        AdapterLoadResult result;
        try
        {
            using var blob = await cache.AcquireAsync(key.Sha256, sizeBytes, stopping);
            Task? unloading;
            lock (_lock)
            {
                unloading = _unloads.GetValueOrDefault(key);
            }
            if (unloading is not null)
            {
                await unloading.WaitAsync(stopping);
            }
            result = await engine.LoadAdapterAsync(key.Pool, key.Sha256, blob.Path, stopping);
        }
        catch (BlobRefusedException e)
        {
            result = AdapterLoadResult.Refused(e.Message);
        }
        catch (Exception e) when (!stopping.IsCancellationRequested)
        {
            lock (_lock)
            {
                if (_residents.TryGetValue(key, out var current) && current == resident)
                {
                    _residents.Remove(key);
                }
            }
            logger.LogWarning("Could not load adapter {Sha256} on {Pool}: {Reason}", key.Sha256, key.Pool, e.Message);
            return $"adapter {key.Sha256} could not be fetched from the server: {e.Message}";
        }

        var evicted = new List<((string Pool, string Sha256) Key, TaskCompletionSource Done)>();
        var dropped = false;
        TaskCompletionSource? unloadDropped = null;
        lock (_lock)
        {
            dropped = !(_residents.TryGetValue(key, out var current) && current == resident);
            if (dropped && result.IsLoaded)
            {
                unloadDropped = PendingUnload(key);
            }
            if (!result.IsLoaded)
            {
                resident.State = AdapterStates.Failed;
                resident.Reason = result.Reason;
                TrimFailed(key.Pool);
            }
            else if (!dropped)
            {
                resident.State = AdapterStates.Ready;
                evicted = EvictOverCap(key.Pool, except: key);
            }
        }
        if (result.IsLoaded)
        {
            logger.LogInformation("Loaded adapter {Sha256} on {Pool}.", key.Sha256, key.Pool);
            if (unloadDropped is not null)
            {
                await UnloadAsync(key.Pool, key.Sha256, "dropped by the server while loading", unloadDropped);
            }
        }
        else
        {
            logger.LogWarning("Adapter {Sha256} refused on {Pool}: {Reason}", key.Sha256, key.Pool, result.Reason);
        }
        foreach (var (victim, done) in evicted)
        {
            await UnloadAsync(victim.Pool, victim.Sha256, "least recently used beyond MaxAdaptersPerWorker", done);
        }
        return null;
    }

    /// <summary>Under the lock: removes (and returns, to unload) the least recently used unpinned idle adapters beyond the pool's cap.</summary>
    private List<((string Pool, string Sha256) Key, TaskCompletionSource Done)> EvictOverCap(string pool, (string Pool, string Sha256) except)
    {
        var evicted = new List<((string Pool, string Sha256), TaskCompletionSource)>();
        var cap = pools[pool].MaxAdaptersPerWorker;
        var held = _residents.Where(r => r.Key.Pool == pool && r.Value.State != AdapterStates.Failed).ToList();
        var excess = held.Count - cap;
        foreach (var victim in held
                     .Where(r => r.Key != except && r.Value.State == AdapterStates.Ready && r.Value.InUse == 0 && !_hold.Contains(r.Key))
                     .OrderBy(r => r.Value.LastUse)
                     .Take(Math.Max(0, excess)))
        {
            _residents.Remove(victim.Key);
            evicted.Add((victim.Key, PendingUnload(victim.Key)));
        }
        if (held.Count - evicted.Count > cap)
        {
            logger.LogWarning("Pool {Pool} holds {Count} adapters, over MaxAdaptersPerWorker {Cap}: the rest are pinned or in use.",
                pool, held.Count - evicted.Count, cap);
        }
        return evicted;
    }

    private void TrimFailed(string pool)
    {
        foreach (var old in _residents.Where(r => r.Key.Pool == pool && r.Value.State == AdapterStates.Failed)
                     .OrderByDescending(r => r.Value.LastUse).Skip(MaxFailedPerPool).ToList())
        {
            _residents.Remove(old.Key);
        }
    }

    /// <summary>Unloads <paramref name="sha256"/> from every pool at once (after the requests using it end).</summary>
    public void Drop(string sha256)
    {
        var unload = new List<((string Pool, string Sha256) Key, TaskCompletionSource Done)>();
        lock (_lock)
        {
            foreach (var (key, resident) in _residents.Where(r => r.Key.Sha256 == sha256).ToList())
            {
                _residents.Remove(key);
                if (resident.State != AdapterStates.Ready)
                {
                    continue; // failed: nothing loaded; loading: unloaded when the load ends
                }
                if (resident.InUse > 0)
                {
                    resident.Detached = true;
                }
                else
                {
                    unload.Add((key, PendingUnload(key)));
                }
            }
        }
        foreach (var (key, done) in unload)
        {
            _ = UnloadAsync(key.Pool, key.Sha256, "dropped by the server", done);
        }
    }

    /// <summary>Under the lock: records that <paramref name="key"/> is about to be unloaded; complete the result when it is.</summary>
    private TaskCompletionSource PendingUnload((string Pool, string Sha256) key)
    {
        var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        _unloads[key] = _unloads.TryGetValue(key, out var earlier) ? Task.WhenAll(earlier, done.Task) : done.Task;
        return done;
    }

    private async Task UnloadAsync(string pool, string sha256, string why, TaskCompletionSource done)
    {
        try
        {
            await engine.UnloadAdapterAsync(pool, sha256);
            logger.LogInformation("Unloaded adapter {Sha256} from {Pool} ({Why}).", sha256, pool, why);
        }
        catch (Exception e)
        {
            logger.LogError(e, "Unloading adapter {Sha256} from {Pool} failed.", sha256, pool);
        }
        finally
        {
            done.TrySetResult();
            lock (_lock)
            {
                if (_unloads.TryGetValue((pool, sha256), out var pending) && pending.IsCompleted)
                {
                    _unloads.Remove((pool, sha256));
                }
            }
        }
    }

    private sealed class Resident
    {
        public required string State { get; set; }
        public string? Reason { get; set; }
        public long LastUse { get; set; }
        public int InUse { get; set; }
        public Task<string?>? Loading { get; set; }
        /// <summary>Dropped while in use: unloaded by the last release.</summary>
        public bool Detached { get; set; }
    }
}
