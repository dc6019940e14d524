using LoraDeploy.Lora.Gguf;
using LoraDeploy.Lora.Peft;
using LoraDeploy.Lora.Safetensors;

namespace LoraDeploy.Lora.Merge;

/// <summary>
/// Merges PEFT adapters, or llama.cpp LoRA GGUFs, into a Llama-family GGUF base (as llama.cpp's converter wrote it) and
/// writes a GGUF that llama.cpp loads like the base — the way to serve a DoRA adapter, which llama.cpp cannot apply at
/// run time, or to bake in the LoRA the server stores for an LLM deploy (the GGUF <see cref="PeftLoraConverter"/> wrote).
/// </summary>
/// <remarks>
/// <para>Adapter kinds, told apart by the GGUF magic bytes, not the extension: a llama.cpp LoRA GGUF names its base
/// tensors itself and is already in llama.cpp's layout and row order, with llama.cpp's scale (see
/// <see cref="GgufLoraAdapter"/>); the merge equals applying it at run time with the strength as its scale.</para>
/// <para>Names (PEFT): Hugging Face modules map to llama.cpp tensors as <see cref="PeftLoraConverter"/> maps them
/// (<c>model.layers.N.self_attn.q_proj</c> → <c>blk.N.attn_q.weight</c>, …, <c>embed_tokens</c>, <c>lm_head</c>).
/// A GGUF matrix with ne [in, out] holds the Hugging Face [out, in] weight row for row, so ΔW rows (from the same
/// delta sources and tensor writer as <see cref="LoraMerger"/>) apply as they are — except W_q/W_k of arch
/// <c>llama</c>, whose rows llama.cpp's converter permuted per head: their ΔW rows, and a DoRA magnitude, are read
/// through that permutation. DoRA's norm is per output row, so it is the same whichever order the rows are in.</para>
/// <para>Tensors: F32/F16/BF16 tensors an adapter touches are merged in F32 (sums in double) and written in their own
/// type; a touched tensor of any other (quantized) type is refused; untouched tensors are copied byte for byte, at the
/// same offsets. Metadata: every key of the base, plus <see cref="LoraMerger.MergeRecordKey"/> (a JSON string of each
/// adapter's file, SHA-256, strength and module count, appended to an earlier record).</para>
/// <para>Streaming and output as <see cref="LoraMerger"/>: one tensor at a time, <c>OUT.part</c>, fsync, rename.</para>
/// </remarks>
public static class GgufMerger
{
    private const string PeftPrefix = "base_model.model.";

