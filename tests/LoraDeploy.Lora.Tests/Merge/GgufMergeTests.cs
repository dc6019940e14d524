using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text.Json;
using LoraDeploy.Lora.Gguf;
using LoraDeploy.Lora.Merge;
using LoraDeploy.Lora.Tests.Support;

namespace LoraDeploy.Lora.Tests.Merge;

/// <summary>
/// PEFT adapters merged into a tiny Llama GGUF, checked tensor by tensor against plain F64 loops in Hugging Face
/// layout followed by llama.cpp's q/k row permutation written out here; and the inputs such a merge must refuse.
/// (Logits through llama.cpp: LoraDeploy.Tests' GgufMergeLogitsTests.)
/// </summary>
public sealed class GgufMergeTests : IDisposable
{
    private const double Strength = 0.7;
    private readonly string _dir = TempFiles.Directory();

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static TinyLlama Model(GgmlType type = GgmlType.F32, int layers = 2, int feedForward = 48) =>
        new TinyLlama { Hidden = 32, Heads = 4, KvHeads = 2, FeedForward = feedForward, VocabSize = 270, Layers = layers, MatrixType = type, Seed = 3 }.Generate();

    [Theory]
    [InlineData(GgmlType.F32)]
    [InlineData(GgmlType.F16)]
    [InlineData(GgmlType.BF16)]
    public void Every_projection_merges_exactly_in_the_bases_own_type(GgmlType type)
    {
        var model = Model(type);
        var basePath = model.WriteGguf(Path.Combine(_dir, "base.gguf"));
        var fixture = new PeftAdapterFixture { Rank = 4, Alpha = 8 }.Generate(model);
        var (_, adapter) = fixture.WriteTo(Path.Combine(_dir, "adapter"));
        var output = Path.Combine(_dir, "merged.gguf");

        var result = GgufMerger.Merge(basePath, [new MergeAdapter(adapter, Strength)], output);

        Assert.Equal(14, result.TensorsMerged);
        Assert.Equal(14, result.ModulesApplied);
        var merged = GgufReader.ReadFile(output, int.MaxValue);
        var baseFile = GgufReader.ReadFile(basePath, int.MaxValue);
        foreach (var m in fixture.Modules)
        {
            var expected = Reference(model, m, Strength * m.Scale(false), magnitude: null);
            AssertMatches(Gguf(m.Name), expected, Decode(output, merged, Gguf(m.Name)), type);
        }
        // Norms, embeddings and the output layer are untouched: the same bytes.
        foreach (var name in new[] { "token_embd.weight", "output.weight", "output_norm.weight", "blk.0.attn_norm.weight", "blk.1.ffn_norm.weight" })
        {
            Assert.Equal(Bytes(basePath, baseFile, name), Bytes(output, merged, name));
        }
        Assert.Equal(baseFile.Tensors.Select(t => (t.Name, t.Type, string.Join(",", t.Ne))), merged.Tensors.Select(t => (t.Name, t.Type, string.Join(",", t.Ne))));
    }

    [Fact]
    public void Dora_normalises_each_row_in_hugging_face_order_with_the_magnitude_permuted_like_the_rows()
    {
        var model = Model();
        var basePath = model.WriteGguf(Path.Combine(_dir, "base.gguf"));
        var fixture = new PeftAdapterFixture { Rank = 4, Alpha = 8, UseDora = true }.Generate(model);
        var (_, adapter) = fixture.WriteTo(Path.Combine(_dir, "adapter"));
        var output = Path.Combine(_dir, "merged.gguf");

        GgufMerger.Merge(basePath, [new MergeAdapter(adapter, Strength)], output);

        var merged = GgufReader.ReadFile(output);
        foreach (var m in fixture.Modules)
        {
            var actual = Decode(output, merged, Gguf(m.Name));
            AssertMatches(Gguf(m.Name), Reference(model, m, Strength * m.Scale(false), m.Magnitude), actual, GgmlType.F32);
            var plain = Reference(model, m, Strength * m.Scale(false), magnitude: null);
            Assert.True(actual.Zip(plain, (x, y) => Math.Abs(x - y)).Max() > 1e-2, $"{m.Name}: DoRA should differ from ignoring the magnitude");
        }
    }

