using System.Collections.Concurrent;
using System.Globalization;
using LoraDeploy.BaseModels;
using LoraDeploy.Serving.LlamaCpp;
using LoraDeploy.Workers.Host;

namespace LoraDeploy.Serving;

/// <summary>
/// The <c>llamacpp</c> engine of a worker: one <see cref="LlamaCppEngine"/> per pool (its base GGUF loaded once),
/// adapters loaded by their blob SHA-256, requests answered by <see cref="LlamaCppHttp"/>. Per pool,
/// <c>BaseModels:{name}:Defaults:</c> may set <c>context_size</c>, <c>threads</c>, <c>slots</c> (contexts at once),
/// <c>kv_cache</c> (<c>f16</c> default, <c>f32</c> for exact logits) and the inference defaults (<c>max_tokens</c>,
/// <c>temperature</c>, <c>top_p</c>).
/// </summary>
public sealed class LlamaCppServingEngine(ILoggerFactory? loggers = null) : IServingEngine, IAsyncDisposable
{
    private readonly ILoggerFactory _loggers = loggers ?? Microsoft.Extensions.Logging.Abstractions.NullLoggerFactory.Instance;
    private readonly ConcurrentDictionary<string, (LlamaCppEngine Engine, BaseModelEntry Pool)> _pools = new(StringComparer.Ordinal);

    public string Engine => Engines.LlamaCpp;

    public Task StartAsync(IReadOnlyList<BaseModelEntry> pools, CancellationToken ct) => Task.Run(() =>
    {
        foreach (var pool in pools)
        {
            ct.ThrowIfCancellationRequested();
            var defaults = pool.Defaults;
            var options = new LlamaCppEngineOptions
            {
                ModelPath = pool.Gguf ?? throw new InvalidOperationException($"BaseModels:{pool.Name}:Gguf is not set"),
                ContextSize = Setting(defaults, "context_size", 4096u),
                Threads = (int)Setting(defaults, "threads", (uint)Math.Max(1, Environment.ProcessorCount)),
                Slots = (int)Setting(defaults, "slots", 2u),
                KvCacheType = defaults.GetValueOrDefault("kv_cache") == "f32" ? LLama.Native.GGMLType.GGML_TYPE_F32 : LLama.Native.GGMLType.GGML_TYPE_F16,
                FlashAttention = defaults.GetValueOrDefault("kv_cache") == "f32" ? false : null,
            };
            _pools[pool.Name] = (LlamaCppEngine.Load(options, _loggers.CreateLogger<LlamaCppEngine>()), pool);
        }
    }, ct);

    public Task<AdapterLoadResult> LoadAdapterAsync(string pool, string sha256, string path, CancellationToken ct) => Task.Run(() =>
        Of(pool).Engine.LoadAdapter(sha256, path) switch
        {
            LoraLoadResult.Refused refused => AdapterLoadResult.Refused(refused.Reason),
            _ => AdapterLoadResult.Loaded,
        }, ct);

    public async Task UnloadAdapterAsync(string pool, string sha256) => await Of(pool).Engine.UnloadAdapterAsync(sha256);

    public Task HandleAsync(InferenceCall call, HttpContext http, CancellationToken ct)
    {
        var (engine, pool) = Of(call.Pool);
        return LlamaCppHttp.HandleAsync(engine, call.Operation, call.Adapters.Select(a => new LlamaCppAdapterUse(a.Sha256, a.Scale)).ToList(),
            call.Body, pool.Defaults, http, ct);
    }

    public async ValueTask DisposeAsync()
    {
        foreach (var (engine, _) in _pools.Values)
        {
            await engine.DisposeAsync();
        }
        _pools.Clear();
    }

    private (LlamaCppEngine Engine, BaseModelEntry Pool) Of(string pool) =>
        _pools.TryGetValue(pool, out var entry) ? entry : throw new InvalidOperationException($"pool {pool} is not loaded on this worker");

    private static uint Setting(IReadOnlyDictionary<string, string> defaults, string name, uint fallback) =>
        defaults.TryGetValue(name, out var text) && uint.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out var value) && value > 0 ? value : fallback;
}
