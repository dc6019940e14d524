using System.Runtime.InteropServices;
using LoraDeploy.Lora.Gguf;

namespace LoraDeploy.Lora.Tests.Support;

/// <summary>
/// A tiny random Llama kept in Hugging Face's own layout (torch [out, in], row-major, rotate-half q/k), written to GGUF
/// the way llama.cpp's converter does it (names mapped, q/k rows permuted). Tests merge LoRA deltas into
/// <see cref="Weights"/> in HF layout and write a second GGUF, which is how runtime adapters are checked for exactness.
/// Shared by the test projects (linked source); the benchmarks generate larger ones with other sizes.
/// </summary>
internal sealed class TinyLlama
{
    public int Hidden { get; init; } = 64;
    public int Layers { get; init; } = 2;
    public int Heads { get; init; } = 4;
    public int KvHeads { get; init; } = 2;
    public int FeedForward { get; init; } = 128;
    public int ContextLength { get; init; } = 256;
    public int VocabSize { get; init; } = 320;
    public int Seed { get; init; } = 1;
    public float WeightStd { get; init; } = 0.2f;
    /// <summary>ggml type of the matrices in the GGUF (F32, F16 or BF16; norms stay F32 as llama.cpp's converter keeps them); generated weights are rounded to it.</summary>
    public GgmlType MatrixType { get; init; } = GgmlType.F32;

