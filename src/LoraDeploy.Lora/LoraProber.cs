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
        using var header = SafetensorsReader.Read(file);
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

    /// <summary>
    /// A module as the analysis keeps it: a row of plain values in a pooled array, tensors referred to by their index
    /// in the header's table (-1 when absent), its name and normalised name as slices of a shared buffer.
    /// </summary>
    private struct Module
    {
        public int NameStart, NameLength, NormalizedStart, NormalizedLength;
        /// <summary>The name contains ".processor." (XLabs).</summary>
        public bool ProcessorName;
        public Component Component;
        public PrefixStyle Style;
        public int Down, Up, Mid, Alpha, W1, W1A, W1B, W2, W2A, W2B, HadaW1A, HadaW1B, Diff, GloraA1, GloraA2;
        public bool HasDora, HasUpBias, HasHada, HasLokr, HasIa3, HasGlora, HasDiff, HasNorm, HasOft, HasScale, HasPlainWeight, HasEmbedding;
        /// <summary><see cref="IsComplete"/>, kept once all tensors are in.</summary>
        public bool Complete;

        public static readonly Module Empty = new()
        {
            Down = -1, Up = -1, Mid = -1, Alpha = -1, W1 = -1, W1A = -1, W1B = -1, W2 = -1, W2A = -1, W2B = -1,
            HadaW1A = -1, HadaW1B = -1, Diff = -1, GloraA1 = -1, GloraA2 = -1,
        };

        public readonly bool IsComplete =>
            (Down >= 0 && Up >= 0) || HasEmbedding || HasHada || HasLokr || HasIa3 || HasGlora || HasDiff || HasNorm || HasOft;
    }

    private sealed partial class Analysis(SafetensorsHeader header, Stream? file)
    {
        private readonly TensorTable _table = header.Table;
        private readonly IReadOnlyDictionary<string, string> _metadata = header.Metadata;
        private readonly long _dataOffset = header.DataOffset;
        private readonly Stream? _file = file;
        // Modules in the order their first tensor appears (pooled, returned by Run); the index by name is made only
        // when needed (see FindOrAdd).
        private Module[] _modules = [];
        private int _moduleCount;
        private HashSet<int>? _moduleIndex;
        // Module names and normalised names, one after the other (pooled, returned by Run).
        private char[] _names = [];
        private int _namesUsed;
        private readonly List<string> _warnings = [];
        private int _unknownKeyCount;
        private string? _firstUnknownKey;
        // The module of the last tensor, which the next tensor most likely belongs to.
        private int _lastModule = -1;

        public ProbeReport Run()
        {
            var count = _table.Count;
            _modules = HeaderPool.Rent<Module>(Math.Max(16, count / 2), _table.Pooled);
            _names = HeaderPool.Rent<char>(Math.Max(256, count * 48), _table.Pooled);
            try
            {
                return Analyse(count);
            }
            finally
            {
                // Plain values only: nothing for the GC to find in them.
                HeaderPool.Return(_modules, _table.Pooled);
                HeaderPool.Return(_names, _table.Pooled);
                (_modules, _names) = ([], []);
            }
        }

        private ProbeReport Analyse(int count)
        {
            long parameters = 0;
            // Bit i: dtype code i occurs (a file has one or two dtypes).
            var dtypeCodes = 0UL;
            // Names are decoded into one reused buffer; no string per tensor or module.
            var name = new char[256];
            var records = _table.Records;
            for (var tensor = 0; tensor < count; tensor++)
            {
                dtypeCodes |= 1UL << records[tensor].Dtype;
                parameters += _table.ElementCount(tensor);
                var utf8 = _table.NameUtf8(tensor);
                if (utf8.Length > name.Length)
                {
                    name = new char[utf8.Length];
                }
                // Valid UTF-8 (the reader checked it) never takes more UTF-16 units than bytes.
                Utf8.ToUtf16(utf8, name, out _, out var length);
                Add(tensor, name.AsSpan(0, length));
            }
            var dtypes = new List<string>(2);
            for (var code = 0; code < SafetensorsDtype.Names.Length; code++)
            {
                if ((dtypeCodes & (1UL << code)) != 0)
                {
                    dtypes.Add(SafetensorsDtype.Names[code]);
                }
            }

            // One pass for the module-level counts, in first-seen order.
            var adapterModules = 0;
            var isLllite = false;
            var plainWeights = 0;
            var pairedOrComplete = 0;
            foreach (ref var m in Modules)
            {
                var isComplete = m.Complete = m.IsComplete;
                adapterModules += isComplete ? 1 : 0;
                isLllite |= m.Component == Component.Lllite;
                // IA3 stores its vector as "<module>.weight" next to "on_input"; any other plain weight is a model weight.
                plainWeights += m.HasPlainWeight && !m.HasIa3 ? 1 : 0;
                pairedOrComplete += m.Down >= 0 || m.Up >= 0 || isComplete ? 1 : 0;
            }
            var isControl = IsControlLora();
            var network = isLllite ? "lllite" : isControl ? "control-lora" : NetworkOf(adapterModules);
            var architecture = DecideArchitecture(out var mixed);
            var format = FormatOf(architecture);

            var plainWeightMajority = plainWeights > 0 && plainWeights >= adapterModules;
            var isAdapter = !isLllite && !isControl && adapterModules > 0 && !plainWeightMajority;
            if (plainWeights > 0 && !plainWeightMajority)
            {
                _warnings.Add($"{plainWeights} plain '.weight' tensors sit next to the adapter modules (a merged checkpoint can carry LoRA keys).");
            }

            var (rankMin, rankMax, alpha, scale) = RanksAndScale();
            CheckPairs();
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
            else if (adapterModules < pairedOrComplete)
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
                Targets = TargetsOf(architecture),
                ModuleCount = adapterModules,
                TensorCount = count,
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

        /// <summary>The modules so far, in the order their first tensor appears.</summary>
        private Span<Module> Modules => _modules.AsSpan(0, _moduleCount);

        /// <summary>A tensor's shape; empty for no tensor (-1), which every use below tells apart by a length check.</summary>
        private ReadOnlySpan<long> Shape(int tensor) => tensor < 0 ? default : _table.Shape(tensor);

        private ReadOnlySpan<char> Normalized(in Module m) => _names.AsSpan(m.NormalizedStart, m.NormalizedLength);

        private ReadOnlySpan<char> ModuleName(int module) => _names.AsSpan(_modules[module].NameStart, _modules[module].NameLength);

        // Only warnings need the name as a string.
        private string Name(int module) => ModuleName(module).ToString();

        /// <summary>Input width of the adapted layer ("dim" in reference §3.3), 0 if unknown.</summary>
        private long InDim(in Module m)
        {
            if (Shape(m.Down) is { Length: >= 2 } down)
            {
                return down[1];
            }
            if (Shape(m.HadaW1B) is { Length: 2 } hadaW1B)
            {
                return hadaW1B[1];
            }
            if (m.HasLokr)
            {
                return Factor(m.W1, m.W1B, 1) * Factor(m.W2, m.W2B, 1);
            }
            return Shape(m.Diff) is { Length: >= 2 } diff ? diff[1] : 0;
        }

        /// <summary>Output width of the adapted layer, 0 if unknown.</summary>
        private long OutDim(in Module m)
        {
            if (Shape(m.Up) is { Length: >= 1 } up)
            {
                return up[0];
            }
            if (Shape(m.HadaW1A) is { Length: 2 } hadaW1A)
            {
                return hadaW1A[0];
            }
            if (m.HasLokr)
            {
                return Factor(m.W1, m.W1A, 0) * Factor(m.W2, m.W2A, 0);
            }
            return Shape(m.Diff) is { Length: >= 1 } diff ? diff[0] : 0;
        }

        private int? Rank(in Module m) =>
            Shape(m.Down) is { Length: >= 1 } down ? (int)Math.Min(down[0], int.MaxValue)
            : Shape(m.HadaW1B) is { Length: >= 1 } hadaW1B ? (int)Math.Min(hadaW1B[0], int.MaxValue)
            : Shape(m.W1B) is { Length: >= 1 } w1b ? (int)Math.Min(w1b[0], int.MaxValue)
            : Shape(m.W2B) is { Length: >= 1 } w2b ? (int)Math.Min(w2b[0], int.MaxValue)
            : Shape(m.GloraA1) is { Length: 2 } gloraA1 ? (int)Math.Min(gloraA1[1], int.MaxValue)
            : null;

        private long Factor(int full, int part, int axis) =>
            Shape(full) is { Length: >= 2 } f ? f[axis]
            : Shape(part) is { Length: >= 2 } p ? p[axis]
            : 1;

        private void Add(int tensor, ReadOnlySpan<char> name)
        {
            var kind = LoraKeys.Split(name, out var moduleLength);
            if (kind == ParamKind.Unknown)
            {
                _firstUnknownKey ??= _table.Name(tensor);
                _unknownKeyCount++;
                return;
            }
            // A module's tensors are usually adjacent (alpha, lora_down, lora_up): try the last one before FindOrAdd.
            var moduleName = name[..moduleLength];
            var index = _lastModule;
            if (index < 0 || !moduleName.SequenceEqual(ModuleName(index)))
            {
                index = FindOrAdd(tensor, moduleName);
                _lastModule = index;
            }
            ref var module = ref _modules[index];
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
        /// The index of the module of that name, added if new. In the safetensors library's order (names sorted) each new
        /// module's name is greater than the last one added, so it cannot have been seen and needs no lookup. From the
        /// first module name that is not greater, all modules are indexed by name and looked up.
        /// </summary>
        private int FindOrAdd(int tensor, ReadOnlySpan<char> moduleName)
        {
            if (_moduleIndex is null)
            {
                if (_moduleCount == 0 || moduleName.SequenceCompareTo(ModuleName(_moduleCount - 1)) > 0)
                {
                    return New(moduleName);
                }
                _moduleIndex = new HashSet<int>(Math.Max(_modules.Length, _moduleCount * 2), new ModuleNames(this));
                for (var i = 0; i < _moduleCount; i++)
                {
                    // Distinct: they ascend.
                    _moduleIndex.Add(i);
                }
            }
            // Looked up by the span, so that no string is made for the name.
            if (_moduleIndex.GetAlternateLookup<ReadOnlySpan<char>>().TryGetValue(moduleName, out var existing))
            {
                return existing;
            }
            var added = New(moduleName);
            _moduleIndex.Add(added);
            return added;
        }

        private int New(ReadOnlySpan<char> moduleName)
        {
            if (_moduleCount == _modules.Length)
            {
                Grow(ref _modules, _moduleCount, _moduleCount + 1);
            }
            // The name, then the normalised name, which is never longer.
            if (_names.Length - _namesUsed < 2 * moduleName.Length)
            {
                Grow(ref _names, _namesUsed, _namesUsed + 2 * moduleName.Length);
            }
            var nameStart = _namesUsed;
            moduleName.CopyTo(_names.AsSpan(nameStart));
            var normalized = LoraKeys.Normalize(moduleName, _names.AsSpan(nameStart + moduleName.Length), out var component, out var style);
            ref var module = ref _modules[_moduleCount];
            module = Module.Empty;
            (module.NameStart, module.NameLength, module.NormalizedStart, module.NormalizedLength) = (nameStart, moduleName.Length, nameStart + moduleName.Length, normalized);
            (module.Component, module.Style) = (component, style);
            module.ProcessorName = moduleName.Contains(".processor.", StringComparison.Ordinal);
            _namesUsed += moduleName.Length + normalized;
            return _moduleCount++;
        }

        /// <summary>
        /// Compares modules (by index) by name, and a name given as a span with a module's, so that the index is looked
        /// up without a string. Hashes with the BCL's per-process randomised Marvin hash, as a string key would be.
        /// </summary>
        private sealed class ModuleNames(Analysis analysis) : IEqualityComparer<int>, IAlternateEqualityComparer<ReadOnlySpan<char>, int>
        {
            public bool Equals(int x, int y) => analysis.ModuleName(x).SequenceEqual(analysis.ModuleName(y));

            public int GetHashCode(int module) => string.GetHashCode(analysis.ModuleName(module));

            public bool Equals(ReadOnlySpan<char> alternate, int other) => alternate.SequenceEqual(analysis.ModuleName(other));

            public int GetHashCode(ReadOnlySpan<char> alternate) => string.GetHashCode(alternate);

            // Modules are added by index once made (see FindOrAdd), never from a bare name.
            public int Create(ReadOnlySpan<char> alternate) => throw new NotSupportedException();
        }

        // Pooled as the header's own arrays are: not for headers too large to pool, whose arrays should not stay cached.
        private void Grow<T>(ref T[] array, int used, int needed)
        {
            var bigger = HeaderPool.Rent<T>(Math.Max(needed, array.Length * 2), _table.Pooled);
            array.AsSpan(0, used).CopyTo(bigger);
            HeaderPool.Return(array, _table.Pooled);
            array = bigger;
        }

        private bool IsControlLora()
        {
            var imgIn = false;
            var normScale = false;
            foreach (ref readonly var m in Modules)
            {
                var n = Normalized(in m);
                imgIn |= n is "img_in" && Shape(m.Down) is [_, 128];
                normScale |= m.HasUpBias || (m.HasScale && n.EndsWith("_norm", StringComparison.Ordinal));
            }
            return imgIn && normScale;
        }

        private string NetworkOf(int adapterModules)
        {
            if (adapterModules == 0)
            {
                return "none";
            }
            foreach (ref readonly var m in Modules)
            {
                if (m.Complete && m.HasDora)
                {
                    return "dora";
                }
            }
            var counts = new Dictionary<string, int>(StringComparer.Ordinal);
            foreach (ref readonly var m in Modules)
            {
                if (!m.Complete)
                {
                    continue;
                }
                var type = m.HasHada ? "loha"
                    : m.HasLokr ? "lokr"
                    : m.HasOft ? "oft"
                    : m.HasGlora ? "glora"
                    : m.HasIa3 ? "ia3"
                    : m.HasDiff ? "full"
                    : m.HasNorm ? "norm"
                    : IsConvLoCon(in m) ? "locon"
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

        private bool IsConvLoCon(in Module m) =>
            m.Mid >= 0
            || Shape(m.Down) is [_, _, var kh, var kw] && (kh > 1 || kw > 1);

        private string FormatOf(string architecture)
        {
            var styles = new Dictionary<PrefixStyle, int>(8);
            var xlabs = false;
            var bflNames = false;
            foreach (ref readonly var m in Modules)
            {
                var n = Normalized(in m);
                CollectionsMarshal.GetValueRefOrAddDefault(styles, m.Style, out _)++;
                xlabs |= m.Up >= 0 && m.ProcessorName && n.Contains("_processor_", StringComparison.Ordinal);
                bflNames |= n.StartsWith("double_blocks_", StringComparison.Ordinal) || n.StartsWith("single_blocks_", StringComparison.Ordinal);
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

        private IReadOnlyList<string> TargetsOf(string architecture)
        {
            var isUnet = architecture is ArchitectureFamilies.Sd1 or ArchitectureFamilies.Sd2 or ArchitectureFamilies.Sdxl;
            // At most five distinct values: a list beats a sorted set here.
            var targets = new List<string>(2);
            foreach (ref readonly var m in Modules)
            {
                if (!m.Complete)
                {
                    continue;
                }
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
