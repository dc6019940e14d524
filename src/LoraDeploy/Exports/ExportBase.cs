using LoraDeploy.BaseModels;
using LoraDeploy.Lora.Merge;

namespace LoraDeploy.Exports;

/// <summary>
/// The base weights an export merges into and the merge that fits them. The one place that maps a base kind to a
/// merge function: a new kind is one more case here.
/// </summary>
public sealed record ExportBase(string Format, string Path)
{
    public const string Safetensors = "safetensors";
    public const string Gguf = "gguf";

    /// <summary>The base an export of a LoRA on <paramref name="entry"/> merges into; null when this host has none.</summary>
    public static ExportBase? Of(BaseModelEntry? entry) => entry switch
    {
        { Weights: { } weights } => new ExportBase(Safetensors, weights),
        { Engine: Engines.LlamaCpp, Gguf: { Length: > 0 } gguf } => new ExportBase(Gguf, gguf),
        _ => null,
    };

    /// <summary>The sentence a caller reads when <paramref name="baseModel"/> has no base weights on this host.</summary>
    public static string Missing(string baseModel) =>
        $"Base model '{baseModel}' has no weights on this server, so nothing can be merged: the operator sets BaseModels:{baseModel}:Weights to the path of its .safetensors file.";

    /// <summary>Merges the adapter into this base, writing <paramref name="outputPath"/> (as <c>.part</c>, then renamed).</summary>
    /// <exception cref="LoraMergeException">The inputs do not fit together, or the output could not be written.</exception>
    /// <remarks>
    /// An LLM LoRA is stored as the llama.cpp LoRA GGUF made at import; the GGUF merge tells it by its magic bytes (the
    /// runner's copy may be named otherwise) and applies it as llama.cpp would at run time.
    /// </remarks>
    public MergeResult Merge(MergeAdapter adapter, string outputPath, MergeOptions options, CancellationToken ct) => Format switch
    {
        Safetensors when GgufMerger.IsGguf(adapter.Path) => throw new LoraMergeException(
            $"the adapter is a llama.cpp LoRA GGUF (an LLM LoRA), which merges only into the pool's GGUF base, not into the safetensors weights {Path}; leave BaseModels:…:Weights unset for this llamacpp pool so that its exports merge into BaseModels:…:Gguf"),
        Safetensors => LoraMerger.Merge(Path, [adapter], outputPath, options, ct),
        Gguf => GgufMerger.Merge(Path, [adapter], outputPath, options, ct),
        _ => throw new InvalidOperationException($"Unknown export base format '{Format}'."),
    };
}
