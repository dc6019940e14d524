using System.Buffers.Binary;
using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using LoraDeploy.Lora.Merge;
using LoraDeploy.Lora.Peft;
using LoraDeploy.Lora.Safetensors;

namespace LoraDeploy.Lora.Conversion;

/// <summary>
/// Re-emits an SD1.5, SDXL or FLUX.1 adapter in another naming convention (kohya, PEFT, diffusers), exactly.
/// </summary>
/// <remarks>
/// <para>Exact: tensors are renamed with their bytes untouched; alpha is carried so that alpha/rank stays what it
/// was (kohya/diffusers: the <c>.alpha</c> scalar; PEFT: <c>lora_alpha</c>, with <c>rank_pattern</c>/<c>alpha_pattern</c>
/// naming every module when modules differ). FLUX's fused q/k/v are split and fused by moving bytes only: fused →
/// split gives every part the shared lora_A and its rows of lora_B; split → fused stacks lora_A, makes lora_B
/// block-diagonal (zeros elsewhere) and multiplies alpha by the growth of the rank, so the fused rank is the sum of
/// the parts'. DoRA magnitudes move between LyCORIS' <c>dora_scale</c> [out, 1, …] and PEFT's
/// <c>lora_magnitude_vector</c> [out] by reshaping (the two apply it alike at strength 1, up to LyCORIS' ε);
/// per-input-channel magnitudes (OneTrainer) have no PEFT form and cannot be split or fused. LoHa, LoKr, Tucker LoCon
/// and full diffs convert to kohya names only; PEFT and diffusers have no form for them.</para>
/// <para>Values are not judged: NaN/Inf are carried and listed in the result (merge is where they are refused).</para>
/// <para>Output: the input's <c>__metadata__</c> (less <c>sshs_*</c>/<c>modelspec.hash_sha256</c>, which hash the old
/// data section) plus <c>loradeploy.convert</c> (from, to, source SHA-256), tensors sorted by name, written to
/// <c>OUT.part</c>, flushed to disk and renamed; on any failure the <c>.part</c> files are deleted.</para>
/// </remarks>
public static partial class AdapterConverter
{
    /// <summary>Metadata key of the conversion record.</summary>
    public const string ConvertRecordKey = "loradeploy.convert";

    private const int MaxListed = 10;
    private const string PeftPrefix = "base_model.model.";
    private const string DiffusersConfigKey = "lora_adapter_metadata";
    private static readonly string[] StaleHashKeys = ["modelspec.hash_sha256", "sshs_model_hash", "sshs_legacy_hash"];

    /// <exception cref="AdapterConvertException">The adapter cannot be converted exactly or the output could not be written; nothing is left behind.</exception>
    public static ConvertResult Convert(string inputPath, AdapterConvention target, string outputPath, ConvertOptions? options = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(inputPath);
        ArgumentNullException.ThrowIfNull(outputPath);
        options ??= new ConvertOptions();
        var started = options.TimeProvider.GetTimestamp();
        if (string.Equals(Path.GetFullPath(inputPath), Path.GetFullPath(outputPath), StringComparison.Ordinal))
        {
            throw new AdapterConvertException($"the output {outputPath} is the input file; write the conversion to another path");
        }

        var tensors = ReadTensors(inputPath, out var metadata);
        cancellationToken.ThrowIfCancellationRequested();
        var config = ReadPeftConfig(inputPath, tensors.Keys, metadata);
        var modules = Group(inputPath, tensors, config, options.Architecture, out var from, out var kohyaPrefixes);
        var architecture = options.Architecture ?? Detect(modules, metadata, kohyaPrefixes);
        var rankGrown = new List<string>();
        var converted = Retarget(modules, target, rankGrown);
        if ((target == AdapterConvention.Kohya && converted.Any(m => m.Path.Part is ModelPart.Unet or ModelPart.ClipL)) && architecture is null)
        {
            throw new AdapterConvertException($"adapter {inputPath}: cannot tell an SD1.5 adapter from an SDXL one (kohya names differ between them); say which with the architecture option");
        }
        var single = converted.Select(m => m.Path.Part).Distinct().Count() == 1;
        var output = Render(converted, target, architecture ?? AdapterArchitecture.SDXL, single);
        var nonFinite = output.Where(t => HasNonFinite(t.Value)).Select(t => t.Key).ToList();
        var sha256 = SafetensorsHashes.FileSha256(inputPath);
        var headerBytes = HeaderBytes(metadata, output, from, target, sha256, Path.GetFileName(inputPath));
        var configBytes = target == AdapterConvention.Peft ? PeftConfigBytes(converted, single) : null;
        cancellationToken.ThrowIfCancellationRequested();

        var configPath = configBytes is null ? null : Path.Combine(Path.GetDirectoryName(Path.GetFullPath(outputPath))!, "adapter_config.json");
        var bytesWritten = Write(outputPath, headerBytes, output.Values, configPath, configBytes, options);
        return new ConvertResult(outputPath, configPath, from, target, architecture, modules.Count, converted.Count,
            output.Values.Count(t => !t.Built), output.Values.Count(t => t.Built), rankGrown, nonFinite, sha256, bytesWritten,
            options.TimeProvider.GetElapsedTime(started));
    }

