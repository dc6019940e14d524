using LoraDeploy.Lora.Merge;
using LoraDeploy.Lora.Peft;
using LoraDeploy.Lora.Tests.Support;
using static LoraDeploy.Lora.Tests.Merge.MergeFixtures;

namespace LoraDeploy.Lora.Tests.Merge;

/// <summary>PEFT adapters on a tiny Llama-shaped Hugging Face safetensors base: names, rank/alpha patterns, rsLoRA, layers_to_transform, DoRA.</summary>
public sealed class MergePeftTests : IDisposable
{
    private const string Prefix = "base_model.model.";
    private readonly string _dir = TempFiles.Directory();
    private readonly Random _random = new(5);
    private readonly Dictionary<string, TestTensor> _base = new(StringComparer.Ordinal);
    private readonly TinyLlama _model = new TinyLlama { Hidden = 16, Heads = 4, KvHeads = 2, FeedForward = 24, VocabSize = 40, Layers = 2 }.Generate();
    private readonly string _basePath;

    public MergePeftTests()
    {
        foreach (var (name, values) in _model.Weights)
        {
            _base[name] = new TestTensor(name, [.. _model.Shapes[name].Select(d => (long)d)], [.. values.Select(v => (double)v)]);
        }
        _basePath = Write(Path.Combine(_dir, "model.safetensors"), _base.Values, metadata: new Dictionary<string, string> { ["format"] = "pt" });
    }

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private const string PatternConfig = """
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
         "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 3, "model.layers.1.mlp.down_proj": 5},
         "layers_to_transform": [1], "use_rslora": false}
        """;

    [Fact]
    public void All_seven_projections_with_rank_and_alpha_patterns_on_the_selected_layer()
    {
        var (adapter, factors) = Adapter(layers: [1], rankOf: m => m.EndsWith("v_proj", StringComparison.Ordinal) ? 2 : 4);
        File.WriteAllText(Path.Combine(_dir, "adapter_config.json"), PatternConfig);

        var output = Path.Combine(_dir, "merged.safetensors");
        var result = LoraMerger.Merge(_basePath, [new MergeAdapter(adapter, 0.75)], output);

        var merged = Read(output, out var metadata);
        Assert.Equal(7, result.TensorsMerged);
        foreach (var (module, (a, b)) in factors)
        {
            var rank = a.Shape[0];
            var alpha = module.EndsWith("o_proj", StringComparison.Ordinal) ? 3.0 : module.EndsWith("down_proj", StringComparison.Ordinal) ? 5.0 : 8.0;
            var weight = module + ".weight";
            AssertClose(MergeExactnessTests.Add(_base[weight], MergeExactnessTests.MatMul(b, a), 0.75 * alpha / rank), merged[weight].Values, module);
        }
        foreach (var name in _base.Keys.Where(n => !n.StartsWith("model.layers.1.", StringComparison.Ordinal) || n.Contains("layernorm", StringComparison.Ordinal)))
        {
            Assert.Equal(Encode(_base[name].Values, "F32"), merged[name].Bytes);
        }
        Assert.Equal("pt", metadata["format"]);
    }

    [Fact]
    public void Rslora_scales_by_alpha_over_root_rank()
    {
        var (adapter, factors) = Adapter(layers: [0, 1], rankOf: _ => 4);
        var config = PeftAdapterConfig.Parse("""{"peft_type": "LORA", "r": 4, "lora_alpha": 6, "use_rslora": true, "target_modules": "all-linear"}"""u8);

        var output = Path.Combine(_dir, "merged.safetensors");
        LoraMerger.Merge(_basePath, [new MergeAdapter(adapter, 1.0, config)], output);

        var merged = Read(output, out _);
        Assert.Equal(14, factors.Count);
        foreach (var (module, (a, b)) in factors)
        {
            AssertClose(MergeExactnessTests.Add(_base[module + ".weight"], MergeExactnessTests.MatMul(b, a), 6 / Math.Sqrt(4)), merged[module + ".weight"].Values, module);
        }
    }

    [Fact]
    public void Dora_follows_peft_weight_norm_per_output_row()
    {
        var (adapter, factors) = Adapter(layers: [0], rankOf: _ => 2, dora: true);
        File.WriteAllText(Path.Combine(_dir, "adapter_config.json"),
            """{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": true, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}""");

        var output = Path.Combine(_dir, "merged.safetensors");
        LoraMerger.Merge(_basePath, [new MergeAdapter(adapter, 0.5)], output);

        var merged = Read(output, out _);
        var adapterTensors = Read(adapter, out _);
        foreach (var (module, (a, b)) in factors)
        {
            var magnitude = adapterTensors[Prefix + module + ".lora_magnitude_vector"].Values;
            var weight = _base[module + ".weight"];
            // PEFT merge: V = W + scaling·B·A with scaling = strength·alpha/r; W' = (m / ‖V‖_row) · V.
            var v = MergeExactnessTests.Add(weight, MergeExactnessTests.MatMul(b, a), 0.5 * 4 / 2);
            var columns = weight.Shape[1];
            var expected = new double[v.Length];
            for (var o = 0; o < weight.Shape[0]; o++)
            {
                var norm = Math.Sqrt(Enumerable.Range(0, (int)columns).Sum(i => v[o * columns + i] * v[o * columns + i]));
                for (var i = 0; i < columns; i++)
                {
                    expected[o * columns + i] = v[o * columns + i] * magnitude[o] / norm;
                }
            }
            AssertClose(expected, merged[module + ".weight"].Values, module);
        }
    }

