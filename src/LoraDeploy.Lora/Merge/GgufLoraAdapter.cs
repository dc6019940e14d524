using LoraDeploy.Lora.Gguf;
using LoraDeploy.Lora.Safetensors;

namespace LoraDeploy.Lora.Merge;

/// <summary>
/// Reads a llama.cpp LoRA GGUF (<c>general.type = adapter</c>, <c>adapter.type = lora</c>: what
/// <see cref="Peft.PeftLoraConverter"/> and llama.cpp's own converter write) into modules named by the base tensor they
/// patch, with the deltas and scales llama.cpp applies at run time.
/// </summary>
/// <remarks>
/// <para>Layout, as llama.cpp reads it: a matrix <c>W</c> (ne [in, out], Hugging Face [out, in]) has <c>W.lora_a</c>
/// ne [in, r] and <c>W.lora_b</c> ne [r, out], and llama.cpp computes <c>b·(a·x)</c>, so ΔW = B·A with B [out, r] and
/// A [r, in] row-major: the bytes as they are. <c>token_embd.weight</c> (ne [hidden, vocab]) is the exception: a has
/// ne [r, vocab] and b ne [r, hidden], and llama.cpp gathers a's row of each token and multiplies it by b, so ΔE
/// [vocab, hidden] = a·bᵀ.</para>
/// <para>Scale: llama.cpp's, per pair: alpha/r with alpha = <c>adapter.lora.alpha</c> (absent reads as 0) and
/// r = lora_b's ne[0], or 1 when alpha is 0 — the converter writes 0 and has folded PEFT's exact scale (rsLoRA,
/// rank/alpha patterns) into lora_b. Rows are already in the base's order (the converter permuted lora_b of llama
/// q/k like the base), so nothing is permuted again.</para>
/// </remarks>
internal static class GgufLoraAdapter
{
    private const string LoraA = ".lora_a";
    private const string LoraB = ".lora_b";
    private const string TokenEmbedding = "token_embd.weight";
    private const int MaxErrors = 10;

    /// <param name="baseArchitecture">The base's <c>general.architecture</c>, which the adapter's must equal (as llama.cpp checks); null to skip.</param>
    public static LoadedAdapter Load(MergeAdapter adapter, string? baseArchitecture)
    {
        if (!double.IsFinite(adapter.Strength))
        {
            throw new LoraMergeException($"adapter {adapter.Path}: strength {adapter.Strength} is not a finite number");
        }
        if (adapter.PeftConfig is not null)
        {
            throw new LoraMergeException($"adapter {adapter.Path} is a llama.cpp LoRA GGUF, which carries its own scale; a PEFT adapter_config.json does not apply to it");
        }
        var gguf = ReadHeader(adapter.Path);
        CheckMetadata(adapter.Path, gguf, baseArchitecture);
        var alpha = gguf.GetFloat32("adapter.lora.alpha") ?? 0f;
        if (!float.IsFinite(alpha))
        {
            throw new LoraMergeException($"adapter {adapter.Path}: adapter.lora.alpha is {alpha}");
        }

        var errors = new List<string>();
        var pairs = new Dictionary<string, (GgufTensorInfo? A, GgufTensorInfo? B)>(StringComparer.Ordinal);
        var order = new List<string>();
        foreach (var info in gguf.Tensors)
        {
            var isA = info.Name.EndsWith(LoraA, StringComparison.Ordinal);
            if ((!isA && !info.Name.EndsWith(LoraB, StringComparison.Ordinal)) || info.Name.Length == LoraA.Length)
            {
                // llama.cpp skips *_norm.weight tensors silently; a merge that did so would drop what the adapter holds.
                errors.Add($"tensor '{info.Name}' is not a lora_a or lora_b factor (names end in .lora_a / .lora_b); merge applies LoRA pairs only");
                continue;
            }
            var target = info.Name[..^LoraA.Length];
            if (!pairs.TryGetValue(target, out var pair))
            {
                order.Add(target);
            }
            pairs[target] = isA ? pair with { A = info } : pair with { B = info };
        }
        if (errors.Count == 0 && order.Count == 0)
        {
            errors.Add("it holds no lora_a/lora_b tensors");
        }

        var modules = new List<ModulePatch>(order.Count);
        using (var file = new FileStream(adapter.Path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1))
        {
            foreach (var target in order)
            {
                var (a, b) = pairs[target];
                if (a is null || b is null)
                {
                    var (present, missing) = a is null ? (LoraB, LoraA) : (LoraA, LoraB);
                    errors.Add($"tensor '{target}{present}' has no partner '{target}{missing}'; a LoRA needs both");
                    continue;
                }
                try
                {
                    modules.Add(Module(file, gguf, target, a, b, alpha));
                }
                catch (LoraMergeException e)
                {
                    errors.Add(e.Message);
                }
            }
        }
        if (errors.Count > 0)
        {
            throw new LoraMergeException($"adapter {adapter.Path}: {errors.Count} problem(s): " + string.Join("; ", errors.Take(MaxErrors)) + (errors.Count > MaxErrors ? "; …" : ""));
        }
        return new LoadedAdapter
        {
            Path = adapter.Path,
            Sha256 = SafetensorsHashes.FileSha256(adapter.Path),
            Strength = adapter.Strength,
            Modules = modules,
        };
    }

    private static GgufFile ReadHeader(string path)
    {
        try
        {
            return GgufReader.ReadFile(path);
        }
        catch (GgufFormatException e)
        {
            throw new LoraMergeException($"adapter {path} is not a valid GGUF file: {e.Message}", e);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new LoraMergeException($"adapter {path}: {e.Message}", e);
        }
    }