    private static SortedDictionary<string, RawTensor> ReadTensors(string path, out IReadOnlyDictionary<string, string> metadata)
    {
        SafetensorsHeader header;
        try
        {
            header = SafetensorsReader.ReadFile(path);
        }
        catch (SafetensorsFormatException e)
        {
            throw new AdapterConvertException($"adapter {path} is not a valid safetensors file: {e.Message}", e);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new AdapterConvertException($"adapter {path}: {e.Message}", e);
        }
        using (header)
        {
            metadata = header.Metadata;
            var tensors = new SortedDictionary<string, RawTensor>(StringComparer.Ordinal);
            using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1);
            foreach (var tensor in header.Tensors)
            {
                if (tensor.ByteLength > Array.MaxLength)
                {
                    throw new AdapterConvertException($"adapter {path}: tensor '{tensor.Name}' is {tensor.ByteLength} bytes, too large for an adapter factor");
                }
                var bytes = new byte[tensor.ByteLength];
                header.ReadTensor(file, tensor.Name, bytes);
                tensors.Add(tensor.Name, new RawTensor(tensor.Dtype, tensor.Shape, bytes));
            }
            return tensors;
        }
    }

    /// <summary>The <c>adapter_config.json</c> beside a PEFT-named adapter, as merge reads it.</summary>
    private static PeftAdapterConfig? ReadPeftConfig(string path, IEnumerable<string> names, IReadOnlyDictionary<string, string> metadata)
    {
        if (!names.Any(name => name.Contains(".lora_A.", StringComparison.Ordinal) || name.EndsWith(".lora_A", StringComparison.Ordinal)))
        {
            return null;
        }
        var beside = Path.Combine(Path.GetDirectoryName(Path.GetFullPath(path))!, "adapter_config.json");
        if (!File.Exists(beside))
        {
            return metadata.ContainsKey(DiffusersConfigKey)
                ? throw new AdapterConvertException($"adapter {path} carries its LoRA config in __metadata__ '{DiffusersConfigKey}' (diffusers), which convert does not read yet; save that config as adapter_config.json beside the adapter")
                : null;
        }
        PeftAdapterConfig config;
        try
        {
            config = PeftAdapterConfig.ReadFile(beside);
        }
        catch (PeftAdapterException e)
        {
            throw new AdapterConvertException($"adapter {path}: {beside}: {e.Message}", e);
        }
        if (config.PeftType != "LORA")
        {
            throw new AdapterConvertException($"adapter {path}: adapter_config.json peft_type is '{config.PeftType}'; only LORA adapters convert");
        }
        return config;
    }

    /// <summary>Splits the tensors into modules, names each, and checks it is a whole module of a type convert carries; every problem is listed.</summary>
    private static List<ConvertModule> Group(string path, SortedDictionary<string, RawTensor> tensors, PeftAdapterConfig? config, AdapterArchitecture? architecture, out string from, out HashSet<string> kohyaPrefixes)
    {
        var groups = new Dictionary<string, Dictionary<string, (string Name, RawTensor Tensor)>>(StringComparer.Ordinal);
        var order = new List<string>();
        var problems = new List<string>();
        foreach (var (name, tensor) in tensors)
        {
            // PEFT's DoRA magnitude is saved without ".weight"; some exports add it.
            var key = name.EndsWith(".lora_magnitude_vector.weight", StringComparison.Ordinal) ? name[..^".weight".Length] : name;
            var kind = LoraKeys.Split(key, out var moduleLength);
            if ((kind is ParamKind.EmbeddingA or ParamKind.EmbeddingB ? null : LoraKeys.ParamName(kind, key)) is not { } param)
            {
                problems.Add($"'{name}' ({(kind is ParamKind.Unknown or ParamKind.PlainWeight ? "not an adapter factor" : $"a {kind} parameter, a network type convert does not carry")})");
                continue;
            }
            var module = key[..moduleLength];
            if (!groups.TryGetValue(module, out var group))
            {
                groups[module] = group = new(StringComparer.Ordinal);
                order.Add(module);
            }
            if (!group.TryAdd(param, (name, tensor)))
            {
                problems.Add($"'{group[param].Name}' and '{name}' (both the {param} of module '{module}')");
            }
        }
        if (problems.Count > 0)
        {
            throw new AdapterConvertException($"adapter {path}: {problems.Count} tensor(s) cannot be converted: {List(problems)}");
        }
        if (order.Count == 0)
        {
            throw new AdapterConvertException($"adapter {path} holds no tensors");
        }

        var styles = new SortedSet<string>(StringComparer.Ordinal);
        kohyaPrefixes = new HashSet<string>(StringComparer.Ordinal);
        var unmapped = new List<string>();
        var ambiguous = new List<string>();
        var modules = new List<ConvertModule>();
        foreach (var module in order)
        {
            var modulePath = AdapterModuleNames.Parse(module, out var kohyaPrefix, out var style);
            if (modulePath is null)
            {
                unmapped.Add(module);
                continue;
            }
            if (kohyaPrefix is not null)
            {
                kohyaPrefixes.Add(kohyaPrefix);
            }
            // FLUX.1 files in diffusers names carry a component prefix (transformer., lora_transformer_, PEFT's wrapper);
            // bare or lora_unet_ diffusers DiT names are Qwen-Image's as much as FLUX's.
            if (modulePath is { Part: ModelPart.Flux, Bfl: false } && style is PrefixStyle.Bare or PrefixStyle.Kohya && architecture != AdapterArchitecture.Flux1)
            {
                ambiguous.Add(module);
            }
            var p = groups[module].ToDictionary(e => e.Key, e => e.Value.Tensor, StringComparer.Ordinal);
            styles.Add(style switch
            {
                PrefixStyle.Kohya => "kohya",
                PrefixStyle.OneTrainer => "onetrainer",
                PrefixStyle.Lycoris => "lycoris",
                PrefixStyle.Peft => "peft",
                PrefixStyle.Diffusers => groups[module].ContainsKey("down") && groups[module]["down"].Name.Contains(".lora_A", StringComparison.Ordinal) ? "diffusers" : "diffusers-old",
                PrefixStyle.DiffusionModel => "comfyui",
                _ => module.Contains(".processor.", StringComparison.Ordinal) ? "xlabs" : modulePath.Bfl ? "bfl" : "bare",
            });
            try
            {
                modules.Add(Build(module, modulePath, p, config, dotted: groups[module].TryGetValue("down", out var down) && down.Name.Contains(".lora_A", StringComparison.Ordinal)));
            }
            catch (AdapterConvertException e)
            {
                problems.Add(e.Message);
            }
        }
        if (unmapped.Count > 0)
        {
            throw new AdapterConvertException($"adapter {path}: {unmapped.Count} module(s) name no SD1.5, SDXL or FLUX.1 layer this converter knows: {List(unmapped)}");
        }
        if (ambiguous.Count > 0)
        {
            throw new AdapterConvertException($"adapter {path}: {ambiguous.Count} module(s) have diffusers DiT names without the FLUX.1 'transformer.' prefix, which Qwen-Image shares ({List(ambiguous)}); if it is a FLUX.1 adapter, say so with the architecture option");
        }
        if (problems.Count > 0)
        {
            throw new AdapterConvertException($"adapter {path}: {problems.Count} problem(s): {List(problems)}");
        }
        from = styles.Count == 1 && config is not null && styles.Contains("peft") ? "peft" : string.Join("+", styles);
        return modules;
    }

    private static ConvertModule Build(string module, ModulePath path, Dictionary<string, RawTensor> p, PeftAdapterConfig? config, bool dotted)
    {
        string type;
        string[] allowed;
        if (p.ContainsKey("down") || p.ContainsKey("up"))
        {
            if (!p.TryGetValue("down", out var down) || !p.TryGetValue("up", out var up))
            {
                throw new AdapterConvertException($"module '{module}' has only one of lora_down/lora_A and lora_up/lora_B");
            }
            if (down.Shape.Length is not (2 or 4) || up.Shape.Length != down.Shape.Length || !p.ContainsKey("mid") && up.Shape[1] != down.Shape[0])
            {
                throw new AdapterConvertException($"module '{module}': lora_up {RawTensor.ShapeText(up.Shape)} and lora_down {RawTensor.ShapeText(down.Shape)} are not a LoRA pair");
            }
            type = p.ContainsKey("mid") ? "LoCon (Tucker)" : down.Shape.Length == 4 ? "LoCon" : "LoRA";
            allowed = ["down", "up", "mid", "alpha", "dora_scale", "magnitude", "up_bias"];
        }
        else if (p.Keys.Any(k => k.StartsWith("hada_", StringComparison.Ordinal)))
        {
            type = "LoHa";
            allowed = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"];
        }
        else if (p.Keys.Any(k => k.StartsWith("lokr_", StringComparison.Ordinal)))
        {
            type = "LoKr";
            allowed = ["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "dora_scale"];
        }
        else if (p.ContainsKey("diff"))
        {
            type = "Full";
            allowed = ["diff", "diff_b"];
        }
        else
        {
            throw new AdapterConvertException($"module '{module}' has only {string.Join(", ", p.Keys)}, no weight factors");
        }
        var stray = p.Keys.Where(k => !allowed.Contains(k)).ToList();
        if (stray.Count > 0)
        {
            throw new AdapterConvertException($"module '{module}' ({type}) also has {string.Join(", ", stray)}, which do not belong to that network type");
        }
        double? configAlpha = null;
        if (config is not null && dotted)
        {
            if (p.ContainsKey("alpha"))
            {
                throw new AdapterConvertException($"module '{module}' has an alpha tensor and an adapter_config.json; which alpha applies is ambiguous");
            }
            configAlpha = PeftAlpha(module, config, p["down"].Shape[0]);
        }
        return new ConvertModule { Source = module, Path = path, Type = type, Params = p, ConfigAlpha = configAlpha };
    }

    /// <summary>The alpha that gives the module PEFT's scale at its rank: lora_alpha (or its alpha_pattern), ×√r/r·r with rsLoRA.</summary>
    private static double PeftAlpha(string module, PeftAdapterConfig config, long rank)
    {
        var name = module.StartsWith(PeftPrefix, StringComparison.Ordinal) ? module[PeftPrefix.Length..] : module;
        try
        {
            var rankKey = PeftPatterns.MatchingKey(config.RankPattern, name, "rank_pattern");
            var alphaKey = PeftPatterns.MatchingKey(config.AlphaPattern, name, "alpha_pattern");
            var expectedRank = rankKey is null ? config.Rank : config.RankPattern.First(p => p.Key == rankKey).Value;
            var alpha = alphaKey is null ? config.LoraAlpha : config.AlphaPattern.First(p => p.Key == alphaKey).Value;
            if (expectedRank != rank)
            {
                throw new AdapterConvertException($"module '{module}' has rank {rank}, but adapter_config.json gives {(rankKey is null ? $"r = {config.Rank}" : $"rank_pattern['{rankKey}'] = {expectedRank}")}");
            }
            return config.UseRslora ? alpha / Math.Sqrt(rank) * rank : alpha;
        }
        catch (PeftAdapterException e)
        {
            throw new AdapterConvertException($"module '{module}': {e.Message}", e);
        }
    }

    /// <summary>
    /// SD1.5 or SDXL from the modules (SDXL: CLIP-G, transformer depth above 1, attention in up block 0, cross-attention
    /// width 2048; SD1.5: attention in down block 0, a fourth down/up block, width 768, the <c>lora_te_</c> prefix),
    /// then from metadata; FLUX.1 from its own names. Null when nothing tells.
    /// </summary>
    private static AdapterArchitecture? Detect(List<ConvertModule> modules, IReadOnlyDictionary<string, string> metadata, HashSet<string> kohyaPrefixes)
    {
        if (modules.Any(m => m.Path.Part is ModelPart.Flux or ModelPart.T5))
        {
            return AdapterArchitecture.Flux1;
        }
        bool sd15 = kohyaPrefixes.Contains("lora_te_"), sdxl = modules.Any(m => m.Path.Part == ModelPart.ClipG);
        foreach (var module in modules.Where(m => m.Path.Part == ModelPart.Unet))
        {
            var path = module.Path.Path;
            if (DeepTransformer().IsMatch(path) || path.StartsWith("up_blocks.0.attentions.", StringComparison.Ordinal))
            {
                sdxl = true;
            }
            if (path.StartsWith("down_blocks.0.attentions.", StringComparison.Ordinal) || path.StartsWith("down_blocks.3.", StringComparison.Ordinal) || path.StartsWith("up_blocks.3.", StringComparison.Ordinal))
            {
                sd15 = true;
            }
            if (CrossAttentionInput().IsMatch(path) && module.Params.TryGetValue("down", out var down) && down.Shape.Length >= 2)
            {
                sdxl |= down.Shape[1] == 2048;
                sd15 |= down.Shape[1] is 768 or 1024;
            }
        }
        if (sd15 && sdxl)
        {
            throw new AdapterConvertException("the adapter's modules fit both SD1.5 and SDXL layouts (e.g. attention in down block 0 and CLIP-G); it is not one model's adapter");
        }
        if (sd15 || sdxl)
        {
            return sdxl ? AdapterArchitecture.SDXL : AdapterArchitecture.SD15;
        }
        var version = metadata.GetValueOrDefault("ss_base_model_version") ?? "";
        var spec = metadata.GetValueOrDefault("modelspec.architecture") ?? "";
        if (version.StartsWith("sdxl", StringComparison.Ordinal) || spec.StartsWith("stable-diffusion-xl", StringComparison.Ordinal))
        {
            return AdapterArchitecture.SDXL;
        }
        if (version.StartsWith("sd_v", StringComparison.Ordinal) || spec.StartsWith("stable-diffusion-v", StringComparison.Ordinal))
        {
            return AdapterArchitecture.SD15;
        }
        // Text encoder only, written lora_te1_: SDXL and FLUX name it alike.
        return modules.All(m => m.Path.Part == ModelPart.ClipL) && kohyaPrefixes.Contains("lora_te1_") ? AdapterArchitecture.SDXL : null;
    }

    [GeneratedRegex(@"\.transformer_blocks\.[1-9]")]
    private static partial Regex DeepTransformer();

    [GeneratedRegex(@"\.attn2\.to_[kv]\z")]
    private static partial Regex CrossAttentionInput();

    /// <summary>Puts FLUX modules into the naming <paramref name="target"/> uses (BFL for kohya, diffusers otherwise), splitting or fusing q/k/v.</summary>
    private static List<ConvertModule> Retarget(List<ConvertModule> modules, AdapterConvention target, List<string> rankGrown)
    {
        var bfl = target == AdapterConvention.Kohya;
        var result = new List<ConvertModule>();
        var fusedParts = new Dictionary<string, (FluxRelation Relation, ConvertModule?[] Parts)>(StringComparer.Ordinal);
        var fusedOrder = new List<string>();
        foreach (var module in modules)
        {
            if (module.Path.Part != ModelPart.Flux || module.Path.Bfl == bfl)
            {
                result.Add(module);
            }
            else if (bfl)
            {
                var path = FluxModuleNames.BflOf(module.Path.Path, out var relation, out var part)!;
                var target1 = new ModulePath(ModelPart.Flux, path, Bfl: true);
                switch (relation)
                {
                    case FluxRelation.Same:
                        result.Add(module.With(target1));
                        break;
                    case FluxRelation.SwappedHalves:
                        result.Add(FusedModules.SwapHalves(module, target1));
                        break;
                    default:
                        if (!fusedParts.TryGetValue(path, out var entry))
                        {
                            fusedParts[path] = entry = (relation, new ConvertModule?[relation == FluxRelation.QkvPart ? 3 : 4]);
                            fusedOrder.Add(path);
                        }
                        if (entry.Parts[part] is { } other)
                        {
                            throw new AdapterConvertException($"modules '{other.Source}' and '{module.Source}' are the same part of {path}");
                        }
                        entry.Parts[part] = module;
                        break;
                }
            }
            else
            {
                var paths = FluxModuleNames.DiffusersOf(module.Path.Path, out var relation)!;
                if (relation == FluxRelation.Same)
                {
                    result.Add(module.With(new ModulePath(ModelPart.Flux, paths[0])));
                }
                else if (relation == FluxRelation.SwappedHalves)
                {
                    result.Add(FusedModules.SwapHalves(module, new ModulePath(ModelPart.Flux, paths[0])));
                }
                else
                {
                    result.AddRange(FusedModules.Split(module, paths, relation));
                }
            }
        }
        foreach (var path in fusedOrder)
        {
            var (relation, parts) = fusedParts[path];
            result.Add(FusedModules.Fuse(path, parts, relation, out var grown));
            rankGrown.Add(grown);
        }
        var clash = result.GroupBy(m => m.Path).FirstOrDefault(g => g.Count() > 1);
        if (clash is not null)
        {
            throw new AdapterConvertException($"modules {string.Join(" and ", clash.Select(m => $"'{m.Source}'"))} both become {clash.Key.Path}");
        }
        return result;
    }

    /// <summary>Every output tensor by its name in <paramref name="target"/>.</summary>
    private static SortedDictionary<string, RawTensor> Render(List<ConvertModule> modules, AdapterConvention target, AdapterArchitecture architecture, bool single)
    {
        var output = new SortedDictionary<string, RawTensor>(StringComparer.Ordinal);
        var problems = new List<string>();
        foreach (var module in modules)
        {
            var name = AdapterModuleNames.Render(module.Path, target, architecture, single);
            if (target != AdapterConvention.Kohya)
            {
                if (!module.IsLora)
                {
                    problems.Add($"'{module.Source}' is {module.Type}, which the {Name(target)} convention has no form for (it holds LoRA/LoCon and DoRA only); convert it to kohya");
                    continue;
                }
                if (module.Dora is not null && !module.DoraPerOutputRow)
                {
                    problems.Add($"'{module.Source}' has a DoRA magnitude per input channel ({RawTensor.ShapeText(module.Dora.Shape)}), which PEFT's lora_magnitude_vector (per output row) cannot express");
                    continue;
                }
                if (target == AdapterConvention.Peft && module.Alpha == 0)
                {
                    problems.Add($"'{module.Source}' has alpha 0, which kohya reads as alpha = rank and PEFT as scale 0");
                    continue;
                }
            }
            foreach (var (param, tensor) in module.Params)
            {
                var (suffix, shaped) = (target, param) switch
                {
                    (AdapterConvention.Kohya, "down") => (".lora_down.weight", tensor),
                    (AdapterConvention.Kohya, "up") => (".lora_up.weight", tensor),
                    (AdapterConvention.Kohya, "mid") => (".lora_mid.weight", tensor),
                    (AdapterConvention.Kohya, "up_bias") => (".lora_up.bias", tensor),
                    // PEFT's [out] magnitude as LyCORIS' [out, 1, …] (as many 1s as the weight has further axes).
                    (AdapterConvention.Kohya, "magnitude") => (".dora_scale", tensor with { Shape = [tensor.Shape[0], .. Enumerable.Repeat(1L, module.Up.Shape.Length - 1)] }),
                    (AdapterConvention.Kohya, _) => ("." + param, tensor),
                    (_, "down") => (".lora_A.weight", tensor),
                    (_, "up") => (".lora_B.weight", tensor),
                    (_, "up_bias") => (".lora_B.bias", tensor),
                    (_, "magnitude") => (".lora_magnitude_vector", tensor),
                    (_, "dora_scale") => (".lora_magnitude_vector", tensor with { Shape = [tensor.Shape[0]] }),
                    (AdapterConvention.Diffusers, "alpha") => (".alpha", tensor),
                    // PEFT: alpha goes to adapter_config.json.
                    _ => (null, tensor),
                };
                if (suffix is not null)
                {
                    output[name + suffix] = shaped;
                }
            }
            if (target != AdapterConvention.Peft && !module.Params.ContainsKey("alpha") && module.ConfigAlpha is { } alpha)
            {
                output[name + ".alpha"] = RawTensor.Alpha(alpha, module.Up.Dtype);
            }
        }
        if (problems.Count > 0)
        {
            throw new AdapterConvertException($"cannot convert to {Name(target)}: {problems.Count} module(s) have no exact form there: {List(problems)}");
        }
        return output;
    }

    private static string Name(AdapterConvention convention) => convention.ToString().ToLowerInvariant();

    /// <summary>
    /// PEFT's adapter_config.json: the most common rank and alpha as <c>r</c>/<c>lora_alpha</c>; when modules differ,
    /// every module named in <c>rank_pattern</c>/<c>alpha_pattern</c> (PEFT matches a pattern key as a suffix, so a key
    /// for one module could otherwise catch another, e.g. <c>proj_out</c> and <c>…single_transformer_blocks.0.proj_out</c>).
    /// </summary>
    private static byte[] PeftConfigBytes(List<ConvertModule> modules, bool single)
    {
        var entries = modules
            .Select(m => (Name: AdapterModuleNames.Render(m.Path, AdapterConvention.Peft, AdapterArchitecture.SDXL, single)[PeftPrefix.Length..], m.Rank, Alpha: m.Alpha ?? m.Rank))
            .OrderBy(e => e.Name, StringComparer.Ordinal)
            .ToList();
        var rank = entries.GroupBy(e => e.Rank).OrderByDescending(g => g.Count()).ThenBy(g => g.Key).First().Key;
        var alpha = entries.GroupBy(e => e.Alpha).OrderByDescending(g => g.Count()).ThenBy(g => g.Key).First().Key;
        var uniform = entries.All(e => e.Rank == rank && e.Alpha == alpha);
        var dora = modules.Count(m => m.Dora is not null);
        if (dora > 0 && dora < modules.Count)
        {
            throw new AdapterConvertException($"cannot convert to peft: {dora} of {modules.Count} modules are DoRA, but adapter_config.json's use_dora applies to all");
        }
        var config = new JsonObject
        {
            ["peft_type"] = "LORA",
            ["r"] = rank,
            ["lora_alpha"] = alpha,
            ["target_modules"] = new JsonArray([.. entries.Select(e => (JsonNode)e.Name)]),
            ["rank_pattern"] = uniform ? new JsonObject() : new JsonObject(entries.Select(e => KeyValuePair.Create(e.Name, (JsonNode?)e.Rank))),
            ["alpha_pattern"] = uniform ? new JsonObject() : new JsonObject(entries.Select(e => KeyValuePair.Create(e.Name, (JsonNode?)e.Alpha))),
            ["use_rslora"] = false,
            ["use_dora"] = dora > 0,
            ["lora_bias"] = modules.Any(m => m.Params.ContainsKey("up_bias")),
            ["bias"] = "none",
            ["fan_in_fan_out"] = false,
            ["lora_dropout"] = 0.0,
            ["init_lora_weights"] = true,
        };
        return System.Text.Encoding.UTF8.GetBytes(config.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
    }

    private static bool HasNonFinite(RawTensor tensor)
    {
        if (!FloatCodec.IsSupported(tensor.Dtype))
        {
            return false;
        }
        var values = new float[tensor.Bytes.Length / tensor.ElementSize];
        FloatCodec.Decode(tensor.Bytes, tensor.Dtype, values);
        return Array.Exists(values, v => !float.IsFinite(v));
    }

    private static byte[] HeaderBytes(IReadOnlyDictionary<string, string> inputMetadata, SortedDictionary<string, RawTensor> tensors, string from, AdapterConvention to, string sha256, string file)
    {
        var metadata = new Dictionary<string, string>(inputMetadata, StringComparer.Ordinal);
        foreach (var key in StaleHashKeys)
        {
            metadata.Remove(key);
        }
        metadata[ConvertRecordKey] = ConvertRecord(inputMetadata.GetValueOrDefault(ConvertRecordKey), from, Name(to), sha256, file);

        using var json = new MemoryStream();
        using (var writer = new Utf8JsonWriter(json, new JsonWriterOptions { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping }))
        {
            writer.WriteStartObject();
            writer.WriteStartObject("__metadata__");
            foreach (var (key, value) in metadata)
            {
                writer.WriteString(key, value);
            }
            writer.WriteEndObject();
            long offset = 0;
            foreach (var (name, tensor) in tensors)
            {
                writer.WriteStartObject(name);
                writer.WriteString("dtype", tensor.Dtype);
                writer.WriteStartArray("shape");
                foreach (var dim in tensor.Shape)
                {
                    writer.WriteNumberValue(dim);
                }
                writer.WriteEndArray();
                writer.WriteStartArray("data_offsets");
                writer.WriteNumberValue(offset);
                writer.WriteNumberValue(offset + tensor.Bytes.Length);
                writer.WriteEndArray();
                writer.WriteEndObject();
                offset += tensor.Bytes.Length;
            }
            writer.WriteEndObject();
        }
        return LoraMerger.FrameHeader(json) ?? throw new AdapterConvertException(
            $"the converted header would be {json.Length} bytes, over the safetensors limit of {SafetensorsReader.MaxHeaderLength}");
    }

    private static string ConvertRecord(string? earlier, string from, string to, string sha256, string file)
    {
        JsonArray array;
        try
        {
            array = earlier is null ? [] : JsonNode.Parse(earlier) as JsonArray ?? throw new AdapterConvertException($"the input's __metadata__ '{ConvertRecordKey}' is not a JSON list");
        }
        catch (JsonException e)
        {
            throw new AdapterConvertException($"the input's __metadata__ '{ConvertRecordKey}' is not valid JSON: {e.Message}", e);
        }
        array.Add(new JsonObject { ["from"] = from, ["to"] = to, ["source_sha256"] = sha256, ["source_file"] = file });
        return array.ToJsonString();
    }

    private static long Write(string outputPath, byte[] header, IEnumerable<RawTensor> tensors, string? configPath, byte[]? configBytes, ConvertOptions options)
    {
        var part = outputPath + ".part";
        var configPart = configPath + ".part";
        long written = header.Length;
        try
        {
            using (var output = options.OpenOutput?.Invoke(part) ?? new FileStream(part, FileMode.Create, FileAccess.Write, FileShare.None, bufferSize: 1 << 20))
            {
                output.Write(header);
                foreach (var tensor in tensors)
                {
                    output.Write(tensor.Bytes);
                    written += tensor.Bytes.Length;
                }
                Flush(output);
            }
            if (configBytes is not null)
            {
                using var config = options.OpenOutput?.Invoke(configPart) ?? new FileStream(configPart, FileMode.Create, FileAccess.Write, FileShare.None);
                config.Write(configBytes);
                Flush(config);
            }
            File.Move(part, outputPath, overwrite: true);
            if (configBytes is not null)
            {
                File.Move(configPart, configPath!, overwrite: true);
            }
        }
        catch (Exception e)
        {
            TryDelete(part);
            if (configBytes is not null)
            {
                TryDelete(configPart);
            }
            if (e is IOException or UnauthorizedAccessException)
            {
                throw new AdapterConvertException($"writing {outputPath} failed: {e.Message} (no output was left)", e);
            }
            throw;
        }
        return written;

        static void Flush(Stream stream)
        {
            stream.Flush();
            if (stream is FileStream file)
            {
                file.Flush(flushToDisk: true);
            }
        }
    }

    private static string List(List<string> items) =>
        string.Join(", ", items.Take(MaxListed)) + (items.Count > MaxListed ? $", … ({items.Count - MaxListed} more)" : "");

    private static void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // The original error is the one to report.
        }
    }
}
