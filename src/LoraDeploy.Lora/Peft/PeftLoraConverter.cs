using System.Buffers.Binary;
using System.Globalization;
using System.Text.RegularExpressions;
using LoraDeploy.Lora.Gguf;
using LoraDeploy.Lora.Safetensors;

namespace LoraDeploy.Lora.Peft;

/// <summary>
/// Validates a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) against a llama.cpp base model and
/// writes it as a llama.cpp LoRA GGUF that <c>llama_adapter_lora_init</c> accepts.
/// </summary>
/// <remarks>
/// <para>Unlike llama.cpp's <c>convert_lora_to_gguf.py</c>, which copies <c>lora_alpha</c> into
/// <c>adapter.lora.alpha</c> (wrong for rsLoRA and alpha_pattern), this writes <c>adapter.lora.alpha = 0</c> — llama.cpp
/// then scales by the user scale alone — and folds each module's exact PEFT scale (alpha/r, or alpha/√r with
/// rsLoRA, with rank_pattern/alpha_pattern resolved per module) into <c>lora_b</c>.</para>
/// <para>Row permutation: only for base arch <c>llama</c> (which covers Llama 1–3 and Mistral/Mixtral-style models
/// converted as <c>llama</c>) are <c>lora_b</c>'s rows of q_proj and k_proj permuted (q by n_head, k by n_head_kv),
/// exactly as llama.cpp's converter permuted the base W_q/W_k for its pairwise RoPE. Every other arch (qwen2, qwen3,
/// gemma*, phi3, …) keeps the Hugging Face row order, as llama.cpp's converter does for them. Known gap: a few other
/// archs are converted by llama.cpp through its <c>LlamaModel</c> class and so are permuted too (e.g. <c>granite</c>,
/// whose converter inherits <c>undo_permute = True</c>); q/k adapters for those would need the permutation as well and
/// are not yet handled.</para>
/// <para>Names: the Llama-family Hugging Face modules <c>model.layers.N.self_attn.{q,k,v,o}_proj</c>,
/// <c>model.layers.N.mlp.{gate,up,down}_proj</c>, <c>model.embed_tokens</c> and <c>lm_head</c>; a base model must
/// have the mapped tensor. dtypes: F32 and F16 are written as given (lora_b scaled in float and rounded back), BF16
/// becomes F32.</para>
/// <para>Streaming: tensors are read, checked (NaN/Inf), converted and written one at a time, so memory is a small
/// multiple of the largest tensor, never the whole adapter.</para>
/// </remarks>
public static class PeftLoraConverter
{
    /// <summary>
    /// Version of the bytes this converter writes. Bump it whenever the output for the same input changes, so derived
    /// blobs keyed by (weights sha256, config sha256, converter version) are rebuilt.
    /// </summary>
    public const int ConverterVersion = 1;

    /// <summary>Highest rank accepted (also never above min(in, out), where a higher rank adds nothing).</summary>
    public const int MaxRank = 4096;

    private const string PeftPrefix = "base_model.model.";

    private static readonly Regex LayerModule = new(
        @"\Amodel\.layers\.(?<layer>\d{1,9})\.(?<module>self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)\z",
        RegexOptions.CultureInvariant | RegexOptions.ExplicitCapture);

    private static readonly Dictionary<string, string> LayerTensor = new(StringComparer.Ordinal)
    {
        ["self_attn.q_proj"] = "attn_q",
        ["self_attn.k_proj"] = "attn_k",
        ["self_attn.v_proj"] = "attn_v",
        ["self_attn.o_proj"] = "attn_output",
        ["mlp.gate_proj"] = "ffn_gate",
        ["mlp.up_proj"] = "ffn_up",
        ["mlp.down_proj"] = "ffn_down",
    };

    private static readonly string[] ModuleOrder = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    private const string SupportedModules =
        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj under model.layers.N, model.embed_tokens and lm_head";

