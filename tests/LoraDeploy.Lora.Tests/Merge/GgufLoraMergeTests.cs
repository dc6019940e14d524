using LoraDeploy.Lora.Gguf;
using LoraDeploy.Lora.Merge;
using LoraDeploy.Lora.Peft;
using LoraDeploy.Lora.Tests.Support;

namespace LoraDeploy.Lora.Tests.Merge;

/// <summary>
/// A llama.cpp LoRA GGUF (what <see cref="PeftLoraConverter"/> made of a PEFT adapter, as the server stores it) merged
/// into a tiny Llama GGUF: the same tensors as merging the PEFT original (whose merge GgufMergeTests checks against
/// plain loops) — bit for bit when alpha/r is a power of two, within one F32 ulp otherwise, since the converter then
/// rounds lora_b·(alpha/r) to F32 before the merge multiplies; llama.cpp's scale (alpha/r per pair, 1 for alpha 0);
/// and the adapters such a merge must refuse. (Logits through llama.cpp: LoraDeploy.Tests' GgufMergeLogitsTests.)
/// </summary>
public sealed class GgufLoraMergeTests : IDisposable
{
    private readonly string _dir = TempFiles.Directory();

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static TinyLlama Model(GgmlType type = GgmlType.F32, int layers = 2, int feedForward = 48) =>
        new TinyLlama { Hidden = 32, Heads = 4, KvHeads = 2, FeedForward = feedForward, VocabSize = 270, Layers = layers, MatrixType = type, Seed = 3 }.Generate();