    /// <summary>The checks llama.cpp makes before it loads an adapter, and a refusal of activated LoRAs.</summary>
    private static void CheckMetadata(string path, GgufFile gguf, string? baseArchitecture)
    {
        if (gguf.GetString("general.type") is var type && type != "adapter")
        {
            throw new LoraMergeException($"adapter {path} is a GGUF file but not a llama.cpp adapter: its general.type is {Quoted(type)}, not 'adapter' (is it a model?)");
        }
        if (gguf.GetString("adapter.type") is var adapterType && adapterType != "lora")
        {
            throw new LoraMergeException($"adapter {path} is a llama.cpp adapter of type {Quoted(adapterType)}; merge applies adapter.type 'lora' only");
        }
        if (baseArchitecture is not null && gguf.Architecture != baseArchitecture)
        {
            throw new LoraMergeException($"adapter {path} is a LoRA for {Quoted(gguf.Architecture)} models, the base is {Quoted(baseArchitecture)} (is it for another base model?)");
        }
        if (gguf.Metadata.ContainsKey("adapter.alora.invocation_tokens"))
        {
            throw new LoraMergeException($"adapter {path} is an activated LoRA (adapter.alora.invocation_tokens): llama.cpp applies it only after its invocation tokens, which merged weights cannot do");
        }
    }

    private static string Quoted(string? value) => value is null ? "(none)" : $"'{value}'";

    private static ModulePatch Module(FileStream file, GgufFile gguf, string target, GgufTensorInfo a, GgufTensorInfo b, float alpha)
    {
        if (a.Ne.Length != 2 || b.Ne.Length != 2)
        {
            var bad = a.Ne.Length != 2 ? a : b;
            throw new LoraMergeException($"tensor '{bad.Name}' has ne {Ne(bad.Ne)}; a LoRA factor is a matrix");
        }
        var embedding = target.EndsWith(TokenEmbedding, StringComparison.Ordinal);
        // Linear: a [in, r], b [r, out]. token_embd: a [r, vocab], b [r, hidden].
        var rank = b.Ne[0];
        var rankOfA = embedding ? a.Ne[0] : a.Ne[1];
        if (rankOfA != rank || rank is < 1 or > int.MaxValue)
        {
            throw new LoraMergeException(embedding
                ? $"'{a.Name}' ne {Ne(a.Ne)} and '{b.Name}' ne {Ne(b.Ne)} disagree on the rank (for token_embd, a is [r, vocab] and b [r, hidden])"
                : $"'{a.Name}' ne {Ne(a.Ne)} and '{b.Name}' ne {Ne(b.Ne)} disagree on the rank (a is [in, r] and b [r, out]; llama.cpp: lora_a is not transposed)");
        }
        var valuesA = Read(file, gguf, a);
        var valuesB = Read(file, gguf, b);
        var r = (int)rank;
        LowRankDelta delta;
        if (embedding)
        {
            long vocab = a.Ne[1], hidden = b.Ne[1];
            delta = new LowRankDelta(valuesA, Transpose(valuesB, (int)hidden, r), r) { Out = vocab, Rest = hidden, FullShape = [vocab, hidden] };
        }
        else
        {
            long inDim = a.Ne[0], outDim = b.Ne[1];
            delta = new LowRankDelta(valuesB, valuesA, r) { Out = outDim, Rest = inDim, FullShape = [outDim, inDim] };
        }
        return new ModulePatch
        {
            Module = target,
            NetworkType = embedding ? "LoRA (embedding)" : "LoRA",
            Delta = delta,
            // llama.cpp: alpha ? scale·alpha/rank : scale.
            Scale = alpha != 0 ? (double)alpha / rank : 1.0,
        };
    }

    private static float[] Read(FileStream file, GgufFile gguf, GgufTensorInfo info)
    {
        var dtype = info.Type switch
        {
            (uint)GgmlType.F32 => "F32",
            (uint)GgmlType.F16 => "F16",
            (uint)GgmlType.BF16 => "BF16",
            _ => throw new LoraMergeException($"tensor '{info.Name}' is {info.TypeName}; only F32, F16 and BF16 adapters can be merged"),
        };
        if (info.ByteLength > Array.MaxLength)
        {
            throw new LoraMergeException($"tensor '{info.Name}' is {info.ByteLength} bytes, too large for an adapter factor");
        }
        var bytes = new byte[info.ByteLength];
        try
        {
            file.Position = gguf.DataOffset + info.Offset;
            file.ReadExactly(bytes);
        }
        catch (EndOfStreamException e)
        {
            throw new LoraMergeException($"the file ended while reading tensor '{info.Name}' (it changed or is truncated)", e);
        }
        var values = new float[bytes.Length / FloatCodec.ElementSize(dtype)];
        FloatCodec.Decode(bytes, dtype, values);
        var bad = Array.FindIndex(values, v => !float.IsFinite(v));
        if (bad >= 0)
        {
            throw new LoraMergeException($"tensor '{info.Name}' holds {values[bad]} at element {bad}; an adapter with NaN/Inf cannot be merged");
        }
        return values;
    }

    /// <summary>A row-major [rows, columns] matrix transposed; float to float, so exact.</summary>
    private static float[] Transpose(float[] values, int rows, int columns)
    {
        var transposed = new float[values.Length];
        for (var row = 0; row < rows; row++)
        {
            for (var column = 0; column < columns; column++)
            {
                transposed[column * rows + row] = values[row * columns + column];
            }
        }
        return transposed;
    }

    private static string Ne(long[] ne) => "[" + string.Join(", ", ne) + "]";
}
