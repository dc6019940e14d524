using LLama;
using LLama.Common;
using LLama.Native;
using LoraDeploy.Lora.Peft;
using LoraDeploy.Lora.Tests.Support;
using LoraDeploy.Serving.LlamaCpp;
using Microsoft.Extensions.Logging.Abstractions;

namespace LoraDeploy.Tests.Serving;

/// <summary>
/// Exactness without Python: a PEFT adapter converted by <see cref="PeftLoraConverter"/> and applied by llama.cpp at
/// runtime gives the logits of a model whose weights had <c>scale · B·A</c> merged in Hugging Face layout before the
/// model's own conversion. That one comparison checks names, shapes, the q/k permutation, and every scale (alpha/r,
/// rsLoRA, rank/alpha patterns, the user scale). F32 KV cache and no flash attention, which otherwise move logits by
/// about 2e-3 on their own. Only adapters the converter accepted are loaded (a bad file would crash llama.cpp).
/// </summary>
public sealed class PeftExactnessTests : IDisposable
{
    private const float Tolerance = 1e-3f;
    private const string Prompt = "hello world, the adapter is";

    private readonly string _dir = Directory.CreateTempSubdirectory("peft-exact-").FullName;
    private readonly TinyLlama _model = new TinyLlama().Generate();
    private readonly string _basePath;
    private readonly LlamaCppBaseModel _base;

    public PeftExactnessTests()
    {
        _basePath = _model.WriteGguf(Path.Combine(_dir, "base.gguf"));
        _base = LlamaCppBaseModel.ReadFile(_basePath);
    }

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void Plain_lora_on_all_seven_modules_of_both_layers_equals_the_merged_model() =>
        AssertExact([(new PeftAdapterFixture { Rank = 4, Alpha = 8 }, 1f)]);

    [Fact]
    public void RsLoRA_scale_is_alpha_over_sqrt_r() =>
        AssertExact([(new PeftAdapterFixture { Rank = 16, Alpha = 8, UseRslora = true }, 1f)]);

    [Fact]
    public void Rank_and_alpha_patterns_apply_per_module() =>
        AssertExact([(new PeftAdapterFixture
        {
            Rank = 4, Alpha = 8, UseRslora = false,
            RankPattern = new() { ["q_proj"] = 8, ["layers.1.mlp.down_proj"] = 2 },
            AlphaPattern = new() { ["v_proj"] = 3, ["layers.0.mlp.up_proj"] = 32 },
        }, 1f)]);

    [Fact]
    public void Layers_to_transform_adapts_only_those_layers() =>
        AssertExact([(new PeftAdapterFixture { LayersToTransform = [1], Targets = ["q_proj", "k_proj", "o_proj", "down_proj"] }, 1f)]);

    [Fact]
    public void Embeddings_and_output_layer_adapters_equal_the_merged_model() =>
        AssertExact([(new PeftAdapterFixture { Targets = ["embed_tokens", "q_proj", "lm_head"], Rank = 8, Alpha = 16 }, 1f)]);

    [Fact]
    public void A_bf16_adapter_is_widened_exactly() =>
        AssertExact([(new PeftAdapterFixture { Dtype = "BF16", UseRslora = true, Rank = 8, Alpha = 4 }, 1f)]);

    [Fact]
    public void An_f16_adapter_matches_up_to_llama_cpp_rounding_activations_to_f16() =>
        // alpha/r = 2, so lora_b·2 is exact in F16 and the converter adds no error; but llama.cpp's CPU matmul with
        // F16 weights rounds the activations to F16 too (measured ~0.026 here), hence the looser bound. A wrong
        // name, scale or permutation moves logits by several units.
        AssertExact([(new PeftAdapterFixture { Dtype = "F16", Rank = 4, Alpha = 8 }, 1f)], tolerance: 0.1f);

    [Fact]
    public void User_scale_half_scales_the_delta() =>
        AssertExact([(new PeftAdapterFixture(), 0.5f)]);

