using LoraDeploy.Lora.Gguf;

namespace LoraDeploy.Lora.Peft;

/// <summary>
/// What the PEFT converter needs to know about a llama.cpp base model: its architecture, the hyperparameters the
/// q/k permutation uses, and every tensor's ggml dimensions. Built from a GGUF header with <see cref="FromGguf"/>, or
/// directly (tests describe large models without writing them).
/// </summary>
/// <param name="Architecture"><c>general.architecture</c>, e.g. <c>llama</c>.</param>
/// <param name="EmbeddingLength"><c>{arch}.embedding_length</c> (n_embd).</param>
/// <param name="HeadCount"><c>{arch}.attention.head_count</c> (n_head); null when absent or per-layer and uneven.</param>
/// <param name="HeadCountKv"><c>{arch}.attention.head_count_kv</c>, defaulting to <paramref name="HeadCount"/>.</param>
/// <param name="BlockCount"><c>{arch}.block_count</c> (n_layer).</param>
/// <param name="FeedForwardLength"><c>{arch}.feed_forward_length</c> (n_ff); null when absent or per-layer and uneven.</param>
/// <param name="Tensors">Every tensor name with its ggml dimensions (ne, fastest-varying first).</param>
public sealed record LlamaCppBaseModel(
    string Architecture,
    long EmbeddingLength,
    int? HeadCount,
    int? HeadCountKv,
    int BlockCount,
    long? FeedForwardLength,
    IReadOnlyDictionary<string, long[]> Tensors)
{
    /// <summary>Reads and describes the GGUF base model at <paramref name="path"/> (header only).</summary>
    /// <exception cref="GgufFormatException">The file is not a well-formed GGUF, or lacks a hyperparameter named in the message.</exception>
    public static LlamaCppBaseModel ReadFile(string path) => FromGguf(GgufReader.ReadFile(path));

    /// <exception cref="GgufFormatException">A required hyperparameter is missing; the message names it.</exception>
    public static LlamaCppBaseModel FromGguf(GgufFile gguf)
    {
        ArgumentNullException.ThrowIfNull(gguf);
        var arch = gguf.Architecture
            ?? throw new GgufFormatException("the base model has no general.architecture string");
        var embedding = Integer(gguf, $"{arch}.embedding_length")
            ?? throw new GgufFormatException($"the base model ({arch}) has no integer {arch}.embedding_length");
        var blocks = Integer(gguf, $"{arch}.block_count")
            ?? throw new GgufFormatException($"the base model ({arch}) has no integer {arch}.block_count");
        if (blocks is < 0 or > 100_000)
        {
            throw new GgufFormatException($"the base model's {arch}.block_count is {blocks}");
        }
        var heads = Integer(gguf, $"{arch}.attention.head_count");
        var kvHeads = Integer(gguf, $"{arch}.attention.head_count_kv") ?? heads;
        return new LlamaCppBaseModel(
            arch,
            embedding,
            heads is > 0 and <= int.MaxValue ? (int)heads : null,
            kvHeads is > 0 and <= int.MaxValue ? (int)kvHeads : null,
            (int)blocks,
            Integer(gguf, $"{arch}.feed_forward_length"),
            gguf.Tensors.ToDictionary(t => t.Name, t => t.Ne, StringComparer.Ordinal));
    }

    /// <summary>An integer hyperparameter: a scalar, or a per-layer array whose entries are all equal.</summary>
    private static long? Integer(GgufFile gguf, string key)
    {
        if (!gguf.Metadata.TryGetValue(key, out var value))
        {
            return null;
        }
        if (value.TryGetInt64(out var scalar))
        {
            return scalar;
        }
        if (value.Value is GgufArray { Items: { Length: > 0 } items })
        {
            long? first = null;
            foreach (var item in items)
            {
                if (item is null || !new GgufValue(GgufValueType.Int64, item).TryGetInt64(out var n) || (first is { } f && f != n))
                {
                    return null;
                }
                first = n;
            }
            return first;
        }
        return null;
    }
}