    [Fact]
    public void Embedding_and_output_layer_adapters_land_on_token_embd_and_output()
    {
        var model = Model();
        var basePath = model.WriteGguf(Path.Combine(_dir, "base.gguf"));
        var fixture = new PeftAdapterFixture { Targets = ["embed_tokens", "lm_head"], Rank = 4, Alpha = 8 }.Generate(model);
        var (_, adapter) = fixture.WriteTo(Path.Combine(_dir, "adapter"));
        var output = Path.Combine(_dir, "merged.gguf");

        var result = GgufMerger.Merge(basePath, [new MergeAdapter(adapter, Strength)], output);

        Assert.Equal(2, result.TensorsMerged);
        var merged = GgufReader.ReadFile(output);
        var head = fixture.Modules.Single(m => m.Name == "lm_head");
        AssertMatches("output.weight", Reference(model, head, Strength * head.Scale(false), magnitude: null), Decode(output, merged, "output.weight"), GgmlType.F32);
        // PEFT's embedding delta is (B·A)ᵀ: A [r, vocab], B [hidden, r]; token_embd holds [vocab, hidden] row-major.
        var embedding = fixture.Modules.Single(m => m.Embedding);
        var (vocab, hidden) = ((int)embedding.In, (int)embedding.Out);
        var w = model.Weights["model.embed_tokens.weight"];
        var expected = new double[vocab * hidden];
        for (var t = 0; t < vocab; t++)
        {
            for (var h = 0; h < hidden; h++)
            {
                double sum = 0;
                for (var k = 0; k < embedding.Rank; k++)
                {
                    sum += (double)embedding.B[h * embedding.Rank + k] * embedding.A[k * vocab + t];
                }
                expected[t * hidden + h] = (float)(w[t * hidden + h] + Strength * embedding.Scale(false) * sum);
            }
        }
        AssertMatches("token_embd.weight", expected, Decode(output, merged, "token_embd.weight"), GgmlType.F32);
    }

    [Fact]
    public void Metadata_is_kept_and_the_merge_is_recorded_with_each_adapters_hash_and_strength()
    {
        var model = Model();
        var basePath = model.WriteGguf(Path.Combine(_dir, "base.gguf"));
        var (_, first) = new PeftAdapterFixture { Seed = 1, Targets = ["q_proj"] }.Generate(model).WriteTo(Path.Combine(_dir, "a"));
        var (_, second) = new PeftAdapterFixture { Seed = 2, Targets = ["q_proj", "down_proj"] }.Generate(model).WriteTo(Path.Combine(_dir, "b"));
        var once = Path.Combine(_dir, "once.gguf");
        var twice = Path.Combine(_dir, "twice.gguf");

        GgufMerger.Merge(basePath, [new MergeAdapter(first, 0.5), new MergeAdapter(second, -1)], once);
        GgufMerger.Merge(once, [new MergeAdapter(first, 2)], twice);

        var baseFile = GgufReader.ReadFile(basePath, int.MaxValue);
        var merged = GgufReader.ReadFile(twice, int.MaxValue);
        foreach (var (key, value) in baseFile.Metadata)
        {
            Assert.Equal(value.Type, merged.Metadata[key].Type);
            Assert.Equal(Flatten(value), Flatten(merged.Metadata[key]));
        }
        Assert.Equal(baseFile.Metadata.Count + 1, merged.Metadata.Count);
        using var record = JsonDocument.Parse(merged.GetString(LoraMerger.MergeRecordKey)!);
        var entries = record.RootElement.EnumerateArray().ToList();
        Assert.Equal([0.5, -1, 2], entries.Select(e => e.GetProperty("strength").GetDouble()));
        Assert.Equal([Sha256(first), Sha256(second), Sha256(first)], entries.Select(e => e.GetProperty("sha256").GetString()));
        Assert.Equal([2, 4, 2], entries.Select(e => e.GetProperty("modules").GetInt32()));
    }

