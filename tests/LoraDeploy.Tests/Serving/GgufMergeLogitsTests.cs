using LoraDeploy.Lora.Gguf;
using LoraDeploy.Lora.Merge;
using LoraDeploy.Lora.Peft;
using LoraDeploy.Lora.Tests.Support;
using static LoraDeploy.Tests.Serving.PeftExactnessTests;

namespace LoraDeploy.Tests.Serving;

/// <summary>
/// A PEFT adapter merged into a GGUF base by <see cref="GgufMerger"/>, loaded by llama.cpp: a plain LoRA gives the
/// logits of the same adapter applied at run time (converted by <see cref="PeftLoraConverter"/>), and a DoRA adapter —
/// which llama.cpp cannot apply at run time — gives the logits of the test's own F64 merge of the Hugging Face weights,
/// and clearly not those of the same LoRA without its magnitude; and the llama.cpp LoRA GGUF the server stores for an LLM
/// LoRA, merged, gives the logits of that same file applied at run time. Same llama.cpp settings as <see cref="PeftExactnessTests"/>.
/// </summary>
public sealed class GgufMergeLogitsTests : IDisposable
{
    private const float Tolerance = 1e-3f;
    private const float Strength = 0.7f;

    private readonly string _dir = Directory.CreateTempSubdirectory("gguf-merge-logits-").FullName;
    private readonly TinyLlama _model = new TinyLlama().Generate();
    private readonly string _basePath;

    public GgufMergeLogitsTests()
    {
        _basePath = _model.WriteGguf(Path.Combine(_dir, "base.gguf"));
    }

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void Plain_lora_merged_into_the_gguf_gives_the_logits_of_the_runtime_adapter()
    {
        var fixture = new PeftAdapterFixture { Rank = 4, Alpha = 8 }.Generate(_model);
        var (config, weights) = fixture.WriteTo(Path.Combine(_dir, "adapter"));
        var runtime = Path.Combine(_dir, "adapter.gguf");
        PeftLoraConverter.Convert(PeftAdapterConfig.ReadFile(config), weights, LlamaCppBaseModel.ReadFile(_basePath), runtime);
        var merged = Path.Combine(_dir, "merged.gguf");

        var result = GgufMerger.Merge(_basePath, [new MergeAdapter(weights, Strength)], merged);

        Assert.Equal(14, result.TensorsMerged);
        var expected = Logits(_basePath, [(runtime, Strength)]);
        Assert.True(MaxAbsDiff(expected, Logits(_basePath, [])) > 0.1f, "the adapter should move the logits well beyond the tolerance");
        var diff = MaxAbsDiff(expected, Logits(merged, []));
        TestContext.Current.TestOutputHelper?.WriteLine($"merged GGUF vs runtime adapter: max abs logit diff {diff}");
        Assert.True(diff <= Tolerance, $"merged GGUF vs runtime adapter: max abs logit diff {diff} (tolerance {Tolerance})");
    }

    /// <param name="alpha">
    /// adapter.lora.alpha written into the file: 0 as the converter writes it (scale 1), or 16 as llama.cpp's own
    /// converter would (scale 16/r per pair; q_proj has rank 8 and the rest rank 4), so llama.cpp itself checks the scale.
    /// </param>
    [Theory]
    [InlineData(0f)]
    [InlineData(16f)]
    public void Converted_lora_gguf_merged_into_the_gguf_gives_the_logits_of_the_same_file_applied_at_run_time(float alpha)
    {
        var fixture = new PeftAdapterFixture
        {
            Rank = 4, Alpha = 8, UseRslora = true, RankPattern = new() { ["q_proj"] = 8 },
            Targets = ["embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
        }.Generate(_model);
        var (config, weights) = fixture.WriteTo(Path.Combine(_dir, "adapter"));
        var converted = Path.Combine(_dir, "converted.gguf");
        PeftLoraConverter.Convert(PeftAdapterConfig.ReadFile(config), weights, LlamaCppBaseModel.ReadFile(_basePath), converted);
        var adapter = alpha == 0 ? converted : WithAlpha(converted, alpha);
        var merged = Path.Combine(_dir, "merged.gguf");

        var result = GgufMerger.Merge(_basePath, [new MergeAdapter(adapter, Strength)], merged);

        Assert.Equal(16, result.TensorsMerged);
        var expected = Logits(_basePath, [(adapter, Strength)]);
        Assert.True(MaxAbsDiff(expected, Logits(_basePath, [])) > 0.1f, "the adapter should move the logits well beyond the tolerance");
        var diff = MaxAbsDiff(expected, Logits(merged, []));
        TestContext.Current.TestOutputHelper?.WriteLine($"merged LoRA GGUF (alpha {alpha}) vs the same file at run time: max abs logit diff {diff}");
        Assert.True(diff <= Tolerance, $"merged LoRA GGUF vs runtime adapter: max abs logit diff {diff} (tolerance {Tolerance})");
    }

    [Fact]
    public void Dora_merged_into_the_gguf_gives_the_logits_of_the_reference_merge_and_not_of_the_plain_lora()
    {
        var fixture = new PeftAdapterFixture { Rank = 4, Alpha = 8, UseDora = true }.Generate(_model);
        var (_, weights) = fixture.WriteTo(Path.Combine(_dir, "adapter"));
        var reference = _model.Clone();
        fixture.MergeInto(reference, Strength);
        var withoutMagnitude = _model.Clone();
        fixture.MergeInto(withoutMagnitude, Strength, ignoreMagnitude: true);
        var merged = Path.Combine(_dir, "merged.gguf");

        GgufMerger.Merge(_basePath, [new MergeAdapter(weights, Strength)], merged);

        var actual = Logits(merged, []);
        var diff = MaxAbsDiff(Logits(reference.WriteGguf(Path.Combine(_dir, "reference.gguf")), []), actual);
        var fromPlain = MaxAbsDiff(Logits(withoutMagnitude.WriteGguf(Path.Combine(_dir, "plain.gguf")), []), actual);
        TestContext.Current.TestOutputHelper?.WriteLine($"merged DoRA GGUF vs reference: max abs logit diff {diff}; vs the LoRA without magnitude: {fromPlain}");
        Assert.True(diff <= Tolerance, $"merged DoRA GGUF vs the reference merge: max abs logit diff {diff} (tolerance {Tolerance})");
        Assert.True(fromPlain > 0.1f, $"DoRA's magnitude should change the logits; ignoring it moves them by only {fromPlain}");
    }

    /// <summary>The LoRA GGUF again with adapter.lora.alpha set to <paramref name="alpha"/>.</summary>
    private string WithAlpha(string source, float alpha)
    {
        var gguf = GgufReader.ReadFile(source, int.MaxValue);
        var writer = new GgufWriter();
        foreach (var (key, value) in gguf.Metadata)
        {
            writer.Add(key, key == "adapter.lora.alpha" ? new GgufValue(GgufValueType.Float32, alpha) : value);
        }
        foreach (var info in gguf.Tensors)
        {
            var bytes = new byte[info.ByteLength];
            using (var file = File.OpenRead(source))
            {
                file.Position = gguf.DataOffset + info.Offset;
                file.ReadExactly(bytes);
            }
            writer.AddTensor(info.Name, info.Type, info.Ne, bytes.Length, stream => stream.Write(bytes));
        }
        var path = Path.Combine(_dir, $"alpha-{alpha}.gguf");
        writer.WriteTo(path);
        return path;
    }
}