    /// <param name="adapterDtype">The PEFT factors' dtype: the converter keeps F16 and widens BF16 to F32.</param>
    [Theory]
    [InlineData(GgmlType.F32, 0.7, "F32")]
    [InlineData(GgmlType.F32, -1.5, "F16")]
    [InlineData(GgmlType.F16, 0.7, "F32")]
    [InlineData(GgmlType.BF16, 2, "BF16")]
    public void A_converted_lora_merges_bit_for_bit_like_its_peft_original(GgmlType type, double strength, string adapterDtype)
    {
        var model = Model(type);
        var basePath = model.WriteGguf(Path.Combine(_dir, "base.gguf"));
        // alpha/r = 2 (exact), every projection plus the embedding and the output layer.
        var fixture = new PeftAdapterFixture { Rank = 4, Alpha = 8, Dtype = adapterDtype, Targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"] };
        var (peft, converted) = Adapters(fixture, model, basePath);
        // The export runner copies the stored blob under a name that need not end in .gguf: the magic decides.
        var stored = Path.Combine(_dir, "stored", "adapter.safetensors");
        Directory.CreateDirectory(Path.GetDirectoryName(stored)!);
        File.Copy(converted, stored);

        var fromPeft = GgufMerger.Merge(basePath, [new MergeAdapter(peft, strength)], Path.Combine(_dir, "from-peft.gguf"));
        var fromGguf = GgufMerger.Merge(basePath, [new MergeAdapter(stored, strength)], Path.Combine(_dir, "from-gguf.gguf"));

        Assert.Equal(16, fromGguf.TensorsMerged);
        Assert.Equal(16, fromGguf.ModulesApplied);
        Assert.Equal(16, Assert.Single(fromGguf.Adapters).Modules);
        var expected = GgufReader.ReadFile(fromPeft.OutputPath, int.MaxValue);
        var actual = GgufReader.ReadFile(fromGguf.OutputPath, int.MaxValue);
        var baseFile = GgufReader.ReadFile(basePath, int.MaxValue);
        Assert.Equal(expected.Tensors.Select(t => (t.Name, t.Type, string.Join(",", t.Ne))), actual.Tensors.Select(t => (t.Name, t.Type, string.Join(",", t.Ne))));
        var changed = 0;
        foreach (var info in expected.Tensors)
        {
            var bytes = Bytes(fromGguf.OutputPath, actual, info.Name);
            Assert.True(Bytes(fromPeft.OutputPath, expected, info.Name).AsSpan().SequenceEqual(bytes), $"{info.Name} differs from the PEFT merge");
            changed += Bytes(basePath, baseFile, info.Name).AsSpan().SequenceEqual(bytes) ? 0 : 1;
        }
        Assert.Equal(16, changed);
    }

    [Fact]
    public void A_scale_the_converter_rounds_into_lora_b_moves_each_value_by_no_more_than_that_rounding()
    {
        const double strength = 0.7;
        var model = Model();
        var basePath = model.WriteGguf(Path.Combine(_dir, "base.gguf"));
        // rsLoRA 4/√8 and an alpha pattern of 6/√8: lora_b·scale is rounded to F32 in the converted file.
        var fixture = new PeftAdapterFixture { Rank = 8, Alpha = 4, UseRslora = true, AlphaPattern = new() { ["v_proj"] = 6 } };
        var (peft, converted) = Adapters(fixture, model, basePath);

        var fromPeft = GgufMerger.Merge(basePath, [new MergeAdapter(peft, strength)], Path.Combine(_dir, "from-peft.gguf")).OutputPath;
        var fromGguf = GgufMerger.Merge(basePath, [new MergeAdapter(converted, strength)], Path.Combine(_dir, "from-gguf.gguf")).OutputPath;

        // Rounding lora_b·s to F32 moves each product by at most 2⁻²⁴ of itself, so a merged value may differ from the
        // PEFT merge's by that much of c·Σ|b||a| (over the converted factors) plus one ulp of the final rounding; and
        // each merge accumulates ΔW in F32: rank fused multiply-adds and c rounded to F32, each off by at most 2⁻²⁴ of
        // c·Σ|b||a|, in both merges.
        var adapter = GgufReader.ReadFile(converted);
        var expectedFile = GgufReader.ReadFile(fromPeft);
        var actualFile = GgufReader.ReadFile(fromGguf);
        long differing = 0, total = 0;
        var worst = 0.0;
        foreach (var info in adapter.Tensors.Where(t => t.Name.EndsWith(".lora_a", StringComparison.Ordinal)))
        {
            var name = info.Name[..^".lora_a".Length];
            var a = Floats(Bytes(converted, adapter, info.Name));
            var b = Floats(Bytes(converted, adapter, name + ".lora_b"));
            var (inDim, rank) = ((int)info.Ne[0], (int)info.Ne[1]);
            var expected = Floats(Bytes(fromPeft, expectedFile, name));
            var actual = Floats(Bytes(fromGguf, actualFile, name));
            for (var e = 0; e < expected.Length; e++)
            {
                var (o, i) = (e / inDim, e % inDim);
                double magnitude = 0;
                for (var k = 0; k < rank; k++)
                {
                    magnitude += Math.Abs((double)b[o * rank + k] * a[k * inDim + i]);
                }
                var allowed = (double)MathF.BitIncrement(Math.Abs(expected[e])) - Math.Abs(expected[e]) + (1 + 2 * (rank + 1)) * Math.Pow(2, -24) * strength * magnitude;
                var diff = Math.Abs((double)expected[e] - actual[e]);
                Assert.True(diff <= allowed, $"{name}[{e}]: {actual[e]} merged from the GGUF, {expected[e]} from the PEFT adapter (allowed {allowed})");
                worst = Math.Max(worst, diff / allowed);
                differing += diff > 0 ? 1 : 0;
                total++;
            }
        }
        TestContext.Current.TestOutputHelper?.WriteLine($"{differing} of {total} merged values differ from the PEFT merge, at most {worst:P0} of the allowed difference");
        Assert.True(differing > 0, "with a scale that is not a power of two, some values should differ (else this test checks nothing)");
    }

    [Fact]
    public void Alpha_in_the_file_scales_each_pair_by_alpha_over_its_own_rank_as_llama_cpp_does()
    {
        var model = Model();
        var basePath = model.WriteGguf(Path.Combine(_dir, "base.gguf"));
        // q_proj rank 8, the rest rank 4: written with adapter.lora.alpha = 8 (as llama.cpp's own converter would), q is
        // scaled by 1 and the rest by 2.
        var fixture = new PeftAdapterFixture { Rank = 4, Alpha = 8, RankPattern = new() { ["q_proj"] = 8 }, AlphaPattern = new() { ["q_proj"] = 8 }, Targets = ["q_proj", "v_proj", "down_proj"] };
        var (_, converted) = Adapters(fixture, model, basePath);
        var withAlpha = Rewrite(converted, "alpha.gguf", metadata: (key, value) => key == "adapter.lora.alpha" ? new GgufValue(GgufValueType.Float32, 8f) : value);

        var merged = GgufMerger.Merge(basePath, [new MergeAdapter(withAlpha, 0.5)], Path.Combine(_dir, "merged.gguf")).OutputPath;
        var once = GgufMerger.Merge(basePath, [new MergeAdapter(converted, 0.5)], Path.Combine(_dir, "once.gguf")).OutputPath;
        var twice = GgufMerger.Merge(basePath, [new MergeAdapter(converted, 1.0)], Path.Combine(_dir, "twice.gguf")).OutputPath;

        var gguf = GgufReader.ReadFile(merged);
        foreach (var layer in new[] { 0, 1 })
        {
            Assert.Equal(Bytes(once, GgufReader.ReadFile(once), $"blk.{layer}.attn_q.weight"), Bytes(merged, gguf, $"blk.{layer}.attn_q.weight"));
            Assert.Equal(Bytes(twice, GgufReader.ReadFile(twice), $"blk.{layer}.attn_v.weight"), Bytes(merged, gguf, $"blk.{layer}.attn_v.weight"));
            Assert.Equal(Bytes(twice, GgufReader.ReadFile(twice), $"blk.{layer}.ffn_down.weight"), Bytes(merged, gguf, $"blk.{layer}.ffn_down.weight"));
        }
    }

    [Fact]
    public void Strength_zero_leaves_every_tensor_as_it_was()
    {
        var model = Model();
        var basePath = model.WriteGguf(Path.Combine(_dir, "base.gguf"));
        var (_, converted) = Adapters(new PeftAdapterFixture(), model, basePath);

        var output = GgufMerger.Merge(basePath, [new MergeAdapter(converted, 0)], Path.Combine(_dir, "merged.gguf")).OutputPath;

        var baseFile = GgufReader.ReadFile(basePath);
        var merged = GgufReader.ReadFile(output);
        Assert.All(baseFile.Tensors, t => Assert.Equal(Bytes(basePath, baseFile, t.Name), Bytes(output, merged, t.Name)));
    }

    [Fact]
    public void Shape_mismatches_are_listed_by_tensor()
    {
        var basePath = Model().WriteGguf(Path.Combine(_dir, "base.gguf"));
        var other = Model(feedForward: 40);
        var (_, converted) = Adapters(new PeftAdapterFixture { Targets = ["gate_proj", "q_proj"] }, other, other.WriteGguf(Path.Combine(_dir, "other.gguf")));

        var e = Refused(basePath, converted);

        Assert.Equal(
            "cannot merge: 2 module(s) do not fit the base tensor: adapter.gguf: blk.0.ffn_gate.weight.lora_a/.lora_b: the adapter's LoRA delta is [40, 32], the base tensor [48, 32], " +
            "adapter.gguf: blk.1.ffn_gate.weight.lora_a/.lora_b: the adapter's LoRA delta is [40, 32], the base tensor [48, 32]",
            e.Message);
    }

    [Fact]
    public void Pairs_with_no_base_tensor_are_an_error_not_skipped()
    {
        var basePath = Model().WriteGguf(Path.Combine(_dir, "base.gguf"));
        var other = Model(layers: 3);
        var (_, converted) = Adapters(new PeftAdapterFixture { Targets = ["o_proj"] }, other, other.WriteGguf(Path.Combine(_dir, "other.gguf")));

        var e = Refused(basePath, converted);

        Assert.Equal("cannot merge: 1 adapter module(s) match no tensor of base.gguf (llama): adapter.gguf: blk.2.attn_output.weight.lora_a/.lora_b", e.Message);
    }

    [Fact]
    public void A_lone_lora_a_or_lora_b_is_an_error_naming_its_missing_partner()
    {
        var model = Model();
        var basePath = model.WriteGguf(Path.Combine(_dir, "base.gguf"));
        var (_, converted) = Adapters(new PeftAdapterFixture { Targets = ["q_proj", "v_proj"] }, model, basePath);
        var lone = Rewrite(converted, "lone.gguf", keep: name => name is not ("blk.0.attn_q.weight.lora_b" or "blk.1.attn_v.weight.lora_a"));

        var e = Refused(basePath, lone);

        Assert.Equal(
            $"adapter {lone}: 2 problem(s): tensor 'blk.0.attn_q.weight.lora_a' has no partner 'blk.0.attn_q.weight.lora_b'; a LoRA needs both; " +
            "tensor 'blk.1.attn_v.weight.lora_b' has no partner 'blk.1.attn_v.weight.lora_a'; a LoRA needs both",
            e.Message);
    }

    [Fact]
    public void Factors_that_disagree_on_the_rank_are_named()
    {
        var model = Model();
        var basePath = model.WriteGguf(Path.Combine(_dir, "base.gguf"));
        var (_, narrow) = Adapters(new PeftAdapterFixture { Rank = 4, Targets = ["v_proj"], LayersToTransform = [0] }, model, basePath, "narrow");
        var (_, wide) = Adapters(new PeftAdapterFixture { Rank = 8, Targets = ["v_proj"], LayersToTransform = [0] }, model, basePath, "wide");
        var mixed = Path.Combine(_dir, "mixed.gguf");
        var narrowFile = GgufReader.ReadFile(narrow, int.MaxValue);
        var wideFile = GgufReader.ReadFile(wide, int.MaxValue);
        var writer = new GgufWriter();
        foreach (var (key, value) in narrowFile.Metadata)
        {
            writer.Add(key, value);
        }
        Copy(writer, narrow, narrowFile, "blk.0.attn_v.weight.lora_a");
        Copy(writer, wide, wideFile, "blk.0.attn_v.weight.lora_b");
        writer.WriteTo(mixed);

        var e = Refused(basePath, mixed);

        Assert.Equal(
            $"adapter {mixed}: 1 problem(s): 'blk.0.attn_v.weight.lora_a' ne [32, 4] and 'blk.0.attn_v.weight.lora_b' ne [8, 16] disagree on the rank (a is [in, r] and b [r, out]; llama.cpp: lora_a is not transposed)",
            e.Message);
    }

    [Fact]
    public void Tensors_that_are_not_lora_factors_are_refused_not_dropped()
    {
        var model = Model();
        var basePath = model.WriteGguf(Path.Combine(_dir, "base.gguf"));
        var (_, converted) = Adapters(new PeftAdapterFixture { Targets = ["q_proj"] }, model, basePath);
        var source = GgufReader.ReadFile(converted, int.MaxValue);
        var writer = new GgufWriter();
        foreach (var (key, value) in source.Metadata)
        {
            writer.Add(key, value);
        }
        foreach (var info in source.Tensors)
        {
            Copy(writer, converted, source, info.Name);
        }
        writer.AddTensor("blk.0.attn_norm.weight", [32], new float[32]);
        var withNorm = Path.Combine(_dir, "norm.gguf");
        writer.WriteTo(withNorm);

        var e = Refused(basePath, withNorm);

        Assert.Equal($"adapter {withNorm}: 1 problem(s): tensor 'blk.0.attn_norm.weight' is not a lora_a or lora_b factor (names end in .lora_a / .lora_b); merge applies LoRA pairs only", e.Message);
    }

    [Fact]
    public void A_gguf_that_is_not_a_lora_for_this_architecture_is_refused()
    {
        var model = Model();
        var basePath = model.WriteGguf(Path.Combine(_dir, "base.gguf"));
        var (_, converted) = Adapters(new PeftAdapterFixture { Targets = ["q_proj"] }, model, basePath);
        var qwen = Rewrite(converted, "qwen.gguf", metadata: (key, value) => key == "general.architecture" ? new GgufValue(GgufValueType.String, "qwen2") : value);
        var alora = Rewrite(converted, "alora.gguf", extra: w => w.Add("adapter.alora.invocation_tokens", (IReadOnlyList<uint>)[1u, 2u]));

        Assert.Equal($"adapter {qwen} is a LoRA for 'qwen2' models, the base is 'llama' (is it for another base model?)", Refused(basePath, qwen).Message);
        Assert.Equal($"adapter {basePath} is a GGUF file but not a llama.cpp adapter: its general.type is (none), not 'adapter' (is it a model?)", Refused(basePath, basePath).Message);
        Assert.StartsWith($"adapter {alora} is an activated LoRA (adapter.alora.invocation_tokens)", Refused(basePath, alora).Message);
    }

    [Fact]
    public void NaN_in_a_factor_is_refused_by_tensor_and_element()
    {
        var model = Model();
        var basePath = model.WriteGguf(Path.Combine(_dir, "base.gguf"));
        var (_, converted) = Adapters(new PeftAdapterFixture { Targets = ["k_proj"] }, model, basePath);
        var source = GgufReader.ReadFile(converted, int.MaxValue);
        var writer = new GgufWriter();
        foreach (var (key, value) in source.Metadata)
        {
            writer.Add(key, value);
        }
        foreach (var info in source.Tensors)
        {
            var bytes = Bytes(converted, source, info.Name);
            if (info.Name == "blk.1.attn_k.weight.lora_b")
            {
                BitConverter.GetBytes(float.NaN).CopyTo(bytes, 4 * 5);
            }
            writer.AddTensor(info.Name, info.Type, info.Ne, bytes.Length, stream => stream.Write(bytes));
        }
        var broken = Path.Combine(_dir, "nan.gguf");
        writer.WriteTo(broken);

        var e = Refused(basePath, broken);

        Assert.Equal($"adapter {broken}: 1 problem(s): tensor 'blk.1.attn_k.weight.lora_b' holds NaN at element 5; an adapter with NaN/Inf cannot be merged", e.Message);
    }

    /// <summary>The PEFT adapter (with its adapter_config.json beside it) and the llama.cpp LoRA GGUF the converter makes of it for <paramref name="basePath"/>.</summary>
    private (string Peft, string Converted) Adapters(PeftAdapterFixture fixture, TinyLlama model, string basePath, string name = "adapter")
    {
        var (config, weights) = fixture.Generate(model).WriteTo(Path.Combine(_dir, name));
        var converted = Path.Combine(_dir, name + ".gguf");
        PeftLoraConverter.Convert(PeftAdapterConfig.ReadFile(config), weights, LlamaCppBaseModel.ReadFile(basePath), converted);
        return (weights, converted);
    }

    private LoraMergeException Refused(string basePath, string adapter)
    {
        var output = Path.Combine(_dir, "out.gguf");
        var e = Assert.Throws<LoraMergeException>(() => GgufMerger.Merge(basePath, [new MergeAdapter(adapter)], output));
        Assert.False(File.Exists(output));
        Assert.False(File.Exists(output + ".part"));
        return e;
    }

    /// <summary><paramref name="source"/> written again with metadata values replaced, tensors left out, or keys added.</summary>
    private string Rewrite(string source, string name, Func<string, GgufValue, GgufValue>? metadata = null, Func<string, bool>? keep = null, Action<GgufWriter>? extra = null)
    {
        var gguf = GgufReader.ReadFile(source, int.MaxValue);
        var writer = new GgufWriter();
        foreach (var (key, value) in gguf.Metadata)
        {
            writer.Add(key, metadata?.Invoke(key, value) ?? value);
        }
        extra?.Invoke(writer);
        foreach (var info in gguf.Tensors.Where(t => keep?.Invoke(t.Name) ?? true))
        {
            Copy(writer, source, gguf, info.Name);
        }
        var path = Path.Combine(_dir, name);
        writer.WriteTo(path);
        return path;
    }

    private static void Copy(GgufWriter writer, string path, GgufFile gguf, string name)
    {
        var info = gguf.TensorsByName[name];
        var bytes = Bytes(path, gguf, name);
        writer.AddTensor(info.Name, info.Type, info.Ne, bytes.Length, stream => stream.Write(bytes));
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

    private static float[] Floats(byte[] bytes) => [.. System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(bytes)];
}