    [Fact]
    public void A_quantized_tensor_an_adapter_touches_is_refused_by_name_and_type()
    {
        var model = Model();
        var basePath = WithQ8(model, "blk.1.attn_k.weight");
        var (_, adapter) = new PeftAdapterFixture { Targets = ["k_proj", "v_proj"] }.Generate(model).WriteTo(Path.Combine(_dir, "adapter"));

        var e = Refused(basePath, adapter);

        Assert.Contains("1 module(s) do not fit the base tensor: adapter_model.safetensors: base_model.model.model.layers.1.self_attn.k_proj → blk.1.attn_k.weight: the base tensor is Q8_0, which merge cannot rewrite (merge into an F32, F16 or BF16 GGUF, then quantize the result)", e.Message);
    }

    [Fact]
    public void An_untouched_quantized_tensor_is_copied_byte_for_byte()
    {
        var model = Model();
        var basePath = WithQ8(model, "blk.1.attn_k.weight");
        var (_, adapter) = new PeftAdapterFixture { Targets = ["v_proj"] }.Generate(model).WriteTo(Path.Combine(_dir, "adapter"));
        var output = Path.Combine(_dir, "merged.gguf");

        var result = GgufMerger.Merge(basePath, [new MergeAdapter(adapter)], output);

        Assert.Equal(2, result.TensorsMerged);
        var merged = GgufReader.ReadFile(output);
        Assert.Equal(8u, merged.TensorsByName["blk.1.attn_k.weight"].Type);
        Assert.Equal(Bytes(basePath, GgufReader.ReadFile(basePath), "blk.1.attn_k.weight"), Bytes(output, merged, "blk.1.attn_k.weight"));
    }

    [Fact]
    public void Shape_mismatches_are_listed()
    {
        var basePath = Model().WriteGguf(Path.Combine(_dir, "base.gguf"));
        var (_, adapter) = new PeftAdapterFixture { Targets = ["gate_proj", "q_proj"] }.Generate(Model(feedForward: 40)).WriteTo(Path.Combine(_dir, "adapter"));

        var e = Refused(basePath, adapter);

        Assert.Contains("2 module(s) do not fit the base tensor: ", e.Message);
        Assert.Contains("adapter_model.safetensors: base_model.model.model.layers.0.mlp.gate_proj → blk.0.ffn_gate.weight: the adapter's LoRA delta is [40, 32], the base tensor [48, 32]", e.Message);
        Assert.Contains("layers.1.mlp.gate_proj → blk.1.ffn_gate.weight", e.Message);
        Assert.DoesNotContain("q_proj", e.Message);
    }

    [Fact]
    public void Modules_with_no_base_tensor_are_an_error_not_skipped()
    {
        var basePath = Model().WriteGguf(Path.Combine(_dir, "base.gguf"));
        var (_, adapter) = new PeftAdapterFixture { Targets = ["o_proj"] }.Generate(Model(layers: 3)).WriteTo(Path.Combine(_dir, "adapter"));

        var e = Refused(basePath, adapter);

        Assert.Equal("cannot merge: 1 adapter module(s) match no tensor of base.gguf (llama): adapter_model.safetensors: base_model.model.model.layers.2.self_attn.o_proj", e.Message);
    }

    [Fact]
    public void A_base_that_is_not_gguf_is_named()
    {
        var model = Model();
        var basePath = new SafetensorsWriter().Tensor("model.layers.0.self_attn.q_proj.weight", "F32", [32, 32]).WriteTo(Path.Combine(_dir, "model.safetensors"));
        var (_, adapter) = new PeftAdapterFixture { Targets = ["q_proj"] }.Generate(model).WriteTo(Path.Combine(_dir, "adapter"));

        var e = Refused(basePath, adapter);

        Assert.StartsWith($"base {basePath} is not a valid GGUF file: ", e.Message);
        Assert.False(GgufMerger.IsGguf(basePath));
    }