    public const string ChatTemplate =
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}" +
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    public int HeadDim => Hidden / Heads;
    public int KvDim => HeadDim * KvHeads;

    /// <summary>HF-named weights, torch layout. Filled by <see cref="Generate"/>; tests may change them before writing.</summary>
    public Dictionary<string, float[]> Weights { get; } = new(StringComparer.Ordinal);

    /// <summary>Torch shape [out, in] (or [n]) of each HF weight.</summary>
    public Dictionary<string, int[]> Shapes { get; } = new(StringComparer.Ordinal);

    /// <summary>The seven LoRA-able projection modules of layer <paramref name="layer"/> with their (in, out) features.</summary>
    public IEnumerable<(string Module, int In, int Out)> Projections(int layer)
    {
        var p = $"model.layers.{layer}.";
        yield return (p + "self_attn.q_proj", Hidden, Hidden);
        yield return (p + "self_attn.k_proj", Hidden, KvDim);
        yield return (p + "self_attn.v_proj", Hidden, KvDim);
        yield return (p + "self_attn.o_proj", Hidden, Hidden);
        yield return (p + "mlp.gate_proj", Hidden, FeedForward);
        yield return (p + "mlp.up_proj", Hidden, FeedForward);
        yield return (p + "mlp.down_proj", FeedForward, Hidden);
    }

    public TinyLlama Generate()
    {
        var random = new Random(Seed);
        Matrix("model.embed_tokens.weight", VocabSize, Hidden, random);
        Matrix("lm_head.weight", VocabSize, Hidden, random);
        Ones("model.norm.weight", Hidden);
        for (var layer = 0; layer < Layers; layer++)
        {
            Ones($"model.layers.{layer}.input_layernorm.weight", Hidden);
            Ones($"model.layers.{layer}.post_attention_layernorm.weight", Hidden);
            foreach (var (module, inFeatures, outFeatures) in Projections(layer))
            {
                Matrix(module + ".weight", outFeatures, inFeatures, random);
            }
        }
        return this;
    }

    /// <summary>Adds <c>scale · B·A</c> to the module's weight, in HF layout (B [out, r], A [r, in], row-major).</summary>
    public void Merge(string module, float[] a, float[] b, int rank, float scale)
    {
        var w = Weights[module + ".weight"];
        var (outFeatures, inFeatures) = (Shapes[module + ".weight"][0], Shapes[module + ".weight"][1]);
        for (var o = 0; o < outFeatures; o++)
        {
            for (var i = 0; i < inFeatures; i++)
            {
                double sum = 0;
                for (var k = 0; k < rank; k++)
                {
                    sum += (double)b[o * rank + k] * a[k * inFeatures + i];
                }
                w[o * inFeatures + i] += (float)(scale * sum);
            }
        }
    }

    public TinyLlama Clone()
    {
        var copy = new TinyLlama
        {
            Hidden = Hidden, Layers = Layers, Heads = Heads, KvHeads = KvHeads, FeedForward = FeedForward,
            ContextLength = ContextLength, VocabSize = VocabSize, Seed = Seed, WeightStd = WeightStd, MatrixType = MatrixType,
        };
        foreach (var (name, values) in Weights)
        {
            copy.Weights[name] = (float[])values.Clone();
            copy.Shapes[name] = Shapes[name];
        }
        return copy;
    }

    /// <summary>Writes the model as a llama.cpp GGUF (F32), the way convert_hf_to_gguf.py lays out a Llama.</summary>
    public string WriteGguf(string path)
    {
        var (tokens, scores, types) = Vocabulary();
        var writer = new GgufWriter()
            .Add("general.architecture", "llama")
            .Add("general.name", "tiny-llama-test")
            .Add("llama.context_length", (uint)ContextLength)
            .Add("llama.embedding_length", (uint)Hidden)
            .Add("llama.block_count", (uint)Layers)
            .Add("llama.feed_forward_length", (uint)FeedForward)
            .Add("llama.attention.head_count", (uint)Heads)
            .Add("llama.attention.head_count_kv", (uint)KvHeads)
            .Add("llama.attention.layer_norm_rms_epsilon", 1e-5f)
            .Add("llama.rope.dimension_count", (uint)HeadDim)
            .Add("llama.rope.freq_base", 10000f)
            .Add("tokenizer.ggml.model", "llama")
            .Add("tokenizer.ggml.tokens", tokens)
            .Add("tokenizer.ggml.scores", scores)
            .Add("tokenizer.ggml.token_type", types)
            .Add("tokenizer.ggml.bos_token_id", 1u)
            .Add("tokenizer.ggml.eos_token_id", 2u)
            .Add("tokenizer.ggml.unknown_token_id", 0u)
            .Add("tokenizer.chat_template", ChatTemplate);

        Tensor(writer, "token_embd.weight", "model.embed_tokens.weight");
        Tensor(writer, "output_norm.weight", "model.norm.weight");
        Tensor(writer, "output.weight", "lm_head.weight");
        for (var layer = 0; layer < Layers; layer++)
        {
            var hf = $"model.layers.{layer}.";
            var gg = $"blk.{layer}.";
            Tensor(writer, gg + "attn_norm.weight", hf + "input_layernorm.weight");
            Tensor(writer, gg + "attn_q.weight", hf + "self_attn.q_proj.weight", Heads);
            Tensor(writer, gg + "attn_k.weight", hf + "self_attn.k_proj.weight", KvHeads);
            Tensor(writer, gg + "attn_v.weight", hf + "self_attn.v_proj.weight");
            Tensor(writer, gg + "attn_output.weight", hf + "self_attn.o_proj.weight");
            Tensor(writer, gg + "ffn_norm.weight", hf + "post_attention_layernorm.weight");
            Tensor(writer, gg + "ffn_gate.weight", hf + "mlp.gate_proj.weight");
            Tensor(writer, gg + "ffn_up.weight", hf + "mlp.up_proj.weight");
            Tensor(writer, gg + "ffn_down.weight", hf + "mlp.down_proj.weight");
        }
        writer.WriteTo(path);
        return path;
    }

    /// <summary>
    /// SPM vocabulary: &lt;unk&gt;, &lt;s&gt;, &lt;/s&gt;, the 256 byte tokens (so any UTF-8 text tokenizes), the chat
    /// markers, then word pieces up to <see cref="VocabSize"/>.
    /// </summary>
    private (List<string> Tokens, List<float> Scores, List<int> Types) Vocabulary()
    {
        var tokens = new List<string> { "<unk>", "<s>", "</s>" };
        var types = new List<int> { 2, 3, 3 };
        for (var b = 0; b < 256; b++)
        {
            tokens.Add($"<0x{b:X2}>");
            types.Add(6);
        }
        tokens.AddRange(["<|im_start|>", "<|im_end|>"]);
        types.AddRange([3, 3]);
        string[] words = ["▁", "▁hello", "▁world", "▁the", "▁a", "▁is", "▁of", "▁and", "▁to", "▁in", "user", "assistant", "system"];
        var next = 0;
        while (tokens.Count < VocabSize)
        {
            tokens.Add(next < words.Length ? words[next] : "▁w" + next);
            types.Add(1);
            next++;
        }
        var scores = tokens.Select((_, i) => types[i] == 1 ? -i : 0f).ToList();
        return (tokens, scores, types);
    }

    private void Tensor(GgufWriter writer, string ggufName, string hfName, int permuteHeads = 0)
    {
        var shape = Shapes[hfName];
        var type = shape.Length == 1 ? GgmlType.F32 : MatrixType;
        var bytes = Encode(Weights[hfName], type);
        if (permuteHeads > 0)
        {
            bytes = LlamaRopePermutation.PermuteRows(bytes, shape[0], permuteHeads);
        }
        long[] ne = shape.Length == 1 ? [shape[0]] : [shape[1], shape[0]];
        writer.AddTensor(ggufName, type, ne, bytes);
    }

    /// <summary>Little-endian bytes of <paramref name="values"/> in <paramref name="type"/>, rounded to nearest even.</summary>
    public static byte[] Encode(float[] values, GgmlType type)
    {
        if (type == GgmlType.F32)
        {
            return MemoryMarshal.AsBytes(values.AsSpan()).ToArray();
        }
        var bytes = new byte[values.Length * 2];
        for (var i = 0; i < values.Length; i++)
        {
            var bits = type == GgmlType.F16 ? BitConverter.HalfToUInt16Bits((Half)values[i]) : ToBFloat16(values[i]);
            System.Buffers.Binary.BinaryPrimitives.WriteUInt16LittleEndian(bytes.AsSpan(i * 2), bits);
        }
        return bytes;
    }

    /// <summary>The value rounded to <paramref name="type"/> and widened back.</summary>
    public static float Round(float value, GgmlType type) => type switch
    {
        GgmlType.F16 => (float)(Half)value,
        GgmlType.BF16 => BitConverter.UInt32BitsToSingle((uint)ToBFloat16(value) << 16),
        _ => value,
    };

    private static ushort ToBFloat16(float value)
    {
        var bits = BitConverter.SingleToUInt32Bits(value);
        return (ushort)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    }

    private void Matrix(string name, int rows, int cols, Random random)
    {
        var values = new float[rows * cols];
        for (var i = 0; i < values.Length; i++)
        {
            values[i] = Round(Normal(random) * WeightStd, MatrixType);
        }
        Weights[name] = values;
        Shapes[name] = [rows, cols];
    }

    private void Ones(string name, int n)
    {
        Weights[name] = Enumerable.Repeat(1f, n).ToArray();
        Shapes[name] = [n];
    }

    internal static float Normal(Random random)
    {
        // Box–Muller: the tests want reproducible Gaussian-ish weights without a dependency.
        var u1 = 1.0 - random.NextDouble();
        var u2 = random.NextDouble();
        return (float)(Math.Sqrt(-2.0 * Math.Log(u1)) * Math.Cos(2 * Math.PI * u2));
    }
}
