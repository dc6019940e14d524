using System.Globalization;
using System.Runtime.InteropServices;
using System.Text.RegularExpressions;
using LoraDeploy.Lora.Peft;
using LoraDeploy.Lora.Safetensors;

namespace LoraDeploy.Lora.Merge;

/// <summary>One adapter tensor, widened to float.</summary>
internal sealed record AdapterTensor(string Name, long[] Shape, float[] Values);

/// <summary>A DoRA magnitude: PEFT's <c>lora_magnitude_vector</c> [out] or LyCORIS' <c>dora_scale</c> ([out,1,…] or [1,in,…]).</summary>
internal sealed record DoraMagnitude(AdapterTensor Tensor, bool PeftConvention);

/// <summary>One adapter module ready to merge: its delta, its alpha/rank scale and the optional DoRA magnitude and bias delta.</summary>
internal sealed class ModulePatch
{
    /// <summary>The module name as the adapter writes it (its tensors' names without the parameter suffix).</summary>
    public required string Module { get; init; }

    public required string NetworkType { get; init; }

    public required DeltaSource Delta { get; init; }

    /// <summary>alpha/rank (alpha/√rank with rsLoRA), without the user strength.</summary>
    public required double Scale { get; init; }

    public DoraMagnitude? Dora { get; init; }

    /// <summary>A bias delta [out] (PEFT <c>lora_B.bias</c>, LyCORIS <c>diff_b</c>), added to the base's bias.</summary>
    public AdapterTensor? BiasDelta { get; init; }

    /// <summary>True for PEFT-style lora_A/lora_B names, whose module path is a dotted base path.</summary>
    public bool DottedNames { get; init; }
}

/// <summary>An adapter file read into memory (adapters are small next to the base) and split into modules.</summary>
internal sealed class LoadedAdapter
{
    private const string PeftPrefix = "base_model.model.";
    private const int MaxErrors = 10;

    public required string Path { get; init; }
    public required string Sha256 { get; init; }
    public required double Strength { get; init; }
    public required IReadOnlyList<ModulePatch> Modules { get; init; }