    [Fact]
    public void A_full_disk_deletes_the_part_file_and_keeps_an_earlier_output()
    {
        var model = Model();
        var basePath = model.WriteGguf(Path.Combine(_dir, "base.gguf"));
        var (_, adapter) = new PeftAdapterFixture().Generate(model).WriteTo(Path.Combine(_dir, "adapter"));
        var output = Path.Combine(_dir, "merged.gguf");
        File.WriteAllText(output, "an earlier merge");
        var options = new MergeOptions
        {
            OpenOutput = path => new MergeHostileInputTests.FullDiskStream(new FileStream(path, FileMode.Create, FileAccess.Write), capacity: 40_000),
        };

        var e = Assert.Throws<LoraMergeException>(() => GgufMerger.Merge(basePath, [new MergeAdapter(adapter)], output, options));

        Assert.Equal($"writing {output} failed: No space left on device (no output was left)", e.Message);
        Assert.False(File.Exists(output + ".part"));
        Assert.Equal("an earlier merge", File.ReadAllText(output));
    }

    private LoraMergeException Refused(string basePath, string adapter)
    {
        var output = Path.Combine(_dir, "out.gguf");
        var e = Assert.Throws<LoraMergeException>(() => GgufMerger.Merge(basePath, [new MergeAdapter(adapter)], output));
        Assert.False(File.Exists(output));
        Assert.False(File.Exists(output + ".part"));
        return e;
    }

    /// <summary>The model's GGUF with <paramref name="tensor"/> replaced by Q8_0 blocks (random scales and quants).</summary>
    private string WithQ8(TinyLlama model, string tensor)
    {
        var source = model.WriteGguf(Path.Combine(_dir, "f32.gguf"));
        var gguf = GgufReader.ReadFile(source, int.MaxValue);
        var writer = new GgufWriter();
        foreach (var (key, value) in gguf.Metadata)
        {
            writer.Add(key, value);
        }
        foreach (var info in gguf.Tensors)
        {
            if (info.Name == tensor)
            {
                var blocks = new byte[info.Ne[0] * info.Ne[1] / 32 * 34];
                new Random(4).NextBytes(blocks);
                writer.AddTensor(info.Name, 8u, info.Ne, blocks.Length, stream => stream.Write(blocks));
            }
            else
            {
                var bytes = Bytes(source, gguf, info.Name);
                writer.AddTensor(info.Name, info.Type, info.Ne, bytes.Length, stream => stream.Write(bytes));
            }
        }
        var path = Path.Combine(_dir, "q8.gguf");
        writer.WriteTo(path);
        return path;
    }

    /// <summary>llama.cpp's name for a Hugging Face projection module.</summary>
    private static string Gguf(string module)
    {
        var parts = module.Split('.');
        var kind = parts[^1] switch
        {
            "q_proj" => "attn_q", "k_proj" => "attn_k", "v_proj" => "attn_v", "o_proj" => "attn_output",
            "gate_proj" => "ffn_gate", "up_proj" => "ffn_up", _ => "ffn_down",
        };
        return $"blk.{parts[2]}.{kind}.weight";
    }