    /// <summary>
    /// The llama.cpp tensor a Hugging Face Llama-family module's weight becomes (<c>model.layers.3.self_attn.q_proj</c> →
    /// <c>blk.3.attn_q.weight</c>), with the module's short name (<c>q_proj</c>); null for a module with no counterpart.
    /// </summary>
    internal static (string Tensor, string ShortName)? LlamaCppTensor(string module)
    {
        if (LayerModule.Match(module) is { Success: true } match)
        {
            var kind = match.Groups["module"].Value;
            var layer = int.Parse(match.Groups["layer"].ValueSpan, NumberStyles.None, CultureInfo.InvariantCulture);
            return ($"blk.{layer}.{LayerTensor[kind]}.weight", kind[(kind.IndexOf('.') + 1)..]);
        }
        return module switch
        {
            "model.embed_tokens" => ("token_embd.weight", "embed_tokens"),
            "lm_head" => ("output.weight", "lm_head"),
            _ => null,
        };
    }

    /// <summary>Checks the adapter's config and tensor table against the base model without reading tensor data.</summary>
    /// <exception cref="PeftAdapterException">The adapter cannot be used with this base model; the message says why.</exception>
    public static PeftConversionReport Validate(PeftAdapterConfig config, SafetensorsHeader adapter, LlamaCppBaseModel baseModel) =>
        Plan(config, adapter, baseModel).Report;

    /// <summary>
    /// Validates and converts the adapter at <paramref name="adapterPath"/>, writing the GGUF to
    /// <paramref name="outputPath"/> (which must not exist). On any failure the partial output is deleted.
    /// </summary>
    /// <exception cref="PeftAdapterException">The adapter cannot be used with this base model; the message says why.</exception>
    public static PeftConversionReport Convert(PeftAdapterConfig config, string adapterPath, LlamaCppBaseModel baseModel, string outputPath)
    {
        using var adapter = new FileStream(adapterPath, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1 << 16);
        var output = new FileStream(outputPath, FileMode.CreateNew, FileAccess.Write, FileShare.None, bufferSize: 1 << 20);
        try
        {
            using (output)
            {
                var report = Convert(config, adapter, baseModel, output);
                output.Flush(flushToDisk: true);
                return report;
            }
        }
        catch
        {
            File.Delete(outputPath);
            throw;
        }
    }

    /// <summary>Validates and converts a seekable safetensors stream, writing the GGUF to <paramref name="output"/>.</summary>
    /// <exception cref="PeftAdapterException">The adapter cannot be used with this base model; the message says why. The output then holds a partial file.</exception>
    public static PeftConversionReport Convert(PeftAdapterConfig config, Stream adapter, LlamaCppBaseModel baseModel, Stream output)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(adapter);
        ArgumentNullException.ThrowIfNull(baseModel);
        ArgumentNullException.ThrowIfNull(output);
        using var header = ReadHeader(adapter);
        var plan = Plan(config, header, baseModel);

