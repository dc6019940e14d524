using System.Text.Json;
using LoraDeploy.BaseModels;

namespace LoraDeploy.Workers.Host;

/// <summary>
/// One engine kind (<see cref="Engines"/>) inside a worker: loads the base models of its pools once, then loads,
/// unloads and applies adapters on them. The worker owns residency (which adapters, LRU, pinning) and the HTTP surface;
/// the engine owns the model and writes each inference answer itself (JSON or SSE).
/// </summary>
public interface IServingEngine
{
    /// <summary><see cref="Engines.LlamaCpp"/> or <see cref="Engines.ComfyUi"/>: the pools it can serve.</summary>
    string Engine { get; }

    /// <summary>Loads the base models of <paramref name="pools"/> (all of this engine). The worker is ready once it returns.</summary>
    Task StartAsync(IReadOnlyList<BaseModelEntry> pools, CancellationToken ct);

    /// <summary>
    /// Loads the adapter at <paramref name="path"/> (a verified blob; the file may be evicted from the cache after this
    /// returns, so keep what you need). A file the engine cannot use is <see cref="AdapterLoadResult.Refused"/> with a
    /// reason a person can act on, never an exception.
    /// </summary>
    Task<AdapterLoadResult> LoadAdapterAsync(string pool, string sha256, string path, CancellationToken ct);

    /// <summary>Frees an adapter. Never called while a request that uses it is running.</summary>
    Task UnloadAdapterAsync(string pool, string sha256);

    /// <summary>
    /// Runs one request: every adapter of <paramref name="call"/> is loaded. Writes the status and body to
    /// <paramref name="http"/>'s response; <paramref name="ct"/> is cancelled when the client goes away.
    /// </summary>
    Task HandleAsync(InferenceCall call, HttpContext http, CancellationToken ct);

    /// <summary>
    /// Null while the engine can serve; otherwise why not (an external server it drives stopped answering). The worker
    /// then leaves routing and asks <see cref="CheckHealthAsync"/> every heartbeat period until it returns null.
    /// </summary>
    string? Problem => null;

    /// <summary>Checks again whether the engine can serve; returns the remaining problem or null.</summary>
    Task<string?> CheckHealthAsync(CancellationToken ct) => Task.FromResult(Problem);
}

/// <summary>What <see cref="IServingEngine.LoadAdapterAsync"/> decided.</summary>
public sealed record AdapterLoadResult
{
    private AdapterLoadResult(string? refusal) => Reason = refusal;

    public static AdapterLoadResult Loaded { get; } = new((string?)null);

    public static AdapterLoadResult Refused(string reason) => new(reason);

    public bool IsLoaded => Reason is null;

    /// <summary>Why the engine refused the adapter (null when loaded).</summary>
    public string? Reason { get; }
}

/// <summary>An adapter applied to a request, with its scale.</summary>
public readonly record struct AdapterScale(string Sha256, float Scale);

/// <param name="Pool">The pool (base model name).</param>
/// <param name="Operation">One of <see cref="Operations"/>.</param>
/// <param name="Adapters">Adapters to apply, in request order; empty = the base model alone.</param>
/// <param name="Body">The client's (validated) JSON body.</param>
public sealed record InferenceCall(string Pool, string Operation, IReadOnlyList<AdapterScale> Adapters, JsonElement Body);