    [Fact]
    public void User_scale_zero_gives_the_base_model()
    {
        var adapter = Convert(new PeftAdapterFixture(), "zero");
        var base0 = Logits(_basePath, []);
        Assert.Equal(base0, Logits(_basePath, [(adapter, 0f)]));
        Assert.True(MaxAbsDiff(base0, Logits(_basePath, [(adapter, 1f)])) > 0.1f, "the adapter at scale 1 should change the logits");
    }

    [Fact]
    public void Two_adapters_with_scales_equal_their_merged_sum() =>
        AssertExact([
            (new PeftAdapterFixture { Seed = 11, Rank = 4, Alpha = 8 }, 0.7f),
            (new PeftAdapterFixture { Seed = 12, Rank = 8, Alpha = 4, UseRslora = true, Targets = ["q_proj", "v_proj", "gate_proj"] }, -0.4f),
        ]);

    private void AssertExact(IReadOnlyList<(PeftAdapterFixture Fixture, float UserScale)> adapters, float tolerance = Tolerance)
    {
        var merged = _model.Clone();
        var applied = new List<(string Path, float Scale)>();
        for (var i = 0; i < adapters.Count; i++)
        {
            var (fixture, userScale) = adapters[i];
            applied.Add((Convert(fixture, $"adapter{i}"), userScale));
            fixture.MergeInto(merged, userScale);
        }
        var mergedPath = merged.WriteGguf(Path.Combine(_dir, "merged.gguf"));

        var expected = Logits(mergedPath, []);
        var actual = Logits(_basePath, applied);
        var baseLogits = Logits(_basePath, []);
        Assert.True(MaxAbsDiff(expected, baseLogits) > 0.1f, "the adapters should move the logits well beyond the tolerance");
        var diff = MaxAbsDiff(expected, actual);
        Assert.True(diff < tolerance, $"runtime adapter vs merged weights: max abs logit diff {diff} (tolerance {tolerance})");
    }

    private string Convert(PeftAdapterFixture fixture, string name)
    {
        fixture.Generate(_model);
        var (configPath, weightsPath) = fixture.WriteTo(Path.Combine(_dir, name));
        var output = Path.Combine(_dir, name + ".gguf");
        PeftLoraConverter.Convert(PeftAdapterConfig.ReadFile(configPath), weightsPath, _base, output);
        return output;
    }

    internal static float MaxAbsDiff(float[] a, float[] b) => a.Zip(b, (x, y) => Math.Abs(x - y)).Max();

    /// <summary>Logits at every prompt position, concatenated, with the given adapters applied.</summary>
    internal static float[] Logits(string modelPath, IReadOnlyList<(string Path, float Scale)> adapters)
    {
        var parameters = new ModelParams(modelPath)
        {
            ContextSize = 256,
            GpuLayerCount = 0,
            TypeK = GGMLType.GGML_TYPE_F32,
            TypeV = GGMLType.GGML_TYPE_F32,
            FlashAttention = false,
        };
        // Through the engine's log callback, which drops llama.cpp's chatter: on stdout it buries the test summary in CI.
        using var quiet = LlamaNativeLog.Begin(NullLogger.Instance);
        using var weights = LLamaWeights.LoadFromFile(parameters);
        using var context = weights.CreateContext(parameters);
        var loras = adapters.Select(a => (weights.NativeHandle.LoadLoraFromFile(a.Path), a.Scale)).ToArray();
        context.NativeHandle.SetLoraAdapters(loras);
        var tokens = context.Tokenize(Prompt, addBos: true, special: false);
        var batch = new LLamaBatch();
        for (var i = 0; i < tokens.Length; i++)
        {
            batch.Add(tokens[i], i, LLamaSeqId.Zero, logits: true);
        }
        Assert.Equal(DecodeResult.Ok, context.NativeHandle.Decode(batch));
        var logits = new List<float>();
        for (var i = 0; i < tokens.Length; i++)
        {
            logits.AddRange(context.NativeHandle.GetLogitsIth(i).ToArray());
        }
        context.NativeHandle.SetLoraAdapters();
        foreach (var (lora, _) in loras)
        {
            lora.Unload();
        }
        return [.. logits];
    }
}