    /// <summary>
    /// True when <paramref name="path"/> starts with the GGUF magic bytes; false too when it cannot be read, so that the
    /// caller's merge reports why.
    /// </summary>
    public static bool IsGguf(string path)
    {
        Span<byte> magic = stackalloc byte[4];
        try
        {
            using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1);
            return file.ReadAtLeast(magic, 4, throwOnEndOfStream: false) == 4 && magic.SequenceEqual("GGUF"u8);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return false;
        }
    }

    /// <exception cref="LoraMergeException">An input is unusable or the output could not be written; no output file is left.</exception>
    public static MergeResult Merge(string basePath, IReadOnlyList<MergeAdapter> adapters, string outputPath, MergeOptions? options = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(basePath);
        ArgumentNullException.ThrowIfNull(adapters);
        ArgumentNullException.ThrowIfNull(outputPath);
        options ??= new MergeOptions();
        var started = options.TimeProvider.GetTimestamp();
        if (adapters.Count == 0)
        {
            throw new LoraMergeException("no adapters to merge");
        }
        if (options.OutputDtype != MergeDtype.Base)
        {
            throw new LoraMergeException($"a GGUF base keeps each tensor's own type; --dtype {options.OutputDtype} is for safetensors bases");
        }
        if (string.Equals(Path.GetFullPath(basePath), Path.GetFullPath(outputPath), StringComparison.Ordinal))
        {
            throw new LoraMergeException($"the output {outputPath} is the base file; write the merge to another path");
        }

        var gguf = ReadBase(basePath);
        var loaded = adapters.Select(a => IsGguf(a.Path) ? (Adapter: GgufLoraAdapter.Load(a, gguf.Architecture), LlamaCppNames: true) : (Adapter: LoadedAdapter.Load(a), LlamaCppNames: false)).ToList();
        var plan = Plan(basePath, gguf, loaded);
        var records = loaded.Select(l => l.Adapter).Select(a => new MergedAdapterRecord(Path.GetFileName(a.Path), a.Sha256, a.Strength, a.Modules.Count)).ToList();

        var writer = new GgufWriter { Alignment = gguf.Alignment };
        foreach (var (key, value) in gguf.Metadata)
        {
            if (key != LoraMerger.MergeRecordKey)
            {
                writer.Add(key, value);
            }
        }
        writer.Add(LoraMerger.MergeRecordKey, LoraMerger.MergeRecord(gguf.GetString(LoraMerger.MergeRecordKey), records));

        var part = outputPath + ".part";
        var bytesTotal = gguf.Tensors.Sum(t => t.ByteLength);
        int merged = 0, copied = 0;
        try
        {
            using (var output = options.OpenOutput?.Invoke(part) ?? new FileStream(part, FileMode.Create, FileAccess.Write, FileShare.None, bufferSize: 1 << 20))
            using (var input = File.OpenHandle(basePath, FileMode.Open, FileAccess.Read, FileShare.Read))
            {
                // GgufWriter hands each tensor callback its own counting stream; the tensor writer follows it.
                var target = new ForwardingStream();
                var tensorWriter = new TensorWriter(input, gguf.DataOffset, target);
                long done = 0;
                for (var i = 0; i < gguf.Tensors.Count; i++)
                {
                    var info = gguf.Tensors[i];
                    var index = i;
                    writer.AddTensor(info.Name, info.Type, info.Ne, info.ByteLength, stream =>
                    {
                        cancellationToken.ThrowIfCancellationRequested();
                        target.Inner = stream;
                        var tensor = View(info);
                        if (plan.TryGetValue(info.Name, out var patches))
                        {
                            tensorWriter.Merge(new LoraMerger.LayoutEntry(tensor, tensor.Dtype, tensor.DataStart, tensor.ByteLength), patches);
                            merged++;
                        }
                        else
                        {
                            tensorWriter.Copy(tensor);
                            copied++;
                        }
                        done += info.ByteLength;
                        options.Progress?.Report(new MergeProgress(index + 1, gguf.Tensors.Count, done, bytesTotal));
                    });
                }
                writer.WriteTo(output);
                output.Flush();
                if (output is FileStream file)
                {
                    file.Flush(flushToDisk: true);
                }
            }
            File.Move(part, outputPath, overwrite: true);
        }
        catch (Exception e)
        {
            LoraMerger.TryDelete(part);
            if (e is IOException or UnauthorizedAccessException)
            {
                throw new LoraMergeException($"writing {outputPath} failed: {e.Message} (no output was left)", e);
            }
            throw;
        }
        return new MergeResult(outputPath, merged, copied, 0, plan.Values.Sum(p => p.Count), new FileInfo(outputPath).Length,
            options.TimeProvider.GetElapsedTime(started), records);
    }

    private static GgufFile ReadBase(string basePath)
    {
        try
        {
            // Every array is kept (tokenizer vocabularies and merges) so that the metadata can be written back whole.
            return GgufReader.ReadFile(basePath, maxArrayElementsKept: int.MaxValue);
        }
        catch (GgufFormatException e)
        {
            throw new LoraMergeException($"base {basePath} is not a valid GGUF file: {e.Message}", e);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new LoraMergeException($"base {basePath}: {e.Message}", e);
        }
    }

    /// <summary>A GGUF tensor seen as a safetensors entry: torch shape (ne reversed), offsets in the data section, and F32/F16/BF16 or ggml's type name.</summary>
    private static SafetensorsTensor View(GgufTensorInfo info)
    {
        var dtype = info.Type switch
        {
            (uint)GgmlType.F32 => "F32",
            (uint)GgmlType.F16 => "F16",
            (uint)GgmlType.BF16 => "BF16",
            _ => info.TypeName,
        };
        return new SafetensorsTensor(info.Name, dtype, [.. info.Ne.Reverse()], info.Offset, info.Offset + info.ByteLength);
    }

    /// <summary>Resolves every module of every adapter to a base tensor and checks types and shapes; all problems are reported at once.</summary>
    /// <param name="adapters">Each adapter, and whether it names llama.cpp tensors itself (a llama.cpp LoRA GGUF) rather than Hugging Face modules.</param>
    private static Dictionary<string, List<LoraMerger.TargetedPatch>> Plan(string basePath, GgufFile gguf, List<(LoadedAdapter Adapter, bool LlamaCppNames)> adapters)
    {
        var arch = gguf.Architecture ?? throw new LoraMergeException($"base {basePath} has no general.architecture, so its tensor names are unknown");
        LlamaCppBaseModel model;
        try
        {
            model = LlamaCppBaseModel.FromGguf(gguf);
        }
        catch (GgufFormatException e)
        {
            throw new LoraMergeException($"base {basePath}: {e.Message}", e);
        }

        var plan = new Dictionary<string, List<LoraMerger.TargetedPatch>>(StringComparer.Ordinal);
        var unmatched = new List<string>();
        var mismatched = new List<string>();
        foreach (var (adapter, llamaCppNames) in adapters)
        {
            var file = Path.GetFileName(adapter.Path);
            foreach (var patch in adapter.Modules)
            {
                string name, label;
                int? heads;
                GgufTensorInfo? info;
                if (llamaCppNames)
                {
                    // Its rows are already in llama.cpp's order: no q/k permutation.
                    (name, label, heads) = (patch.Module, $"{file}: {patch.Module}.lora_a/.lora_b", 0);
                    if (!gguf.TensorsByName.TryGetValue(name, out info))
                    {
                        unmatched.Add(label);
                        continue;
                    }
                }
                else
                {
                    var module = patch.Module.StartsWith(PeftPrefix, StringComparison.Ordinal) ? patch.Module[PeftPrefix.Length..] : patch.Module;
                    if (PeftLoraConverter.LlamaCppTensor(module) is not { } target || !gguf.TensorsByName.TryGetValue(target.Tensor, out info))
                    {
                        unmatched.Add($"{file}: {patch.Module}");
                        continue;
                    }
                    name = target.Tensor;
                    label = $"{file}: {patch.Module} → {name}";
                    heads = arch == "llama" ? target.ShortName switch { "q_proj" => model.HeadCount, "k_proj" => model.HeadCountKv, _ => 0 } : 0;
                }
                var weight = View(info);
                if (!FloatCodec.IsSupported(weight.Dtype))
                {
                    mismatched.Add($"{label}: the base tensor is {weight.Dtype}, which merge cannot rewrite (merge into an F32, F16 or BF16 GGUF, then quantize the result)");
                    continue;
                }
                if (patch.BiasDelta is { } bias)
                {
                    mismatched.Add($"{file}: {bias.Name}: bias deltas are not merged into GGUF bases");
                    continue;
                }
                if (LoraMerger.ShapeProblem(patch, weight, new BaseTarget(name, name + ".bias", 0, null)) is { } problem)
                {
                    mismatched.Add($"{label}: {problem}");
                    continue;
                }
                if (heads is null || heads > 0 && !LlamaRopePermutation.CanPermute(info.Ne[1], heads.Value))
                {
                    mismatched.Add($"{label}: its {info.Ne[1]} rows do not split into {heads?.ToString() ?? "(no head count)"} heads of an even size, which the llama q/k permutation needs");
                    continue;
                }
                if (plan.TryGetValue(name, out var list) && list.FirstOrDefault(p => p.Adapter == adapter) is { } other)
                {
                    mismatched.Add($"{file}: modules '{other.Patch.Module}' and '{patch.Module}' both target {name}");
                    continue;
                }
                if (list is null)
                {
                    plan[name] = list = [];
                }
                list.Add(new LoraMerger.TargetedPatch(adapter, heads > 0 ? Permuted(patch, heads.Value) : patch, IsBias: false, RowStart: 0));
            }
        }
        if (unmatched.Count > 0 || mismatched.Count > 0)
        {
            var parts = new List<string>();
            if (unmatched.Count > 0)
            {
                parts.Add($"{unmatched.Count} adapter module(s) match no tensor of {Path.GetFileName(basePath)} ({arch}): {LoraMerger.List(unmatched)}");
            }
            if (mismatched.Count > 0)
            {
                parts.Add($"{mismatched.Count} module(s) do not fit the base tensor: {LoraMerger.List(mismatched)}");
            }
            throw new LoraMergeException("cannot merge: " + string.Join("; ", parts));
        }
        return plan;
    }

    /// <summary>The patch with its ΔW rows and DoRA magnitude read in llama.cpp's permuted q/k row order.</summary>
    private static ModulePatch Permuted(ModulePatch patch, int heads)
    {
        var delta = patch.Delta;
        var rows = (int)delta.Out;
        DoraMagnitude? dora = null;
        if (patch.Dora is { } magnitude)
        {
            var values = new float[magnitude.Tensor.Values.Length];
            for (var row = 0; row < values.Length; row++)
            {
                values[row] = magnitude.Tensor.Values[LlamaRopePermutation.SourceRow(row, rows, heads)];
            }
            dora = magnitude with { Tensor = magnitude.Tensor with { Values = values } };
        }
        return new ModulePatch
        {
            Module = patch.Module,
            NetworkType = patch.NetworkType,
            // A LoRA's rows are U's rows: reordering U keeps it on the blocked kernel, as a converted GGUF LoRA is.
            Delta = delta is LowRankDelta lowRank
                ? lowRank.WithRows(row => LlamaRopePermutation.SourceRow(row, rows, heads))
                : new PermutedRowsDelta(delta, heads) { Out = delta.Out, Rest = delta.Rest, FullShape = delta.FullShape },
            Scale = patch.Scale,
            Dora = dora,
            DottedNames = patch.DottedNames,
        };
    }

    /// <summary>ΔW with its rows in llama.cpp's order: row r is the Hugging Face row the q/k permutation put there.</summary>
    private sealed class PermutedRowsDelta(DeltaSource inner, int heads) : DeltaSource
    {
        public override bool IsThreadSafe => inner.IsThreadSafe;

        public override void Row(long o, Span<double> row) => inner.Row(LlamaRopePermutation.SourceRow((int)o, (int)Out, heads), row);
    }

    /// <summary>Writes to whichever stream <see cref="Inner"/> is at the moment.</summary>
    private sealed class ForwardingStream : Stream
    {
        public Stream Inner { get; set; } = Null;

        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
        public override void Flush() => Inner.Flush();
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => Inner.Write(buffer, offset, count);
        public override void Write(ReadOnlySpan<byte> buffer) => Inner.Write(buffer);
    }
}
