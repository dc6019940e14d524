using System.Runtime.InteropServices;
using System.Text.Unicode;
using LoraDeploy.Lora.Safetensors;

namespace LoraDeploy.Lora;

/// <summary>
/// Decides what a safetensors file is — LoRA-family adapter or not, network type, key format, target
/// architecture — from tensor names and shapes (reference §2–§3), using metadata only to break ties.
/// </summary>
public static partial class LoraProber
{
    private const int MaxMetadataValueLength = 500;
    private const int TopTagCount = 10;

    /// <summary>
    /// Probes a validated header. When <paramref name="file"/> (the seekable stream the header came from)
    /// is given, scalar <c>alpha</c> tensors are read from it so that alpha and scale are exact; otherwise
    /// they come from <c>ss_network_alpha</c> metadata when available.
    /// </summary>
    public static ProbeReport Probe(SafetensorsHeader header, Stream? file = null)
    {
        ArgumentNullException.ThrowIfNull(header);
        return new Analysis(header, file).Run();
    }

    /// <summary>
    /// Reads, validates and probes the file at <paramref name="path"/>; with <paramref name="hashes"/>
    /// also fills <see cref="ProbeReport.FileSha256"/> and <see cref="ProbeReport.DataSha256"/> (reads the whole file).
    /// </summary>
    /// <exception cref="SafetensorsFormatException">The file is not a well-formed safetensors file.</exception>
    public static ProbeReport ProbeFile(string path, bool hashes = false)
    {
        // Unbuffered: alpha scalars are read with one small positioned read each, not a 4 KB buffer fill.
        using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 0);
        var header = SafetensorsReader.Read(file);
        var report = Probe(header, file);
        if (!hashes)
        {
            return report;
        }
        var dataSha = SafetensorsHashes.DataSha256(file, header);
        file.Position = 0;
        var fileSha = Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(file));
        return report with { FileSha256 = fileSha, DataSha256 = dataSha };
    }

    /// <param name="name">The module name, or null to take it from the first tensor's name when asked for.</param>
    /// <param name="first">The module's first tensor, whose name starts with the module name.</param>
    /// <param name="nameLength">Length of the module name in UTF-16 units.</param>
    private sealed class Module(string? name, TensorEntry first, int nameLength, string normalized, Component component, PrefixStyle style, bool processorName)
    {
        private string? _name = name;

        // Only warnings and the fallback index need the name: probing a sorted file makes no string per module for it.
        public string Name => _name ??= first.Name[..nameLength];
        public string Normalized { get; } = normalized;
        /// <summary>The name contains ".processor." (XLabs).</summary>
        public bool ProcessorName { get; } = processorName;
        public Component Component { get; } = component;
        public PrefixStyle Style { get; } = style;
        public TensorEntry? Down, Up, Mid, Alpha, W1, W1A, W1B, W2, W2A, W2B, HadaW1A, HadaW1B, Diff, GloraA1, GloraA2;
        public bool HasDora, HasUpBias, HasHada, HasLokr, HasIa3, HasGlora, HasDiff, HasNorm, HasOft, HasScale, HasPlainWeight, HasEmbedding;

        /// <summary>Input width of the adapted layer ("dim" in reference §3.3), 0 if unknown.</summary>
        public long InDim =>
            Down is { Shape.Length: >= 2 } ? Down.Shape[1]
            : HadaW1B is { Shape.Length: 2 } ? HadaW1B.Shape[1]
            : HasLokr ? Factor(W1, W1B, 1) * Factor(W2, W2B, 1)
            : Diff is { Shape.Length: >= 2 } ? Diff.Shape[1]
            : 0;

        /// <summary>Output width of the adapted layer, 0 if unknown.</summary>
        public long OutDim =>
            Up is { Shape.Length: >= 1 } ? Up.Shape[0]
            : HadaW1A is { Shape.Length: 2 } ? HadaW1A.Shape[0]
            : HasLokr ? Factor(W1, W1A, 0) * Factor(W2, W2A, 0)
            : Diff is { Shape.Length: >= 1 } ? Diff.Shape[0]
            : 0;

        public int? Rank =>
            Down is { Shape.Length: >= 1 } ? (int)Math.Min(Down.Shape[0], int.MaxValue)
            : HadaW1B is { Shape.Length: >= 1 } ? (int)Math.Min(HadaW1B.Shape[0], int.MaxValue)
            : W1B is { Shape.Length: >= 1 } ? (int)Math.Min(W1B.Shape[0], int.MaxValue)
            : W2B is { Shape.Length: >= 1 } ? (int)Math.Min(W2B.Shape[0], int.MaxValue)
            : GloraA1 is { Shape.Length: 2 } ? (int)Math.Min(GloraA1.Shape[1], int.MaxValue)
            : null;

        public bool IsComplete =>
            (Down is not null && Up is not null) || HasEmbedding || HasHada || HasLokr || HasIa3 || HasGlora || HasDiff || HasNorm || HasOft;

        private static long Factor(TensorEntry? full, TensorEntry? part, int axis) =>
            full is { Shape.Length: >= 2 } ? full.Shape[axis]
            : part is { Shape.Length: >= 2 } ? part.Shape[axis]
            : 1;
    }

    private sealed partial class Analysis(SafetensorsHeader header, Stream? file)
    {
        private readonly IReadOnlyDictionary<string, string> _metadata = header.Metadata;
        private readonly long _dataOffset = header.DataOffset;
        private readonly Stream? _file = file;
        // Modules in the order their first tensor appears; the index by name is made only when needed (see FindOrAdd).
        private readonly List<Module> _modules = new(header.Entries.Count / 2);
        private Dictionary<string, Module>? _moduleIndex;
        private readonly List<string> _warnings = [];
        private int _unknownKeyCount;
        private string? _firstUnknownKey;
        private Module? _lastModule;
        // The last module's name, so that each tensor can be checked against it without making a string.
        private char[] _lastModuleName = new char[256];
        private int _lastModuleNameLength;

        public ProbeReport Run()
        {
            long parameters = 0;
            var dtypes = new List<string>(2);
            // Names are decoded into one reused buffer; only a module's first tensor makes a string.
            var name = new char[256];
            foreach (var tensor in header.Entries)
            {
                // A file has one or two dtypes; a list beats a set here.
                if (!dtypes.Contains(tensor.Dtype))
                {
                    dtypes.Add(tensor.Dtype);
                }
                parameters += tensor.ElementCount;
                var utf8 = tensor.NameUtf8;
                if (utf8.Length > name.Length)
                {
                    name = new char[utf8.Length];
                }
                // Valid UTF-8 (the reader checked it) never takes more UTF-16 units than bytes.
                Utf8.ToUtf16(utf8, name, out _, out var length);
                Add(tensor, name.AsSpan(0, length));
            }

            // One pass for the module-level counts (in header order, as the dictionary enumerates).
            var complete = new List<Module>(_modules.Count);
            var isLllite = false;
            var plainWeights = 0;
            var pairedOrComplete = 0;
            foreach (var m in _modules)
            {
                var isComplete = m.IsComplete;
                if (isComplete)
                {
                    complete.Add(m);
                }
                isLllite |= m.Component == Component.Lllite;
                // IA3 stores its vector as "<module>.weight" next to "on_input"; any other plain weight is a model weight.
                plainWeights += m.HasPlainWeight && !m.HasIa3 ? 1 : 0;
                pairedOrComplete += m.Down is not null || m.Up is not null || isComplete ? 1 : 0;
            }
            var adapterModules = complete.Count;
            var isControl = IsControlLora();
            var network = isLllite ? "lllite" : isControl ? "control-lora" : NetworkOf(complete);
            var architecture = DecideArchitecture(complete, out var mixed);
            var format = FormatOf(architecture);

            var plainWeightMajority = plainWeights > 0 && plainWeights >= adapterModules;
            var isAdapter = !isLllite && !isControl && adapterModules > 0 && !plainWeightMajority;
            if (plainWeights > 0 && !plainWeightMajority)
            {
                _warnings.Add($"{plainWeights} plain '.weight' tensors sit next to the adapter modules (a merged checkpoint can carry LoRA keys).");
            }

            var (rankMin, rankMax, alpha, scale) = RanksAndScale(complete);
            CheckPairs(complete);
            CheckMetadataAgreement(architecture);

            string? reason = null;
            if (!isAdapter)
            {
                reason = isLllite ? "this is a ControlNet-LLLite network, not a LoRA; it needs a control image"
                    : isControl ? "this is a FLUX Control-LoRA (Canny/Depth); it widens img_in and needs a control image"
                    : plainWeightMajority ? "this is a full model checkpoint (plain weights), not an adapter"
                    : "no LoRA-family modules were found";
                network = isLllite || isControl ? network : "none";
            }
            else if (architecture == ArchitectureFamilies.LanguageModel)
            {
                reason = "this is a language-model (PEFT) adapter, not an image-model LoRA";
            }
            else if (mixed is not null)
            {
                reason = $"the modules target more than one architecture ({mixed})";
            }
            else if (architecture == ArchitectureFamilies.Unknown)
            {
                reason = "the target architecture could not be determined from the keys";
            }
            else if (_firstUnknownKey is not null)
            {
                reason = $"{_unknownKeyCount} tensors are not LoRA-family parameters (e.g. '{Truncate(_firstUnknownKey, 120)}')";
            }
            else if (complete.Count < pairedOrComplete)
            {
                reason = "some modules lack their up/down pair";
            }

            var (triggerWords, topTags) = TagsFromMetadata();
            return new ProbeReport
            {
                Format = format,
                Network = network,
                Architecture = architecture,
                ArchitectureDisplay = ArchitectureFamilies.Display(architecture),
                Targets = TargetsOf(complete, architecture),
                ModuleCount = adapterModules,
                TensorCount = header.Entries.Count,
                RankMin = rankMin,
                RankMax = rankMax,
                Alpha = alpha,
                Scale = scale,
                Dtypes = [.. dtypes.Order(StringComparer.Ordinal)],
                ParameterCount = parameters,
                TriggerWords = triggerWords,
                TopTags = topTags,
                BaseModelVersion = NonEmpty("ss_base_model_version") ?? NonEmpty("modelspec.architecture"),
                Metadata = SelectedMetadata(),
                IsAdapter = isAdapter,
                Applicable = reason is null,
                NotApplicableReason = reason,
                Warnings = _warnings,
            };
        }

        private void Add(TensorEntry tensor, ReadOnlySpan<char> name)
        {
            var kind = LoraKeys.Split(name, out var moduleLength);
            if (kind == ParamKind.Unknown)
            {
                _firstUnknownKey ??= tensor.Name;
                _unknownKeyCount++;
                return;
            }
            // A module's tensors are usually adjacent (alpha, lora_down, lora_up): try the last one before FindOrAdd.
            var moduleName = name[..moduleLength];
            var module = _lastModule;
            if (module is null || !moduleName.SequenceEqual(_lastModuleName.AsSpan(0, _lastModuleNameLength)))
            {
                module = FindOrAdd(tensor, moduleName);
                _lastModule = module;
                if (moduleName.Length > _lastModuleName.Length)
                {
                    _lastModuleName = new char[moduleName.Length];
                }
                moduleName.CopyTo(_lastModuleName);
                _lastModuleNameLength = moduleName.Length;
            }
            switch (kind)
            {
                case ParamKind.PlainWeight: module.HasPlainWeight = true; break;
                case ParamKind.Down: module.Down = tensor; break;
                case ParamKind.Up: module.Up = tensor; break;
                case ParamKind.Mid: module.Mid = tensor; break;
                case ParamKind.UpBias: module.HasUpBias = true; break;
                case ParamKind.Alpha: module.Alpha = tensor; break;
                case ParamKind.DoraScale or ParamKind.Magnitude: module.HasDora = true; break;
                case ParamKind.HadaW1A: module.HasHada = true; module.HadaW1A = tensor; break;
                case ParamKind.HadaW1B: module.HasHada = true; module.HadaW1B = tensor; break;
                case ParamKind.HadaW2A or ParamKind.HadaW2B or ParamKind.HadaT: module.HasHada = true; break;
                case ParamKind.LokrW1: module.HasLokr = true; module.W1 = tensor; break;
                case ParamKind.LokrW1A: module.HasLokr = true; module.W1A = tensor; break;
                case ParamKind.LokrW1B: module.HasLokr = true; module.W1B = tensor; break;
                case ParamKind.LokrW2: module.HasLokr = true; module.W2 = tensor; break;
                case ParamKind.LokrW2A: module.HasLokr = true; module.W2A = tensor; break;
                case ParamKind.LokrW2B: module.HasLokr = true; module.W2B = tensor; break;
                case ParamKind.LokrT2: module.HasLokr = true; break;
                case ParamKind.OnInput: module.HasIa3 = true; break;
                case ParamKind.GloraA1: module.HasGlora = true; module.GloraA1 = tensor; break;
                case ParamKind.GloraA2: module.HasGlora = true; module.GloraA2 = tensor; break;
                case ParamKind.GloraB1 or ParamKind.GloraB2 or ParamKind.GloraBm: module.HasGlora = true; break;
                case ParamKind.Diff: module.HasDiff = true; module.Diff = tensor; break;
                case ParamKind.DiffB: module.HasDiff = true; break;
                case ParamKind.NormW or ParamKind.NormB: module.HasNorm = true; break;
                case ParamKind.OftBlocks or ParamKind.Rescale: module.HasOft = true; break;
                case ParamKind.Scale or ParamKind.ReshapeWeight or ParamKind.SetWeight: module.HasScale = true; break;
                case ParamKind.EmbeddingA or ParamKind.EmbeddingB: module.HasEmbedding = true; break;
            }
        }

        /// <summary>
        /// The module of that name, added if new. In the safetensors library's order (names sorted) each new module's
        /// name is greater than the last one added, so it cannot have been seen and needs no lookup. From the first
        /// module name that is not greater, all modules are indexed by name and looked up.
        /// </summary>
        private Module FindOrAdd(TensorEntry tensor, ReadOnlySpan<char> moduleName)
        {
            if (_moduleIndex is null)
            {
                // Until the index exists, the last module used is the last one added.
                if (_modules.Count == 0 || moduleName.SequenceCompareTo(_lastModuleName.AsSpan(0, _lastModuleNameLength)) > 0)
                {
                    return New(null, tensor, moduleName);
                }
                _moduleIndex = new Dictionary<string, Module>(Math.Max(_modules.Capacity, _modules.Count * 2), StringComparer.Ordinal);
                foreach (var m in _modules)
                {
                    // Distinct: they ascend.
                    _moduleIndex.Add(m.Name, m);
                }
            }
            // A lookup that gets this far is nearly always a new module, so the name string is made up front and hashed once.
            var moduleString = moduleName.ToString();
            ref var slot = ref CollectionsMarshal.GetValueRefOrAddDefault(_moduleIndex, moduleString, out var exists);
            if (!exists)
            {
                slot = New(moduleString, tensor, moduleName);
            }
            return slot!;

            Module New(string? name, TensorEntry first, ReadOnlySpan<char> moduleName)
            {
                var normalized = LoraKeys.Normalize(moduleName, out var component, out var style);
                var module = new Module(name, first, moduleName.Length, normalized, component, style,
                    moduleName.Contains(".processor.", StringComparison.Ordinal));
                _modules.Add(module);
                return module;
            }
        }

        private bool IsControlLora() =>
            _modules.Any(m => m.Normalized == "img_in" && m.Down is { Shape: [_, 128] })
            && _modules.Any(m => m.HasUpBias || (m.HasScale && m.Normalized.EndsWith("_norm", StringComparison.Ordinal)));

        private static string NetworkOf(List<Module> modules)
        {
            if (modules.Count == 0)
            {
                return "none";
            }
            if (modules.Any(m => m.HasDora))
            {
                return "dora";
            }
            var counts = new Dictionary<string, int>(StringComparer.Ordinal);
            foreach (var m in modules)
            {
                var type = m.HasHada ? "loha"
                    : m.HasLokr ? "lokr"
                    : m.HasOft ? "oft"
                    : m.HasGlora ? "glora"
                    : m.HasIa3 ? "ia3"
                    : m.HasDiff ? "full"
                    : m.HasNorm ? "norm"
                    : IsConvLoCon(m) ? "locon"
                    : "lora";
                CollectionsMarshal.GetValueRefOrAddDefault(counts, type, out _)++;
            }
            // A LoRA file that adapts any k×k convolution is a LoCon file.
            if (counts.ContainsKey("locon") && counts.Keys.All(k => k is "lora" or "locon" or "norm"))
            {
                return "locon";
            }
            return counts.Where(kv => kv.Key != "norm").DefaultIfEmpty(counts.First()).MaxBy(kv => kv.Value).Key;
        }

        private static bool IsConvLoCon(Module m) =>
            m.Mid is not null
            || m.Down is { Shape: [_, _, var kh, var kw] } && (kh > 1 || kw > 1);

        private string FormatOf(string architecture)
        {
            var styles = new Dictionary<PrefixStyle, int>(8);
            var xlabs = false;
            var bflNames = false;
            foreach (var m in _modules)
            {
                CollectionsMarshal.GetValueRefOrAddDefault(styles, m.Style, out _)++;
                xlabs |= m.Up is not null && m.ProcessorName && m.Normalized.Contains("_processor_", StringComparison.Ordinal);
                bflNames |= m.Normalized.StartsWith("double_blocks_", StringComparison.Ordinal) || m.Normalized.StartsWith("single_blocks_", StringComparison.Ordinal);
            }
            if (styles.Count == 0)
            {
                return "unknown";
            }
            if (xlabs)
            {
                return "xlabs";
            }
            if (styles.ContainsKey(PrefixStyle.OneTrainer))
            {
                return "onetrainer";
            }
            var style = styles.MaxBy(kv => kv.Value).Key;
            return style switch
            {
                PrefixStyle.Kohya => "kohya",
                PrefixStyle.Lycoris => "lycoris",
                PrefixStyle.Peft => "peft",
                PrefixStyle.DiffusionModel => bflNames ? "bfl" : "native",
                PrefixStyle.Diffusers => bflNames ? "bfl" : "diffusers",
                PrefixStyle.ComfyText => "native",
                _ => bflNames ? "bfl" : architecture == ArchitectureFamilies.LanguageModel ? "peft" : "diffusers",
            };
        }

        private IReadOnlyList<string> TargetsOf(List<Module> modules, string architecture)
        {
            var isUnet = architecture is ArchitectureFamilies.Sd1 or ArchitectureFamilies.Sd2 or ArchitectureFamilies.Sdxl;
            // At most five distinct values: a list beats a sorted set here.
            var targets = new List<string>(2);
            foreach (var m in modules)
            {
                var target = m.Component switch
                {
                    Component.TextEncoder1 => "text_encoder_1",
                    Component.TextEncoder2 => "text_encoder_2",
                    Component.TextEncoder3 => "text_encoder_3",
                    Component.Lllite => "controlnet",
                    _ => architecture == ArchitectureFamilies.LanguageModel ? "language_model" : isUnet ? "unet" : "transformer",
                };
                if (!targets.Contains(target))
                {
                    targets.Add(target);
                }
            }
            return [.. targets.Order(StringComparer.Ordinal)];
        }
    }
}