    /// <summary>
    /// The merged module in GGUF row order, from plain loops: W + c·B·A in F64 (DoRA: each row times m/‖row‖), rounded
    /// to F32, then q/k rows interleaved per head as llama.cpp's converter does (row h·hd + 2i + j ← h·hd + j·hd/2 + i).
    /// </summary>
    private static double[] Reference(TinyLlama model, PeftAdapterFixture.Module m, double c, float[]? magnitude)
    {
        var w = model.Weights[m.Name + ".weight"];
        var (rows, cols) = ((int)m.Out, (int)m.In);
        var hf = new double[rows * cols];
        for (var o = 0; o < rows; o++)
        {
            double squares = 0;
            for (var i = 0; i < cols; i++)
            {
                double sum = 0;
                for (var k = 0; k < m.Rank; k++)
                {
                    sum += (double)m.B[o * m.Rank + k] * m.A[k * cols + i];
                }
                hf[o * cols + i] = w[o * cols + i] + c * sum;
                squares += hf[o * cols + i] * hf[o * cols + i];
            }
            for (var i = 0; i < cols; i++)
            {
                hf[o * cols + i] = (float)(magnitude is null ? hf[o * cols + i] : hf[o * cols + i] * (magnitude[o] / Math.Sqrt(squares)));
            }
        }
        var heads = m.Name.EndsWith("q_proj", StringComparison.Ordinal) ? model.Heads : m.Name.EndsWith("k_proj", StringComparison.Ordinal) ? model.KvHeads : 0;
        if (heads == 0)
        {
            return hf;
        }
        var permuted = new double[hf.Length];
        var headDim = rows / heads;
        for (var h = 0; h < heads; h++)
        {
            for (var i = 0; i < headDim / 2; i++)
            {
                for (var j = 0; j < 2; j++)
                {
                    Array.Copy(hf, (h * headDim + j * headDim / 2 + i) * cols, permuted, (h * headDim + 2 * i + j) * cols, cols);
                }
            }
        }
        return permuted;
    }

    /// <summary>
    /// Each value within one unit in the last place of <paramref name="type"/> of the reference; F32: the 1e-6
    /// of the tensor's largest value (ΔW is accumulated in F32, see <see cref="MergeFixtures.AssertClose"/>).
    /// </summary>
    private static void AssertMatches(string name, double[] expected, double[] actual, GgmlType type)
    {
        Assert.Equal(expected.Length, actual.Length);
        var relative = type switch { GgmlType.F16 => Math.Pow(2, -10), GgmlType.BF16 => Math.Pow(2, -7), _ => 1e-6 };
        var largest = expected.Max(Math.Abs);
        for (var i = 0; i < expected.Length; i++)
        {
            var tolerance = relative * (type == GgmlType.F32 ? largest : Math.Max(Math.Abs(expected[i]), type == GgmlType.F16 ? 6.1e-5 : 1e-30));
            Assert.True(Math.Abs(expected[i] - actual[i]) <= tolerance, $"{name}[{i}]: merged {actual[i]}, reference {expected[i]}");
        }
    }

    private static byte[] Bytes(string path, GgufFile gguf, string name)
    {
        var info = gguf.TensorsByName[name];
        var bytes = new byte[info.ByteLength];
        using var file = File.OpenRead(path);
        file.Position = gguf.DataOffset + info.Offset;
        file.ReadExactly(bytes);
        return bytes;
    }

    private static double[] Decode(string path, GgufFile gguf, string name)
    {
        var bytes = Bytes(path, gguf, name);
        return gguf.TensorsByName[name].Type switch
        {
            0 => [.. Enumerable.Range(0, bytes.Length / 4).Select(i => (double)BinaryPrimitives.ReadSingleLittleEndian(bytes.AsSpan(i * 4)))],
            1 => [.. Enumerable.Range(0, bytes.Length / 2).Select(i => (double)BinaryPrimitives.ReadHalfLittleEndian(bytes.AsSpan(i * 2)))],
            30 => [.. Enumerable.Range(0, bytes.Length / 2).Select(i => (double)BitConverter.UInt32BitsToSingle((uint)BinaryPrimitives.ReadUInt16LittleEndian(bytes.AsSpan(i * 2)) << 16))],
            var other => throw new InvalidOperationException($"type {other}"),
        };
    }

    private static string Flatten(GgufValue value) =>
        value.Value is GgufArray { Items: { } items } ? string.Join("\u0001", items.Cast<object>()) : value.ToString();

    private static string Sha256(string path) => Convert.ToHexStringLower(SHA256.HashData(File.ReadAllBytes(path)));
}
