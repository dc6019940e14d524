using System.Buffers.Binary;
using System.Runtime.InteropServices;
using System.Text.Json;

namespace LoraDeploy.Lora.Tests.Support;

/// <summary>
/// Generates PEFT LoRA adapters for a <see cref="TinyLlama"/>: random lora_A/lora_B per module, an adapter_config.json
/// and an adapter_model.safetensors named as PEFT's save_pretrained names them. <see cref="MergeInto"/> adds each
/// module's <c>scale · B·A</c> to the model in Hugging Face layout, with the scale computed here from the test's own
/// plain reading of the config (rank/alpha pattern keys are module-name suffixes), independently of the converter.
/// Shared by the test projects (linked source).
/// </summary>
internal sealed class PeftAdapterFixture
{
    public int Rank { get; init; } = 4;
    public double Alpha { get; init; } = 8;
    public bool UseRslora { get; init; }
    /// <summary>Pattern keys are literal module-name suffixes (e.g. <c>q_proj</c>, <c>layers.1.mlp.down_proj</c>).</summary>
    public Dictionary<string, int> RankPattern { get; init; } = [];
    public Dictionary<string, double> AlphaPattern { get; init; } = [];
    public int[]? LayersToTransform { get; init; }
    /// <summary>Short module names to adapt in each layer; embed_tokens and lm_head may be added too.</summary>
    public string[] Targets { get; init; } = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    /// <summary>safetensors dtype of the factors: F32, F16 or BF16 (values are rounded to it before merging).</summary>
    public string Dtype { get; init; } = "F32";
    /// <summary>DoRA: each linear module also gets a <c>lora_magnitude_vector</c> [out], its rows' norms scaled by random factors in [0.5, 1.5].</summary>
    public bool UseDora { get; init; }
    public int Seed { get; init; } = 7;
    public float Std { get; init; } = 0.3f;
    /// <summary>Extra adapter_config.json fields (override or add), raw JSON values.</summary>
    public Dictionary<string, string?> ConfigOverrides { get; init; } = [];

    public sealed record Module(string Name, bool Embedding, int Rank, double Alpha, long In, long Out, float[] A, float[] B)
    {
        public double Scale(bool rslora) => rslora ? Alpha / Math.Sqrt(Rank) : Alpha / Rank;

        /// <summary>DoRA magnitude per output row, or null.</summary>
        public float[]? Magnitude { get; init; }
    }

    public List<Module> Modules { get; } = [];

    public PeftAdapterFixture Generate(TinyLlama model)
    {
        var random = new Random(Seed);
        if (Targets.Contains("embed_tokens"))
        {
            Add("model.embed_tokens", embedding: true, model.VocabSize, model.Hidden, random);
        }
        for (var layer = 0; layer < model.Layers; layer++)
        {
            if (LayersToTransform is { } layers && !layers.Contains(layer))
            {
                continue;
            }
            foreach (var (module, inFeatures, outFeatures) in model.Projections(layer))
            {
                if (Targets.Contains(module[(module.LastIndexOf('.') + 1)..]))
                {
                    Add(module, embedding: false, inFeatures, outFeatures, random, model.Weights[module + ".weight"]);
                }
            }
        }
        if (Targets.Contains("lm_head"))
        {
            Add("lm_head", embedding: false, model.Hidden, model.VocabSize, random);
        }
        return this;
    }

    private void Add(string module, bool embedding, long inFeatures, long outFeatures, Random random, float[]? weight = null)
    {
        var rank = Lookup(RankPattern, module) ?? Rank;
        var alpha = Lookup(AlphaPattern, module) ?? Alpha;
        var a = RandomValues(rank * inFeatures, random);
        var b = RandomValues(outFeatures * rank, random);
        float[]? magnitude = null;
        if (UseDora && weight is not null)
        {
            magnitude = new float[outFeatures];
            for (var o = 0; o < outFeatures; o++)
            {
                var norm = Math.Sqrt(weight.AsSpan((int)(o * inFeatures), (int)inFeatures).ToArray().Sum(w => (double)w * w));
                magnitude[o] = RoundToDtype((float)(norm * (0.5 + random.NextDouble())));
            }
        }
        Modules.Add(new Module(module, embedding, rank, alpha, inFeatures, outFeatures, a, b) { Magnitude = magnitude });
    }

    private static T? Lookup<T>(Dictionary<string, T> pattern, string module) where T : struct =>
        pattern.FirstOrDefault(p => module == p.Key || module.EndsWith("." + p.Key, StringComparison.Ordinal)) is { Key: not null } hit
            ? hit.Value
            : null;

    private float[] RandomValues(long count, Random random)
    {
        var values = new float[count];
        for (var i = 0; i < values.Length; i++)
        {
            values[i] = RoundToDtype(TinyLlama.Normal(random) * Std);
        }
        return values;
    }

    private float RoundToDtype(float value) => Dtype switch
    {
        "F16" => (float)(Half)value,
        "BF16" => BitConverter.UInt32BitsToSingle(BitConverter.SingleToUInt32Bits(value) & 0xFFFF0000),
        _ => value,
    };

