using System.Collections.Concurrent;
using System.Text.Json.Nodes;
using LoraDeploy.BaseModels;
using LoraDeploy.Workers.Host;
using Microsoft.AspNetCore.Http;

namespace LoraDeploy.Tests.Workers;

/// <summary>
/// An engine for the worker's own tests: records loads (with the bytes it was given) and unloads, refuses the
/// adapters it is told to, and answers a request with what it received. With <see cref="HoldRequests"/> set, requests
/// wait until <see cref="ReleaseRequests"/> (or until cancelled, which it counts).
/// </summary>
public sealed class TestEchoEngine(string engine = Engines.LlamaCpp) : IServingEngine
{
    private TaskCompletionSource _release = NewGate();
    private int _running;
    private int _maxRunning;
    private int _cancelled;

    public string Engine => engine;

    public IReadOnlyList<BaseModelEntry> StartedPools { get; private set; } = [];

    public ConcurrentQueue<(string Pool, string Sha256, byte[] Bytes)> Loads { get; } = new();

    public ConcurrentQueue<(string Pool, string Sha256)> Unloads { get; } = new();

    /// <summary>sha256 → the reason the engine gives when asked to load it.</summary>
    public ConcurrentDictionary<string, string> Refuse { get; } = new();

    public bool HoldRequests { get; set; }

    public int Running => Volatile.Read(ref _running);

    public int MaxRunning => Volatile.Read(ref _maxRunning);

    public int Cancelled => Volatile.Read(ref _cancelled);

    public void ReleaseRequests() => _release.TrySetResult();

    /// <summary>Set: <see cref="StartAsync"/> fails with this message (a base model that cannot load).</summary>
    public string? StartFailure { get; init; }

    /// <summary>Set: <see cref="StartAsync"/> waits for it (a base model that takes long to load).</summary>
    public TaskCompletionSource? StartGate { get; init; }

    public async Task StartAsync(IReadOnlyList<BaseModelEntry> pools, CancellationToken ct)
    {
        if (StartFailure is not null)
        {
            throw new InvalidOperationException(StartFailure);
        }
        if (StartGate is not null)
        {
            await StartGate.Task.WaitAsync(ct);
        }
        StartedPools = pools;
    }

    /// <summary>When set, unloads wait for it (to widen the window between deciding an unload and finishing it).</summary>
    public TaskCompletionSource? UnloadGate { get; set; }

    private readonly ConcurrentDictionary<string, byte> _unloading = new();

    public async Task<AdapterLoadResult> LoadAdapterAsync(string pool, string sha256, string path, CancellationToken ct)
    {
        if (Refuse.TryGetValue(sha256, out var reason))
        {
            return AdapterLoadResult.Refused(reason);
        }
        if (_unloading.ContainsKey(sha256))
        {
            // What llama.cpp's engine answers too: a load of an adapter whose unload has not finished is refused.
            return AdapterLoadResult.Refused($"adapter '{sha256}' is being unloaded; load it again once the unload has finished");
        }
        Loads.Enqueue((pool, sha256, await File.ReadAllBytesAsync(path, ct)));
        return AdapterLoadResult.Loaded;
    }

    public async Task UnloadAdapterAsync(string pool, string sha256)
    {
        _unloading[sha256] = 0;
        if (UnloadGate is { } gate)
        {
            await gate.Task;
        }
        Unloads.Enqueue((pool, sha256));
        _unloading.TryRemove(sha256, out _);
    }

    public async Task HandleAsync(InferenceCall call, HttpContext http, CancellationToken ct)
    {
        var running = Interlocked.Increment(ref _running);
        InterlockedMax(ref _maxRunning, running);
        try
        {
            if (HoldRequests)
            {
                await _release.Task.WaitAsync(ct);
            }
        }
        catch (OperationCanceledException)
        {
            Interlocked.Increment(ref _cancelled);
            throw;
        }
        finally
        {
            Interlocked.Decrement(ref _running);
        }
        var answer = new JsonObject
        {
            ["pool"] = call.Pool,
            ["operation"] = call.Operation,
            ["adapters"] = new JsonArray([.. call.Adapters.Select(a => (JsonNode)new JsonObject { ["sha256"] = a.Sha256, ["scale"] = a.Scale })]),
            ["body"] = JsonNode.Parse(call.Body.GetRawText()),
        };
        http.Response.ContentType = "application/json";
        await http.Response.WriteAsync(answer.ToJsonString(), ct);
    }

    private static TaskCompletionSource NewGate() => new(TaskCreationOptions.RunContinuationsAsynchronously);

    private static void InterlockedMax(ref int target, int value)
    {
        int seen;
        while ((seen = Volatile.Read(ref target)) < value && Interlocked.CompareExchange(ref target, value, seen) != seen)
        {
        }
    }
}