    [Fact]
    public void Embedding_lora_is_the_transposed_product()
    {
        var a = Random(_random, Prefix + "model.embed_tokens.lora_embedding_A", [3, 40]);
        var b = Random(_random, Prefix + "model.embed_tokens.lora_embedding_B", [16, 3]);
        var adapter = Write(Path.Combine(_dir, "adapter_model.safetensors"), [a, b]);
        var config = PeftAdapterConfig.Parse("""{"peft_type": "LORA", "r": 3, "lora_alpha": 3, "target_modules": ["embed_tokens"]}"""u8);

        var output = Path.Combine(_dir, "merged.safetensors");
        LoraMerger.Merge(_basePath, [new MergeAdapter(adapter, 2.0, config)], output);

        var product = MergeExactnessTests.MatMul(b, a);
        var transposed = new double[product.Length];
        for (var h = 0; h < 16; h++)
        {
            for (var t = 0; t < 40; t++)
            {
                transposed[t * 16 + h] = product[h * 40 + t];
            }
        }
        AssertClose(MergeExactnessTests.Add(_base["model.embed_tokens.weight"], transposed, 2.0), Read(output, out _)["model.embed_tokens.weight"].Values, "embed_tokens");
    }

    [Fact]
    public void A_layer_outside_layers_to_transform_is_refused()
    {
        var (adapter, _) = Adapter(layers: [0, 1], rankOf: m => m.EndsWith("v_proj", StringComparison.Ordinal) ? 2 : 4);
        File.WriteAllText(Path.Combine(_dir, "adapter_config.json"), PatternConfig);

        var e = Assert.Throws<LoraMergeException>(() => LoraMerger.Merge(_basePath, [new MergeAdapter(adapter)], Path.Combine(_dir, "merged.safetensors")));
        Assert.Contains("is in layer 0, but adapter_config.json layers_to_transform is [1]", e.Message);
        Assert.False(File.Exists(Path.Combine(_dir, "merged.safetensors")));
    }

    [Fact]
    public void A_rank_other_than_the_rank_pattern_is_refused()
    {
        var (adapter, _) = Adapter(layers: [1], rankOf: _ => 4);
        File.WriteAllText(Path.Combine(_dir, "adapter_config.json"), PatternConfig);

        var e = Assert.Throws<LoraMergeException>(() => LoraMerger.Merge(_basePath, [new MergeAdapter(adapter)], Path.Combine(_dir, "merged.safetensors")));
        Assert.Contains("model.layers.1.self_attn.v_proj' has rank 4, but adapter_config.json gives rank_pattern['v_proj'] = 2", e.Message);
    }

    [Fact]
    public void A_module_outside_target_modules_is_refused()
    {
        var (adapter, _) = Adapter(layers: [0], rankOf: _ => 4);
        var config = PeftAdapterConfig.Parse("""{"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}"""u8);

        var e = Assert.Throws<LoraMergeException>(() => LoraMerger.Merge(_basePath, [new MergeAdapter(adapter, 1, config)], Path.Combine(_dir, "merged.safetensors")));
        Assert.Contains("model.layers.0.self_attn.k_proj': adapter_config.json target_modules [q_proj, v_proj] does not include it", e.Message);
    }

    /// <summary>A PEFT adapter over all seven projections of <paramref name="layers"/>; factors by module (without the PEFT prefix).</summary>
    private (string Path, Dictionary<string, (TestTensor A, TestTensor B)> Factors) Adapter(int[] layers, Func<string, int> rankOf, bool dora = false)
    {
        var tensors = new List<TestTensor>();
        var factors = new Dictionary<string, (TestTensor, TestTensor)>(StringComparer.Ordinal);
        foreach (var layer in layers)
        {
            foreach (var (module, inFeatures, outFeatures) in _model.Projections(layer))
            {
                var rank = rankOf(module);
                var a = Random(_random, Prefix + module + ".lora_A.weight", [rank, inFeatures]);
                var b = Random(_random, Prefix + module + ".lora_B.weight", [outFeatures, rank]);
                tensors.Add(a);
                tensors.Add(b);
                factors[module] = (a, b);
                if (dora)
                {
                    var magnitude = Random(_random, Prefix + module + ".lora_magnitude_vector", [outFeatures], 2);
                    tensors.Add(magnitude with { Values = [.. magnitude.Values.Select(Math.Abs)] });
                }
            }
        }
        return (Write(Path.Combine(_dir, "adapter_model.safetensors"), tensors), factors);
    }
}