        var writer = new GgufWriter()
            .Add("general.architecture", baseModel.Architecture)
            .Add("general.type", "adapter")
            .Add("adapter.type", "lora")
            // 0 = llama.cpp applies the user scale only; the PEFT scale is already in lora_b.
            .Add("adapter.lora.alpha", 0f)
            .Add("loradeploy.converter_version", (uint)ConverterVersion);
        foreach (var module in plan.Modules)
        {
            var a = module.A;
            var b = module.B;
            writer.AddTensor(module.BaseTensor + ".lora_a", OutputType(a.Dtype), module.IsEmbedding ? [module.Rank, module.In] : [module.In, module.Rank],
                stream => WriteA(stream, header, adapter, module));
            writer.AddTensor(module.BaseTensor + ".lora_b", OutputType(b.Dtype), [module.Rank, module.Out],
                stream => WriteB(stream, header, adapter, module));
        }
        writer.WriteTo(output);
        return plan.Report;
    }

    private static SafetensorsHeader ReadHeader(Stream adapter)
    {
        try
        {
            return SafetensorsReader.Read(adapter);
        }
        catch (SafetensorsFormatException e)
        {
            throw new PeftAdapterException($"adapter_model.safetensors is not a well-formed safetensors file: {e.Message}", e);
        }
    }

    private sealed record ModulePlan(
        string Module, string ShortName, string BaseTensor, int? Layer, bool IsEmbedding, int Rank, double Alpha, double Scale,
        long In, long Out, int PermuteHeads, SafetensorsTensor A, SafetensorsTensor B);

    private sealed record ConversionPlan(IReadOnlyList<ModulePlan> Modules, PeftConversionReport Report);

    private static ConversionPlan Plan(PeftAdapterConfig config, SafetensorsHeader adapter, LlamaCppBaseModel baseModel)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(adapter);
        ArgumentNullException.ThrowIfNull(baseModel);
        CheckConfig(config);
        var arch = baseModel.Architecture;

        // Module name → (lora_A, lora_B, embedding?) from the tensor names.
        var pairs = new Dictionary<string, (SafetensorsTensor? A, SafetensorsTensor? B, bool Embedding)>(StringComparer.Ordinal);
        foreach (var tensor in adapter.Tensors)
        {
            var (module, isA, embedding) = ParseTensorName(tensor.Name, arch);
            pairs.TryGetValue(module, out var pair);
            if ((pair.A is not null || pair.B is not null) && pair.Embedding != embedding)
            {
                throw new PeftAdapterException($"module '{module}' has both lora_A/lora_B and lora_embedding_A/B tensors");
            }
            if ((isA ? pair.A : pair.B) is { } earlier)
            {
                // The same module with and without the base_model.model. prefix.
                throw new PeftAdapterException($"tensors '{earlier.Name}' and '{tensor.Name}' are both {(isA ? "lora_A" : "lora_B")} of module '{module}'");
            }
            pairs[module] = isA ? pair with { A = tensor, Embedding = embedding } : pair with { B = tensor, Embedding = embedding };
        }
        if (pairs.Count == 0)
        {
            throw new PeftAdapterException("adapter_model.safetensors holds no LoRA tensors");
        }

        var modules = new List<ModulePlan>(pairs.Count);
        foreach (var (module, (a, b, embedding)) in pairs)
        {
            if (a is null || b is null)
            {
                throw new PeftAdapterException(
                    $"module '{module}' has {(a is null ? "lora_B but no lora_A" : "lora_A but no lora_B")}; an adapter needs both");
            }
            modules.Add(PlanModule(config, baseModel, module, a, b, embedding));
        }
        modules.Sort((x, y) => SortKey(x).CompareTo(SortKey(y)));

        var report = new PeftConversionReport
        {
            Architecture = arch,
            ConverterVersion = ConverterVersion,
            BaseModelNameOrPath = config.BaseModelNameOrPath,
            UseRslora = config.UseRslora,
            Ranks = modules.Select(m => m.Rank).Distinct().Order().ToList(),
            TargetModules = modules.Select(m => m.ShortName).Distinct(StringComparer.Ordinal).ToList(),
            Layers = modules.Where(m => m.Layer is not null).Select(m => m.Layer!.Value).Distinct().Order().ToList(),
            TensorCount = modules.Count * 2,
            ParameterCount = modules.Sum(m => m.A.ElementCount + m.B.ElementCount),
            Modules = modules.Select(m => new PeftModuleReport(
                m.Module, m.BaseTensor, m.Layer, m.Rank, m.Alpha, m.Scale, m.In, m.Out, m.B.Dtype,
                GgufReader.TypeName((uint)OutputType(m.B.Dtype)), m.PermuteHeads > 0)).ToList(),
        };
        return new ConversionPlan(modules, report);
    }

    /// <summary>Embeddings first, then layers in order with the modules in llama.cpp's order, then the output layer.</summary>
    private static (int, int, int) SortKey(ModulePlan m) => m switch
    {
        { IsEmbedding: true } => (0, 0, 0),
        { Layer: { } layer } => (1, layer, Array.IndexOf(ModuleOrder, m.ShortName)),
        _ => (2, 0, 0),
    };

    private static void CheckConfig(PeftAdapterConfig config)
    {
        if (!string.Equals(config.PeftType, "LORA", StringComparison.Ordinal))
        {
            throw new PeftAdapterException($"adapter_config.json peft_type is '{config.PeftType}'; only LORA adapters can be served by llama.cpp");
        }
        if (config.UseDora)
        {
            throw new PeftAdapterException(
                "DoRA adapters are not supported by llama.cpp's runtime adapters; adapter_config.json has use_dora = true (merge the adapter into the base model instead)");
        }
        if (config.Bias != "none")
        {
            throw new PeftAdapterException(
                $"adapter_config.json has bias = \"{config.Bias}\": the adapter trained the base model's biases, which llama.cpp's runtime adapters cannot change (merge instead)");
        }
        if (config.LoraBias)
        {
            throw new PeftAdapterException("adapter_config.json has lora_bias = true: llama.cpp's runtime adapters have no lora_B bias (merge instead)");
        }
        if (config.ModulesToSave is { Count: > 0 } saved)
        {
            throw new PeftAdapterException(
                $"adapter_config.json has modules_to_save [{string.Join(", ", saved)}]: the adapter carries full copies of those modules (e.g. embed_tokens/lm_head), which llama.cpp's runtime adapters cannot apply (merge instead)");
        }
        if (config.FanInFanOut)
        {
            throw new PeftAdapterException(
                "adapter_config.json has fan_in_fan_out = true, meaning the adapter targets GPT-2-style Conv1D layers stored transposed; Llama-family models have none");
        }
    }

    /// <summary>Splits an adapter tensor name into its Hugging Face module and which half it is; refuses every other tensor.</summary>
    private static (string Module, bool IsA, bool Embedding) ParseTensorName(string name, string arch)
    {
        var stripped = name.StartsWith(PeftPrefix, StringComparison.Ordinal) ? name[PeftPrefix.Length..] : name;
        foreach (var (suffix, isA, embedding) in Suffixes)
        {
            if (stripped.EndsWith(suffix, StringComparison.Ordinal) && stripped.Length > suffix.Length)
            {
                return (stripped[..^suffix.Length], isA, embedding);
            }
        }
        if (stripped.EndsWith(".lora_magnitude_vector", StringComparison.Ordinal) || stripped.EndsWith(".lora_magnitude_vector.weight", StringComparison.Ordinal))
        {
            throw new PeftAdapterException(
                $"tensor '{name}' is a DoRA magnitude vector: DoRA adapters are not supported by llama.cpp's runtime adapters (merge the adapter into the base model instead)");
        }
        if (stripped.EndsWith(".lora_B.bias", StringComparison.Ordinal))
        {
            throw new PeftAdapterException($"tensor '{name}' is a lora_B bias, which llama.cpp's runtime adapters cannot apply (merge instead)");
        }
        if (AdapterNamed.Match(stripped) is { Success: true } named)
        {
            throw new PeftAdapterException(
                $"tensor '{name}' still carries the adapter name '{named.Groups["name"].Value}', as in a raw model state_dict (e.g. a torch .bin dump); PEFT's save_pretrained writes '...{named.Groups["half"].Value}.weight' without it — re-save the adapter with save_pretrained");
        }
        if (stripped.EndsWith(".base_layer.weight", StringComparison.Ordinal) || stripped.EndsWith(".weight", StringComparison.Ordinal) || stripped.EndsWith(".bias", StringComparison.Ordinal))
        {
            throw new PeftAdapterException(
                $"tensor '{name}' is a full base-model weight or bias, not a LoRA factor (modules_to_save or a whole-model checkpoint); llama.cpp's runtime adapters can only add lora_A/lora_B pairs");
        }
        throw new PeftAdapterException(
            $"tensor '{name}' is not a PEFT LoRA tensor (expected names ending in .lora_A.weight / .lora_B.weight) for a {arch} base model");
    }

    private static readonly (string Suffix, bool IsA, bool Embedding)[] Suffixes =
    [
        (".lora_A.weight", true, false),
        (".lora_B.weight", false, false),
        (".lora_embedding_A", true, true),
        (".lora_embedding_B", false, true),
    ];

    private static readonly Regex AdapterNamed = new(
        @"\.(?<half>lora_(?:A|B|embedding_A|embedding_B))\.(?<name>[^.]+)(?:\.weight)?\z", RegexOptions.CultureInvariant | RegexOptions.ExplicitCapture);

    private static ModulePlan PlanModule(PeftAdapterConfig config, LlamaCppBaseModel baseModel, string module, SafetensorsTensor a, SafetensorsTensor b, bool embedding)
    {
        var arch = baseModel.Architecture;
        int? layer = null;
        string shortName, ggufName, label;
        var permuteHeads = 0;
        if (LayerModule.Match(module) is { Success: true } match)
        {
            var kind = match.Groups["module"].Value;
            shortName = kind[(kind.IndexOf('.') + 1)..];
            if (!int.TryParse(match.Groups["layer"].ValueSpan, NumberStyles.None, CultureInfo.InvariantCulture, out var n))
            {
                throw new PeftAdapterException($"module '{module}' has a layer index that is not a number");
            }
            layer = n;
            label = $"layer {n} {shortName}";
            ggufName = $"blk.{n}.{LayerTensor[kind]}.weight";
            if (arch == "llama")
            {
                permuteHeads = shortName switch
                {
                    "q_proj" => baseModel.HeadCount ?? throw new PeftAdapterException($"{label}: the base model (llama) has no attention.head_count, which the q/k row permutation needs"),
                    "k_proj" => baseModel.HeadCountKv ?? throw new PeftAdapterException($"{label}: the base model (llama) has no attention.head_count_kv, which the q/k row permutation needs"),
                    _ => 0,
                };
            }
        }
        else if (module == "model.embed_tokens")
        {
            (shortName, ggufName, label) = ("embed_tokens", "token_embd.weight", "embed_tokens");
        }
        else if (module == "lm_head")
        {
            (shortName, ggufName, label) = ("lm_head", "output.weight", "lm_head");
        }
        else
        {
            throw new PeftAdapterException(
                $"tensor '{a.Name}' targets module '{module}', which has no counterpart in a {arch} base model (supported: {SupportedModules})");
        }

        if (embedding != (shortName == "embed_tokens"))
        {
            throw new PeftAdapterException(embedding
                ? $"{label}: lora_embedding_A/B tensors belong to an embedding layer, but {module} is a linear layer"
                : $"{label}: an embedding layer's LoRA is saved as lora_embedding_A/B, not lora_A/lora_B");
        }
        if (!PeftPatterns.IsTarget(config, module, embedding))
        {
            var targets = config.TargetModules is { } list ? "[" + string.Join(", ", list) + "]" : $"'{config.TargetModulesRegex}'";
            throw new PeftAdapterException($"{label}: the adapter has tensors for module '{module}' but adapter_config.json target_modules {targets} does not include it");
        }
        if (layer is { } index)
        {
            if (index >= baseModel.BlockCount)
            {
                throw new PeftAdapterException(
                    $"{label}: the adapter has layer {index} but the base model ({arch}) has {baseModel.BlockCount} layers (0–{baseModel.BlockCount - 1})");
            }
            if (config.LayersToTransform is { } layers && !layers.Contains(index))
            {
                throw new PeftAdapterException(
                    $"{label}: the adapter has tensors for layer {index} but adapter_config.json layers_to_transform is [{string.Join(", ", layers)}]");
            }
        }
        else if (config.LayersToTransform is { } layers)
        {
            throw new PeftAdapterException(
                $"{label}: the adapter has tensors for {module}, which is in no layer, but adapter_config.json layers_to_transform [{string.Join(", ", layers)}] limits it to layers");
        }

        if (!baseModel.Tensors.TryGetValue(ggufName, out var ne))
        {
            throw new PeftAdapterException(shortName == "lm_head"
                ? $"{label}: the base model ({arch}) has no {ggufName} (its output layer is tied to the token embeddings), so an lm_head LoRA cannot be applied"
                : $"{label}: the base model ({arch}) has no tensor {ggufName} (hint: is this adapter for another base model?)");
        }
        if (ne.Length != 2)
        {
            throw new PeftAdapterException($"{label}: the base model's {ggufName} has {ne.Length} dimensions, not a matrix");
        }
        var aName = embedding ? "lora_embedding_A" : "lora_A";
        var bName = embedding ? "lora_embedding_B" : "lora_B";
        if (a.Shape.Length != 2 || b.Shape.Length != 2)
        {
            var (bad, shape) = a.Shape.Length != 2 ? (aName, a.Shape) : (bName, b.Shape);
            throw new PeftAdapterException($"{label}: {bad} has shape {Shape(shape)}; a LoRA factor is a matrix");
        }
        var baseShort = ggufName[(ggufName.StartsWith("blk.", StringComparison.Ordinal) ? ggufName.IndexOf('.', 4) + 1 : 0)..^".weight".Length];
        // Linear: A [r, in], B [out, r], base ne [in, out]. Embedding: A [r, vocab], B [hidden, r], base ne [hidden, vocab].
        long inFeatures = a.Shape[1], outFeatures = b.Shape[0];
        var (baseIn, baseOut) = embedding ? (ne[1], ne[0]) : (ne[0], ne[1]);
        var (inWord, outWord) = embedding ? ("vocab", "width") : ("in", "out");
        if (inFeatures != baseIn)
        {
            throw new PeftAdapterException($"{label}: adapter {inWord} {inFeatures}, base model {baseShort} {inWord} {baseIn} (hint: is this adapter for another base model?)");
        }
        if (outFeatures != baseOut)
        {
            throw new PeftAdapterException($"{label}: adapter {outWord} {outFeatures}, base model {baseShort} {outWord} {baseOut} (hint: is this adapter for another base model?)");
        }

        var rankKey = PeftPatterns.MatchingKey(config.RankPattern, module, "rank_pattern");
        var alphaKey = PeftPatterns.MatchingKey(config.AlphaPattern, module, "alpha_pattern");
        var rank = rankKey is null ? config.Rank : config.RankPattern.First(p => p.Key == rankKey).Value;
        var alpha = alphaKey is null ? config.LoraAlpha : config.AlphaPattern.First(p => p.Key == alphaKey).Value;
        var rankSource = rankKey is null ? $"r = {config.Rank}" : $"rank_pattern['{rankKey}'] = {rank}";
        if (a.Shape[0] != rank || b.Shape[1] != rank)
        {
            var (bad, shape) = a.Shape[0] != rank ? (aName, a.Shape) : (bName, b.Shape);
            throw new PeftAdapterException($"{label}: {bad} has shape {Shape(shape)}, but adapter_config.json gives {rankSource}");
        }
        if (rank > MaxRank || rank > Math.Min(inFeatures, outFeatures))
        {
            throw new PeftAdapterException(
                $"{label}: rank {rank} is above the limit of {Math.Min(MaxRank, Math.Min(inFeatures, outFeatures))} (at most {MaxRank}, and never more than min(in, out) = {Math.Min(inFeatures, outFeatures)})");
        }
        CheckDtype(label, aName, a);
        CheckDtype(label, bName, b);
        if (permuteHeads > 0 && !LlamaRopePermutation.CanPermute(outFeatures, permuteHeads))
        {
            throw new PeftAdapterException($"{label}: {outFeatures} output rows do not split into {permuteHeads} heads of an even size, which the llama q/k permutation needs");
        }
        var scale = config.UseRslora ? alpha / Math.Sqrt(rank) : alpha / rank;
        return new ModulePlan(module, shortName, ggufName, layer, embedding, rank, alpha, scale, inFeatures, outFeatures, permuteHeads, a, b);
    }

    private static void CheckDtype(string label, string half, SafetensorsTensor tensor)
    {
        if (tensor.Dtype is not ("F32" or "F16" or "BF16"))
        {
            throw new PeftAdapterException($"{label}: {half} is {tensor.Dtype}; only F32, F16 and BF16 adapters can be converted");
        }
        // Tensors are converted in one array each; no sane LoRA factor comes near this.
        if (tensor.ElementCount > MaxTensorElements)
        {
            throw new PeftAdapterException($"{label}: {half} has {tensor.ElementCount:N0} elements; the limit for one LoRA factor is {MaxTensorElements:N0}");
        }
    }

    private const long MaxTensorElements = 256L * 1024 * 1024;

    private static GgmlType OutputType(string dtype) => dtype == "F16" ? GgmlType.F16 : GgmlType.F32;

    private static string Shape(long[] shape) => "[" + string.Join(", ", shape) + "]";

    /// <summary>Writes lora_a: the PEFT bytes (BF16 widened); for the embedding, transposed to [vocab, r] as llama.cpp gathers its rows by token.</summary>
    private static void WriteA(Stream output, SafetensorsHeader header, Stream adapter, ModulePlan module)
    {
        var values = ReadChecked(header, adapter, module.A, module);
        if (module.IsEmbedding)
        {
            values = Transpose(values, module.A.Dtype == "F16" ? 2 : 4, rows: module.Rank, columns: module.In);
        }
        output.Write(values);
    }

    /// <summary>Writes lora_b: scaled by the module's PEFT scale, rows permuted for llama q/k.</summary>
    private static void WriteB(Stream output, SafetensorsHeader header, Stream adapter, ModulePlan module)
    {
        var values = ReadChecked(header, adapter, module.B, module);
        if (module.Scale != 1)
        {
            Scale(values, module.B.Dtype == "F16", module.Scale, module);
        }
        if (module.PermuteHeads > 0)
        {
            values = LlamaRopePermutation.PermuteRows(values, (int)module.Out, module.PermuteHeads);
        }
        output.Write(values);
    }

    /// <summary>Reads a tensor, refuses NaN/Inf, and returns it as F16 (if it was F16) or F32 bytes.</summary>
    private static byte[] ReadChecked(SafetensorsHeader header, Stream adapter, SafetensorsTensor tensor, ModulePlan module)
    {
        var raw = new byte[tensor.ByteLength];
        try
        {
            header.ReadTensor(adapter, tensor.Name, raw);
        }
        catch (EndOfStreamException e)
        {
            throw new PeftAdapterException($"adapter_model.safetensors ended while reading tensor '{tensor.Name}' (the file changed or is truncated)", e);
        }
        long bad = -1;
        switch (tensor.Dtype)
        {
            case "F32":
                for (var i = 0; i < raw.Length && bad < 0; i += 4)
                {
                    if (!float.IsFinite(BinaryPrimitives.ReadSingleLittleEndian(raw.AsSpan(i))))
                    {
                        bad = i / 4;
                    }
                }
                break;
            case "F16":
                for (var i = 0; i < raw.Length && bad < 0; i += 2)
                {
                    if (!Half.IsFinite(BinaryPrimitives.ReadHalfLittleEndian(raw.AsSpan(i))))
                    {
                        bad = i / 2;
                    }
                }
                break;
            default: // BF16 → F32: the upper 16 bits of an F32.
                var widened = new byte[raw.Length * 2];
                for (var i = 0; i < raw.Length / 2; i++)
                {
                    var value = BitConverter.UInt32BitsToSingle((uint)BinaryPrimitives.ReadUInt16LittleEndian(raw.AsSpan(i * 2)) << 16);
                    if (!float.IsFinite(value) && bad < 0)
                    {
                        bad = i;
                    }
                    BinaryPrimitives.WriteSingleLittleEndian(widened.AsSpan(i * 4), value);
                }
                raw = widened;
                break;
        }
        if (bad >= 0)
        {
            throw new PeftAdapterException($"tensor '{tensor.Name}' ({module.Module}) holds NaN or infinity (element {bad}); the adapter is broken");
        }
        return raw;
    }

    private static void Scale(byte[] values, bool f16, double scale, ModulePlan module)
    {
        if (f16)
        {
            for (var i = 0; i < values.Length; i += 2)
            {
                var scaled = (Half)(float)((double)BinaryPrimitives.ReadHalfLittleEndian(values.AsSpan(i)) * scale);
                if (!Half.IsFinite(scaled))
                {
                    throw new PeftAdapterException(
                        $"{module.Module}: lora_B scaled by {scale.ToString(CultureInfo.InvariantCulture)} overflows F16 (element {i / 2}); the adapter's scale is unusable");
                }
                BinaryPrimitives.WriteHalfLittleEndian(values.AsSpan(i), scaled);
            }
            return;
        }
        for (var i = 0; i < values.Length; i += 4)
        {
            var scaled = (float)(BinaryPrimitives.ReadSingleLittleEndian(values.AsSpan(i)) * scale);
            if (!float.IsFinite(scaled))
            {
                throw new PeftAdapterException(
                    $"{module.Module}: lora_B scaled by {scale.ToString(CultureInfo.InvariantCulture)} overflows F32 (element {i / 4}); the adapter's scale is unusable");
            }
            BinaryPrimitives.WriteSingleLittleEndian(values.AsSpan(i), scaled);
        }
    }

    private static byte[] Transpose(byte[] values, int elementSize, long rows, long columns)
    {
        var result = new byte[values.Length];
        for (long r = 0; r < rows; r++)
        {
            for (long c = 0; c < columns; c++)
            {
                values.AsSpan((int)((r * columns + c) * elementSize), elementSize)
                    .CopyTo(result.AsSpan((int)((c * rows + r) * elementSize), elementSize));
            }
        }
        return result;
    }
}