    public static LoadedAdapter Load(MergeAdapter adapter)
    {
        if (!double.IsFinite(adapter.Strength))
        {
            throw new LoraMergeException($"adapter {adapter.Path}: strength {adapter.Strength} is not a finite number");
        }
        // Hashed on another core while the tensors are read (the record needs it only once the merge writes its header).
        var sha256 = Task.Run(() => SafetensorsHashes.FileSha256(adapter.Path));
        var tensors = ReadTensors(adapter.Path, out var metadata);
        var config = adapter.PeftConfig;
        if (config is null && tensors.Keys.Any(name => name.Contains(".lora_A.", StringComparison.Ordinal) || name.EndsWith(".lora_A", StringComparison.Ordinal)))
        {
            var beside = System.IO.Path.Combine(System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(adapter.Path))!, "adapter_config.json");
            if (!File.Exists(beside) && metadata.ContainsKey(DiffusersConfigKey))
            {
                // Its alpha and rank patterns would set the scale; merging at alpha = r instead would be silently wrong.
                throw new LoraMergeException(
                    $"adapter {adapter.Path} carries its LoRA config in __metadata__ '{DiffusersConfigKey}' (diffusers), which merge does not read yet; save that config as adapter_config.json beside the adapter");
            }
            if (File.Exists(beside))
            {
                try
                {
                    config = PeftAdapterConfig.ReadFile(beside);
                }
                catch (PeftAdapterException e)
                {
                    throw new LoraMergeException($"adapter {adapter.Path}: {beside}: {e.Message}", e);
                }
            }
        }
        if (config is not null && config.PeftType != "LORA")
        {
            throw new LoraMergeException($"adapter {adapter.Path}: adapter_config.json peft_type is '{config.PeftType}'; only LORA adapters can be merged");
        }
        if (config is { FanInFanOut: true })
        {
            throw new LoraMergeException($"adapter {adapter.Path}: adapter_config.json has fan_in_fan_out = true (GPT-2-style Conv1D layers stored transposed), which merge does not support");
        }
        var modules = ParseModules(adapter.Path, tensors, config);
        return new LoadedAdapter
        {
            Path = adapter.Path,
            Sha256 = sha256.GetAwaiter().GetResult(),
            Strength = adapter.Strength,
            Modules = modules,
        };
    }

    private const string DiffusersConfigKey = "lora_adapter_metadata";

    private static Dictionary<string, AdapterTensor> ReadTensors(string path, out IReadOnlyDictionary<string, string> metadata)
    {
        SafetensorsHeader header;
        try
        {
            header = SafetensorsReader.ReadFile(path);
        }
        catch (SafetensorsFormatException e)
        {
            throw new LoraMergeException($"adapter {path} is not a valid safetensors file: {e.Message}", e);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new LoraMergeException($"adapter {path}: {e.Message}", e);
        }
        using (header)
        {
            metadata = header.Metadata;
            var list = header.Tensors;
            foreach (var tensor in list)
            {
                if (!FloatCodec.IsSupported(tensor.Dtype))
                {
                    throw new LoraMergeException($"adapter {path}: tensor '{tensor.Name}' is {tensor.Dtype}; only F32, F16 and BF16 adapters can be merged");
                }
                if (tensor.ByteLength > Array.MaxLength)
                {
                    throw new LoraMergeException($"adapter {path}: tensor '{tensor.Name}' is {tensor.ByteLength} bytes, too large for an adapter factor");
                }
            }
            // Read and checked on every core: a large adapter is read into memory the process touches for the first
            // time, which is slow in a VM, and the merge cannot start before it is in.
            var values = new float[list.Count][];
            var nonFinite = new int[list.Count];
            try
            {
                using var file = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.Read);
                Parallel.For(0, list.Count, i =>
                {
                    var tensor = list[i];
                    var tensorValues = new float[tensor.ElementCount];
                    if (tensor.Dtype == "F32" && BitConverter.IsLittleEndian)
                    {
                        // The file's bytes are the values: read them in place, without a second buffer per tensor (for a
                        // large adapter that garbage would add its whole size to the merge's peak memory).
                        ReadExactly(file, header.DataOffset + tensor.DataStart, MemoryMarshal.AsBytes(tensorValues.AsSpan()), path, tensor.Name);
                    }
                    else
                    {
                        var bytes = new byte[tensor.ByteLength];
                        ReadExactly(file, header.DataOffset + tensor.DataStart, bytes, path, tensor.Name);
                        FloatCodec.Decode(bytes, tensor.Dtype, tensorValues);
                    }
                    values[i] = tensorValues;
                    nonFinite[i] = FloatCodec.IndexOfNonFinite(tensorValues);
                });
            }
            catch (AggregateException e)
            {
                // Reported as one read would have: the first failure (an I/O error or a file that ended early).
                var first = e.Flatten().InnerExceptions[0];
                throw first is LoraMergeException merge ? merge : new LoraMergeException($"adapter {path}: {first.Message}", first);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                throw new LoraMergeException($"adapter {path}: {e.Message}", e);
            }

            var tensors = new Dictionary<string, AdapterTensor>(StringComparer.Ordinal);
            for (var i = 0; i < list.Count; i++)
            {
                if (nonFinite[i] >= 0)
                {
                    throw new LoraMergeException($"adapter {path}: tensor '{list[i].Name}' holds {values[i][nonFinite[i]]} at element {nonFinite[i]}; an adapter with NaN/Inf cannot be merged");
                }
                tensors.Add(list[i].Name, new AdapterTensor(list[i].Name, list[i].Shape, values[i]));
            }
            return tensors;
        }
    }

    private static void ReadExactly(Microsoft.Win32.SafeHandles.SafeFileHandle file, long position, Span<byte> destination, string path, string name)
    {
        while (destination.Length > 0)
        {
            var read = RandomAccess.Read(file, destination, position);
            if (read == 0)
            {
                throw new LoraMergeException($"adapter {path} ended while reading tensor '{name}' (was it changed during the merge?)");
            }
            destination = destination[read..];
            position += read;
        }
    }

    private static List<ModulePatch> ParseModules(string path, Dictionary<string, AdapterTensor> tensors, PeftAdapterConfig? config)
    {
        var groups = new Dictionary<string, Dictionary<string, AdapterTensor>>(StringComparer.Ordinal);
        var order = new List<string>();
        var errors = new List<string>();
        foreach (var (name, tensor) in tensors)
        {
            // PEFT's DoRA magnitude is saved without ".weight"; some exports add it.
            var key = name.EndsWith(".lora_magnitude_vector.weight", StringComparison.Ordinal) ? name[..^".weight".Length] : name;
            var kind = LoraKeys.Split(key, out var moduleLength);
            var param = LoraKeys.ParamName(kind, key);
            if (param is null)
            {
                errors.Add($"tensor '{name}' {Unsupported(kind)}");
                continue;
            }
            var module = key[..moduleLength];
            if (!groups.TryGetValue(module, out var group))
            {
                groups[module] = group = new Dictionary<string, AdapterTensor>(StringComparer.Ordinal);
                order.Add(module);
            }
            if (!group.TryAdd(param, tensor))
            {
                errors.Add($"tensors '{group[param].Name}' and '{name}' are both the {param} of module '{module}'");
            }
        }
        if (errors.Count == 0 && order.Count == 0)
        {
            errors.Add("it holds no tensors");
        }

        var modules = new List<ModulePatch>();
        foreach (var module in order)
        {
            try
            {
                modules.Add(BuildModule(module, groups[module], config));
            }
            catch (LoraMergeException e)
            {
                errors.Add(e.Message);
            }
        }
        if (errors.Count > 0)
        {
            throw new LoraMergeException($"adapter {path}: {errors.Count} problem(s): " + string.Join("; ", errors.Take(MaxErrors)) + (errors.Count > MaxErrors ? "; …" : ""));
        }
        return modules;
    }

    private static string Unsupported(ParamKind kind) => kind switch
    {
        ParamKind.Unknown or ParamKind.PlainWeight =>
            "is not an adapter factor (a full weight, e.g. PEFT modules_to_save or bias training, or an unknown name); merge applies LoRA/LoCon, LoHa, LoKr, DoRA and full-diff modules",
        _ => $"is a {kind} parameter, a network type merge does not support (supported: LoRA/LoCon, LoHa, LoKr, DoRA, full diff)",
    };

    private static ModulePatch BuildModule(string module, Dictionary<string, AdapterTensor> p, PeftAdapterConfig? config)
    {
        string[] allowed;
        DeltaSource delta;
        double scale;
        string type;
        var dotted = false;
        var alpha = p.TryGetValue("alpha", out var alphaTensor) ? Alpha(module, alphaTensor) : (double?)null;

        if (p.ContainsKey("down") || p.ContainsKey("up"))
        {
            allowed = ["down", "up", "mid", "alpha", "dora_scale", "magnitude", "up_bias"];
            var down = Require(p, module, "down");
            var up = Require(p, module, "up");
            dotted = down.Name.Contains(".lora_A", StringComparison.Ordinal);
            (delta, var rank) = LoraDelta(module, down, up, p.GetValueOrDefault("mid"));
            type = p.ContainsKey("mid") ? "LoCon (Tucker)" : down.Shape.Length == 4 ? "LoCon" : "LoRA";
            scale = config is not null && dotted ? PeftScale(module, config, rank, alphaTensor, embedding: false) : alpha is { } a ? a / rank : 1.0;
        }
        else if (p.ContainsKey("embedding_a") || p.ContainsKey("embedding_b"))
        {
            allowed = ["embedding_a", "embedding_b", "alpha"];
            var a = Require(p, module, "embedding_a");
            var b = Require(p, module, "embedding_b");
            Check(module, a.Shape.Length == 2 && b.Shape.Length == 2 && b.Shape[1] == a.Shape[0],
                $"lora_embedding_A {Shape(a.Shape)} and lora_embedding_B {Shape(b.Shape)} are not [r, vocab] and [dim, r]");
            // PEFT: the embedding's delta is (B·A)ᵀ = Aᵀ·Bᵀ, [vocab, dim]; float factors, so the blocked kernel takes it.
            int rank = (int)a.Shape[0], vocab = (int)a.Shape[1], dim = (int)b.Shape[0];
            delta = new LowRankDelta(Transpose(a.Values, rank, vocab), Transpose(b.Values, dim, rank), rank)
            {
                Out = vocab, Rest = dim, FullShape = [vocab, dim],
            };
            type = "LoRA (embedding)";
            dotted = true;
            scale = config is not null ? PeftScale(module, config, rank, alphaTensor, embedding: true) : alpha is { } al ? al / rank : 1.0;
        }
        else if (p.Keys.Any(k => k.StartsWith("hada_", StringComparison.Ordinal)))
        {
            allowed = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"];
            (delta, var rank) = LohaDelta(module, p);
            type = p.ContainsKey("hada_t1") ? "LoHa (Tucker)" : "LoHa";
            scale = alpha is { } a ? a / rank : 1.0;
        }
        else if (p.Keys.Any(k => k.StartsWith("lokr_", StringComparison.Ordinal)))
        {
            allowed = ["lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "dora_scale"];
            (delta, var rank) = LokrDelta(module, p);
            type = "LoKr";
            // LyCORIS: with both factors full there is no rank and the scale is 1 whatever alpha says.
            scale = rank is { } r && alpha is { } a ? a / r : 1.0;
        }
        else if (p.TryGetValue("diff", out var diff))
        {
            allowed = ["diff", "diff_b"];
            Check(module, diff.Shape.Length >= 1, "diff is a scalar");
            delta = new FullDelta(diff.Values) { Out = diff.Shape[0], Rest = diff.Values.Length / Math.Max(diff.Shape[0], 1), FullShape = diff.Shape };
            type = "Full";
            scale = 1.0;
        }
        else
        {
            throw new LoraMergeException($"module '{module}' has only {string.Join(", ", p.Keys)}, no weight factors");
        }

        var stray = p.Keys.Where(k => !allowed.Contains(k)).ToList();
        if (stray.Count > 0)
        {
            throw new LoraMergeException($"module '{module}' ({type}) also has {string.Join(", ", stray.Select(k => $"'{p[k].Name}'"))}, which do not belong to that network type");
        }
        Check(module, double.IsFinite(scale), $"its scale alpha/rank = {scale} is not finite");

        DoraMagnitude? dora = null;
        if (p.TryGetValue("magnitude", out var magnitude))
        {
            dora = new DoraMagnitude(magnitude, PeftConvention: true);
        }
        else if (p.TryGetValue("dora_scale", out var doraScale))
        {
            dora = new DoraMagnitude(doraScale, PeftConvention: false);
        }
        if (dora is null && config is { UseDora: true } && dotted)
        {
            throw new LoraMergeException($"module '{module}': adapter_config.json has use_dora = true but the module has no lora_magnitude_vector");
        }
        var bias = p.GetValueOrDefault("up_bias") ?? p.GetValueOrDefault("diff_b");
        if (bias is not null)
        {
            Check(module, bias.Values.Length == delta.Out, $"bias delta '{bias.Name}' has {bias.Values.Length} elements, not {delta.Out}");
        }
        return new ModulePatch
        {
            Module = module,
            NetworkType = dora is null ? type : type + " + DoRA",
            Delta = delta,
            Scale = scale,
            Dora = dora,
            BiasDelta = bias,
            DottedNames = dotted,
        };
    }

    private static (DeltaSource Delta, int Rank) LoraDelta(string module, AdapterTensor down, AdapterTensor up, AdapterTensor? mid)
    {
        Check(module, down.Shape.Length is 2 or 4, $"lora_down/lora_A has shape {Shape(down.Shape)}; expected [r, in] or [r, in, kh, kw]");
        Check(module, up.Shape.Length is 2 or 4 && (up.Shape.Length == 2 || up.Shape[2] == 1 && up.Shape[3] == 1),
            $"lora_up/lora_B has shape {Shape(up.Shape)}; expected [out, r] or [out, r, 1, 1]");
        var rank = (int)down.Shape[0];
        var outDim = up.Shape[0];
        if (mid is null)
        {
            Check(module, up.Shape[1] == rank, $"lora_up {Shape(up.Shape)} and lora_down {Shape(down.Shape)} disagree on the rank");
            var rest = down.Values.Length / Math.Max(rank, 1);
            return (new LowRankDelta(up.Values, down.Values, rank)
            {
                Out = outDim, Rest = rest, FullShape = [outDim, .. down.Shape[1..]],
            }, rank);
        }
        // Tucker: ΔW[o,i,k,l] = Σ_{m,n} mid[m,n,k,l]·up[o,m]·down[n,i], with down [r, in(,1,1)].
        Check(module, mid.Shape.Length == 4 && mid.Shape[0] == up.Shape[1] && mid.Shape[1] == rank,
            $"lora_mid has shape {Shape(mid.Shape)}; expected [{up.Shape[1]}, {rank}, kh, kw]");
        Check(module, down.Shape.Length == 2 || down.Shape[2] == 1 && down.Shape[3] == 1,
            $"lora_down has shape {Shape(down.Shape)}; with lora_mid it is [r, in, 1, 1]");
        var inDim = down.Shape[1];
        var folded = FoldCore(mid, down.Values, (int)inDim);
        return (new LowRankDelta(up.Values, folded, (int)up.Shape[1])
        {
            Out = outDim, Rest = inDim * mid.Shape[2] * mid.Shape[3], FullShape = [outDim, inDim, mid.Shape[2], mid.Shape[3]],
        }, rank);
    }

    private static (DeltaSource Delta, int Rank) LohaDelta(string module, Dictionary<string, AdapterTensor> p)
    {
        var w1a = Require(p, module, "hada_w1_a");
        var w1b = Require(p, module, "hada_w1_b");
        var w2a = Require(p, module, "hada_w2_a");
        var w2b = Require(p, module, "hada_w2_b");
        var t1 = p.GetValueOrDefault("hada_t1");
        var t2 = p.GetValueOrDefault("hada_t2");
        Check(module, (t1 is null) == (t2 is null), "it has only one of hada_t1 and hada_t2");
        foreach (var w in new[] { w1a, w1b, w2a, w2b })
        {
            Check(module, w.Shape.Length == 2, $"'{w.Name}' has shape {Shape(w.Shape)}; LoHa factors are matrices");
        }
        var rank = (int)w1b.Shape[0];
        if (t1 is null || t2 is null)
        {
            // w*_a [out, r], w*_b [r, in·kh·kw].
            Check(module, w1a.Shape[1] == rank && w2a.Shape[1] == w2b.Shape[0] && w1a.Shape[0] == w2a.Shape[0] && w1b.Shape[1] == w2b.Shape[1],
                $"LoHa factors {Shape(w1a.Shape)}·{Shape(w1b.Shape)} and {Shape(w2a.Shape)}·{Shape(w2b.Shape)} do not give one [out, in] shape");
            long outDim = w1a.Shape[0], rest = w1b.Shape[1];
            return (new HadamardDelta(
                new LowRankDelta(w1a.Values, w1b.Values, rank) { Out = outDim, Rest = rest },
                new LowRankDelta(w2a.Values, w2b.Values, (int)w2b.Shape[0]) { Out = outDim, Rest = rest })
            { Out = outDim, Rest = rest }, rank);
        }
        // Tucker: m = einsum('ijkl,jr,ip->prkl', t, w_b, w_a), w_a [r, out], w_b [r, in].
        var first = TuckerFactor(module, t1, w1a, w1b);
        var second = TuckerFactor(module, t2, w2a, w2b);
        Check(module, first.FullShape!.SequenceEqual(second.FullShape!), $"the two Tucker LoHa products have shapes {Shape(first.FullShape!)} and {Shape(second.FullShape!)}");
        return (new HadamardDelta(first, second) { Out = first.Out, Rest = first.Rest, FullShape = first.FullShape }, rank);
    }

    private static LowRankDelta TuckerFactor(string module, AdapterTensor core, AdapterTensor a, AdapterTensor b)
    {
        Check(module, core.Shape.Length == 4 && core.Shape[0] == a.Shape[0] && core.Shape[1] == b.Shape[0] && a.Shape.Length == 2 && b.Shape.Length == 2,
            $"Tucker core '{core.Name}' {Shape(core.Shape)} does not fit '{a.Name}' {Shape(a.Shape)} and '{b.Name}' {Shape(b.Shape)}");
        int rankA = (int)a.Shape[0], outDim = (int)a.Shape[1], inDim = (int)b.Shape[1];
        var folded = FoldCore(core, b.Values, inDim);
        return new LowRankDelta(Transpose(a.Values, rankA, outDim), folded, rankA)
        {
            Out = outDim, Rest = (long)inDim * core.Shape[2] * core.Shape[3], FullShape = [outDim, inDim, core.Shape[2], core.Shape[3]],
        };
    }

    private static (DeltaSource Delta, int? Rank) LokrDelta(string module, Dictionary<string, AdapterTensor> p)
    {
        int? rank = null;
        double[] w1;
        long a, c;
        if (p.TryGetValue("lokr_w1", out var full1))
        {
            Check(module, !p.ContainsKey("lokr_w1_a") && !p.ContainsKey("lokr_w1_b"), "it has both lokr_w1 and lokr_w1_a/lokr_w1_b");
            Check(module, full1.Shape.Length == 2, $"lokr_w1 has shape {Shape(full1.Shape)}; expected [a, c]");
            (a, c, w1) = (full1.Shape[0], full1.Shape[1], ToDouble(full1.Values));
        }
        else
        {
            var w1a = Require(p, module, "lokr_w1_a");
            var w1b = Require(p, module, "lokr_w1_b");
            Check(module, w1a.Shape.Length == 2 && w1b.Shape.Length == 2 && w1a.Shape[1] == w1b.Shape[0],
                $"lokr_w1_a {Shape(w1a.Shape)} and lokr_w1_b {Shape(w1b.Shape)} do not multiply");
            rank = (int)w1b.Shape[0];
            (a, c) = (w1a.Shape[0], w1b.Shape[1]);
            w1 = Product(w1a, w1b);
        }

        double[] w2;
        long b, w2Row;
        long[]? w2Shape;
        if (p.TryGetValue("lokr_w2", out var full2))
        {
            Check(module, !p.ContainsKey("lokr_w2_a") && !p.ContainsKey("lokr_w2_b") && !p.ContainsKey("lokr_t2"), "it has both lokr_w2 and its factors");
            Check(module, full2.Shape.Length is 2 or 4, $"lokr_w2 has shape {Shape(full2.Shape)}; expected [b, d] or [b, d, kh, kw]");
            (b, w2Row, w2, w2Shape) = (full2.Shape[0], full2.Values.Length / Math.Max(full2.Shape[0], 1), ToDouble(full2.Values), full2.Shape);
        }
        else
        {
            var w2a = Require(p, module, "lokr_w2_a");
            var w2b = Require(p, module, "lokr_w2_b");
            if (p.TryGetValue("lokr_t2", out var t2))
            {
                var factor = TuckerFactor(module, t2, w2a, w2b);
                rank ??= (int)w2b.Shape[0];
                (b, w2Row, w2Shape) = (factor.Out, factor.Rest, factor.FullShape);
                w2 = Materialize(factor);
            }
            else
            {
                Check(module, w2a.Shape.Length == 2 && w2b.Shape.Length == 2 && w2a.Shape[1] == w2b.Shape[0],
                    $"lokr_w2_a {Shape(w2a.Shape)} and lokr_w2_b {Shape(w2b.Shape)} do not multiply");
                rank ??= (int)w2b.Shape[0];
                (b, w2Row, w2Shape) = (w2a.Shape[0], w2b.Shape[1], null);
                w2 = Product(w2a, w2b);
            }
        }
        long[]? fullShape = w2Shape is null ? null : [a * b, c * w2Shape[1], .. w2Shape[2..]];
        return (new KroneckerDelta(w1, (int)c, w2, (int)b, (int)w2Row) { Out = a * b, Rest = c * w2Row, FullShape = fullShape }, rank);
    }

    private static double PeftScale(string module, PeftAdapterConfig config, int rank, AdapterTensor? alphaTensor, bool embedding)
    {
        if (alphaTensor is not null)
        {
            throw new LoraMergeException($"module '{module}' has an alpha tensor '{alphaTensor.Name}' and an adapter_config.json; which alpha applies is ambiguous");
        }
        var name = module.StartsWith(PeftPrefix, StringComparison.Ordinal) ? module[PeftPrefix.Length..] : module;
        if (!PeftPatterns.IsTarget(config, name, embedding))
        {
            var targets = config.TargetModules is { } list ? "[" + string.Join(", ", list) + "]" : $"'{config.TargetModulesRegex}'";
            throw new LoraMergeException($"module '{module}': adapter_config.json target_modules {targets} does not include it");
        }
        if (config.LayersToTransform is { } layers)
        {
            var layer = LayerIndex(name, config.LayersPattern);
            if (layer is null)
            {
                throw new LoraMergeException($"module '{module}' is in no layer, but adapter_config.json layers_to_transform [{string.Join(", ", layers)}] limits the adapter to layers");
            }
            if (!layers.Contains(layer.Value))
            {
                throw new LoraMergeException($"module '{module}' is in layer {layer}, but adapter_config.json layers_to_transform is [{string.Join(", ", layers)}]");
            }
        }
        var rankKey = PeftPatterns.MatchingKey(config.RankPattern, name, "rank_pattern");
        var alphaKey = PeftPatterns.MatchingKey(config.AlphaPattern, name, "alpha_pattern");
        var expectedRank = rankKey is null ? config.Rank : config.RankPattern.First(p => p.Key == rankKey).Value;
        var alpha = alphaKey is null ? config.LoraAlpha : config.AlphaPattern.First(p => p.Key == alphaKey).Value;
        if (expectedRank != rank)
        {
            var source = rankKey is null ? $"r = {config.Rank}" : $"rank_pattern['{rankKey}'] = {expectedRank}";
            throw new LoraMergeException($"module '{module}' has rank {rank}, but adapter_config.json gives {source}");
        }
        return config.UseRslora ? alpha / Math.Sqrt(rank) : alpha / rank;
    }

    /// <summary>PEFT's layer index: the number after one of <c>layers_pattern</c> (default layers, h, blocks, layer).</summary>
    private static int? LayerIndex(string module, IReadOnlyList<string>? patterns)
    {
        var names = patterns is { Count: > 0 } ? string.Join("|", patterns.Select(Regex.Escape)) : "layers|h|blocks|layer";
        var match = Regex.Match(module, $@"(?:^|\.)(?:{names})\.(\d+)\.", RegexOptions.CultureInvariant);
        return match.Success && int.TryParse(match.Groups[1].ValueSpan, NumberStyles.None, CultureInfo.InvariantCulture, out var n) ? n : null;
    }

    private static double Alpha(string module, AdapterTensor alpha)
    {
        Check(module, alpha.Values.Length == 1, $"alpha '{alpha.Name}' has shape {Shape(alpha.Shape)}; alpha is a scalar");
        // kohya reads alpha 0 as "alpha = rank", ComfyUI as "disabled"; rather than guess, refuse.
        Check(module, alpha.Values[0] != 0, $"alpha '{alpha.Name}' is 0, which tools read differently (kohya: alpha = rank; ComfyUI: module off)");
        return alpha.Values[0];
    }

    private static AdapterTensor Require(Dictionary<string, AdapterTensor> p, string module, string param) =>
        p.TryGetValue(param, out var tensor)
            ? tensor
            : throw new LoraMergeException($"module '{module}' has {string.Join(", ", p.Values.Select(t => $"'{t.Name}'"))} but no {param} tensor");

    private static void Check(string module, bool condition, string problem)
    {
        if (!condition)
        {
            throw new LoraMergeException($"module '{module}': {problem}");
        }
    }

    /// <summary>Folds a Tucker core [R1, R2, kh, kw] with B [R2, in] into V [R1, in·kh·kw]: V[m, (i,k,l)] = Σ_n core[m,n,k,l]·B[n,i].</summary>
    private static double[] FoldCore(AdapterTensor core, float[] b, int inDim)
    {
        int r1 = (int)core.Shape[0], r2 = (int)core.Shape[1], kernel = (int)(core.Shape[2] * core.Shape[3]);
        var folded = new double[(long)r1 * inDim * kernel];
        for (var m = 0; m < r1; m++)
        {
            for (var n = 0; n < r2; n++)
            {
                for (var i = 0; i < inDim; i++)
                {
                    double bn = b[n * inDim + i];
                    var target = (m * inDim + i) * kernel;
                    var source = (m * r2 + n) * kernel;
                    for (var x = 0; x < kernel; x++)
                    {
                        folded[target + x] += core.Values[source + x] * bn;
                    }
                }
            }
        }
        return folded;
    }

    private static double[] Product(AdapterTensor left, AdapterTensor right)
    {
        var delta = new LowRankDelta(left.Values, right.Values, (int)left.Shape[1]) { Out = left.Shape[0], Rest = right.Shape[1] };
        return Materialize(delta);
    }

    private static double[] Materialize(DeltaSource delta)
    {
        var values = new double[delta.Out * delta.Rest];
        for (long o = 0; o < delta.Out; o++)
        {
            delta.Row(o, values.AsSpan((int)(o * delta.Rest), (int)delta.Rest));
        }
        return values;
    }

    private static T[] Transpose<T>(T[] values, int rows, int columns)
    {
        var transposed = new T[values.Length];
        for (var r = 0; r < rows; r++)
        {
            for (var c = 0; c < columns; c++)
            {
                transposed[c * rows + r] = values[r * columns + c];
            }
        }
        return transposed;
    }

    private static double[] ToDouble(float[] values) => Array.ConvertAll(values, v => (double)v);

    internal static string Shape(long[] shape) => "[" + string.Join(", ", shape) + "]";
}