    /// <summary>
    /// Adds <c>userScale · scale · B·A</c> of every module to <paramref name="model"/>'s weights (HF layout); with DoRA
    /// (unless <paramref name="ignoreMagnitude"/>), PEFT's merge instead: V = W + userScale·scale·B·A, then each row
    /// V[o] · m[o] / ‖V[o]‖, in F64.
    /// </summary>
    public void MergeInto(TinyLlama model, float userScale = 1, bool ignoreMagnitude = false)
    {
        foreach (var m in Modules)
        {
            var scale = (float)(userScale * m.Scale(UseRslora));
            if (m.Magnitude is { } magnitude && !ignoreMagnitude)
            {
                MergeDora(model.Weights[m.Name + ".weight"], m, userScale * m.Scale(UseRslora), magnitude);
                continue;
            }
            if (!m.Embedding)
            {
                model.Merge(m.Name, m.A, m.B, m.Rank, scale);
                continue;
            }
            // PEFT's Embedding delta is (B·A)ᵀ: A [r, vocab], B [hidden, r], weight [vocab, hidden].
            var w = model.Weights["model.embed_tokens.weight"];
            var (vocab, hidden) = (m.In, m.Out);
            for (var v = 0; v < vocab; v++)
            {
                for (var h = 0; h < hidden; h++)
                {
                    double sum = 0;
                    for (var k = 0; k < m.Rank; k++)
                    {
                        sum += (double)m.B[h * m.Rank + k] * m.A[k * vocab + v];
                    }
                    w[v * hidden + h] += (float)(scale * sum);
                }
            }
        }
    }

    private static void MergeDora(float[] w, Module m, double scale, float[] magnitude)
    {
        var v = new double[m.In];
        for (var o = 0; o < m.Out; o++)
        {
            double squares = 0;
            for (var i = 0; i < m.In; i++)
            {
                double sum = 0;
                for (var k = 0; k < m.Rank; k++)
                {
                    sum += (double)m.B[o * m.Rank + k] * m.A[k * m.In + i];
                }
                v[i] = w[o * m.In + i] + scale * sum;
                squares += v[i] * v[i];
            }
            var factor = magnitude[o] / Math.Sqrt(squares);
            for (var i = 0; i < m.In; i++)
            {
                w[o * m.In + i] = (float)(v[i] * factor);
            }
        }
    }

    public string ConfigJson()
    {
        var fields = new Dictionary<string, string?>
        {
            ["alpha_pattern"] = JsonSerializer.Serialize(AlphaPattern),
            ["auto_mapping"] = "null",
            ["base_model_name_or_path"] = "\"tiny-llama-test\"",
            ["bias"] = "\"none\"",
            ["fan_in_fan_out"] = "false",
            ["inference_mode"] = "true",
            ["init_lora_weights"] = "true",
            ["layers_pattern"] = "null",
            ["layers_to_transform"] = LayersToTransform is null ? "null" : JsonSerializer.Serialize(LayersToTransform),
            ["lora_alpha"] = JsonSerializer.Serialize(Alpha),
            ["lora_dropout"] = "0.05",
            ["modules_to_save"] = "null",
            ["peft_type"] = "\"LORA\"",
            ["r"] = Rank.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["rank_pattern"] = JsonSerializer.Serialize(RankPattern),
            ["revision"] = "null",
            ["target_modules"] = JsonSerializer.Serialize(Targets),
            ["task_type"] = "\"CAUSAL_LM\"",
            ["use_dora"] = UseDora ? "true" : "false",
            ["use_rslora"] = UseRslora ? "true" : "false",
        };
        foreach (var (key, value) in ConfigOverrides)
        {
            fields[key] = value;
        }
        return "{\n" + string.Join(",\n", fields.Where(f => f.Value is not null).Select(f => $"  \"{f.Key}\": {f.Value}")) + "\n}";
    }

    /// <summary>The safetensors writer with every module's factors, named as PEFT saves them.</summary>
    public SafetensorsWriter Safetensors()
    {
        var writer = new SafetensorsWriter();
        foreach (var m in Modules)
        {
            var prefix = "base_model.model." + m.Name;
            var (aName, bName) = m.Embedding ? (".lora_embedding_A", ".lora_embedding_B") : (".lora_A.weight", ".lora_B.weight");
            writer.Tensor(prefix + aName, Dtype, [m.Rank, m.In], Encode(m.A, Dtype));
            writer.Tensor(prefix + bName, Dtype, [m.Out, m.Rank], Encode(m.B, Dtype));
            if (m.Magnitude is { } magnitude)
            {
                writer.Tensor(prefix + ".lora_magnitude_vector", Dtype, [m.Out], Encode(magnitude, Dtype));
            }
        }
        return writer;
    }

    /// <summary>Writes adapter_config.json and adapter_model.safetensors into <paramref name="directory"/>.</summary>
    public (string ConfigPath, string WeightsPath) WriteTo(string directory)
    {
        Directory.CreateDirectory(directory);
        var config = Path.Combine(directory, "adapter_config.json");
        File.WriteAllText(config, ConfigJson());
        var weights = Safetensors().WriteTo(Path.Combine(directory, "adapter_model.safetensors"));
        return (config, weights);
    }

    public static byte[] Encode(float[] values, string dtype)
    {
        switch (dtype)
        {
            case "F32":
                return MemoryMarshal.AsBytes(values.AsSpan()).ToArray();
            case "F16":
                var half = new byte[values.Length * 2];
                for (var i = 0; i < values.Length; i++)
                {
                    BinaryPrimitives.WriteHalfLittleEndian(half.AsSpan(i * 2), (Half)values[i]);
                }
                return half;
            case "BF16":
                var bf = new byte[values.Length * 2];
                for (var i = 0; i < values.Length; i++)
                {
                    BinaryPrimitives.WriteUInt16LittleEndian(bf.AsSpan(i * 2), (ushort)(BitConverter.SingleToUInt32Bits(values[i]) >> 16));
                }
                return bf;
            default:
                throw new ArgumentException($"dtype {dtype}", nameof(dtype));
        }
    }
}
