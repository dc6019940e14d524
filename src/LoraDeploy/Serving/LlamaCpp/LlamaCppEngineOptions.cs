using LLama.Native;

namespace LoraDeploy.Serving.LlamaCpp;

/// <summary>
/// How a <see cref="LlamaCppEngine"/> runs its base model. The serving defaults are llama.cpp's own (F16 KV cache,
/// flash attention where the backend supports it: half the KV memory of F32, and what llama-server users get); those
/// move logits by about 2e-3, so exactness checks use <see cref="GGMLType.GGML_TYPE_F32"/> and
/// <c>FlashAttention = false</c>.
/// </summary>
public sealed record LlamaCppEngineOptions
{
    /// <summary>Path of the base model GGUF.</summary>
    public required string ModelPath { get; init; }

    /// <summary>Tokens per context (prompt + completion); every slot gets its own KV cache of this size.</summary>
    public uint ContextSize { get; init; } = 4096;

    /// <summary>Tokens decoded per llama_decode call while reading a prompt.</summary>
    public uint BatchSize { get; init; } = 512;

    /// <summary>CPU threads per decode.</summary>
    public int Threads { get; init; } = Math.Max(1, Environment.ProcessorCount);

    /// <summary>Contexts that may serve requests at once (each holds one adapter set and its prompt cache).</summary>
    public int Slots { get; init; } = 2;

    /// <summary>KV cache element type (F16 by default; F32 for bit-exact comparisons).</summary>
    public GGMLType KvCacheType { get; init; } = GGMLType.GGML_TYPE_F16;

    /// <summary>true/false forces flash attention on/off; null lets llama.cpp decide per backend.</summary>
    public bool? FlashAttention { get; init; }

    /// <summary>Layers offloaded to a GPU backend (0 with the CPU backend; -1 = all).</summary>
    public int GpuLayerCount { get; init; }

    /// <summary>Throws with a sentence naming the setting when a value cannot work.</summary>
    public void Validate()
    {
        if (string.IsNullOrWhiteSpace(ModelPath))
        {
            throw new ArgumentException("ModelPath: the base model GGUF path is empty");
        }
        if (!File.Exists(ModelPath))
        {
            throw new FileNotFoundException($"ModelPath: the base model GGUF '{ModelPath}' does not exist", ModelPath);
        }
        if (ContextSize < 2)
        {
            throw new ArgumentException($"ContextSize must be at least 2 tokens (got {ContextSize})");
        }
        if (BatchSize < 1)
        {
            throw new ArgumentException("BatchSize must be at least 1");
        }
        if (Threads < 1)
        {
            throw new ArgumentException($"Threads must be at least 1 (got {Threads})");
        }
        if (Slots < 1)
        {
            throw new ArgumentException($"Slots must be at least 1 (got {Slots})");
        }
    }
}
