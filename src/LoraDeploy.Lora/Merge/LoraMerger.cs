using System.Buffers.Binary;
using System.Text.Encodings.Web;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraDeploy.Lora.Safetensors;

namespace LoraDeploy.Lora.Merge;

/// <summary>
/// Merges LoRA-family adapters into a base safetensors file, streaming tensor by tensor.
/// </summary>
/// <remarks>
/// <para>Memory: every adapter is read in full (they are small); of the base, for tensors an adapter changes or the
/// output dtype converts, the current one as F32 and its encoded bytes, and the next one as F32 (read ahead when no
/// larger than the base's largest tensor); a fixed buffer for the rest, which are copied byte for byte; and the
/// output's staging buffers (32 MiB).</para>
/// <para>Math (reference lora-formats.md §4): W' = W + strength·scale·ΔW, accumulated in F32 (a LoRA's U·V with
/// fused multiply-add) or, for the other forms, summed in double and rounded once to F32 per adapter; then rounded to
/// the output dtype (to nearest even). Adapters apply in the order given, each to the result of the ones before.
/// DoRA: PEFT's <c>lora_magnitude_vector</c> follows PEFT's merge (V = W + strength·scale·ΔW; W' = V·m/‖V‖ per
/// output row, no ε); LyCORIS' <c>dora_scale</c> follows LyCORIS (V = W + scale·ΔW;
/// W' = V·(1 + strength·(m/(‖V‖+ε) − 1)), the norm per output row for [out,1,…] and per input channel for [1,in,…]).</para>
/// <para>Output: tensors in the base's order, the header space-padded so data starts 8-aligned, written to
/// <c>OUT.part</c>, flushed to disk and renamed; on any failure the <c>.part</c> is deleted. Metadata: the base's,
/// plus <c>loradeploy.merge</c> (JSON: each adapter's file name, SHA-256, strength and module count, appended to an
/// earlier record); <c>modelspec.hash_sha256</c>, <c>sshs_model_hash</c> and <c>sshs_legacy_hash</c> are dropped
/// when tensors change, since they would no longer hold.</para>
/// </remarks>
public static class LoraMerger
{
    /// <summary>Metadata key of the merge record.</summary>
    public const string MergeRecordKey = "loradeploy.merge";

    private const int MaxListed = 10;
    private const long WritebackStep = 32 << 20;
    private static readonly string[] StaleHashKeys = ["modelspec.hash_sha256", "sshs_model_hash", "sshs_legacy_hash"];

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
        if (string.Equals(Path.GetFullPath(basePath), Path.GetFullPath(outputPath), StringComparison.Ordinal))
        {
            throw new LoraMergeException($"the output {outputPath} is the base file; write the merge to another path");
        }

        var header = ReadBase(basePath);
        using (header)
        {
            var loaded = adapters.Select(LoadedAdapter.Load).ToList();
            var plan = Plan(basePath, header, loaded);
            var tensors = header.Tensors.OrderBy(t => t.DataStart).ToList();
            var layout = Layout(tensors, plan, options.OutputDtype);
            var records = loaded.Select(a => new MergedAdapterRecord(Path.GetFileName(a.Path), a.Sha256, a.Strength, a.Modules.Count)).ToList();
            var headerBytes = HeaderBytes(header.Metadata, layout, records, anyChange: plan.Count > 0 || layout.Any(l => l.OutputDtype != l.Tensor.Dtype));

            // The next tensor to merge after layout[i], read meanwhile into a second buffer: only one whose F32 values
            // take no more than the base's largest tensor, so memory stays within twice that plus the adapters.
            var largest = tensors.Count == 0 ? 0 : tensors.Max(t => t.ByteLength);
            var nextDecoded = new SafetensorsTensor?[layout.Count];
            for (var i = layout.Count - 2; i >= 0; i--)
            {
                var after = layout[i + 1];
                nextDecoded[i] = plan.ContainsKey(after.Tensor.Name) || after.OutputDtype != after.Tensor.Dtype ? after.Tensor : nextDecoded[i + 1];
            }
            SafetensorsTensor? Prefetchable(int i) => nextDecoded[i] is { } next && next.ElementCount * 4 <= largest ? next : null;

            var part = outputPath + ".part";
            var bytesWritten = headerBytes.Length + layout.Sum(l => l.ByteLength);
            int merged = 0, copied = 0, converted = 0;
            try
            {
                using (var output = options.OpenOutput?.Invoke(part) ?? DirectOutputStream.Create(part))
                using (var input = File.OpenHandle(basePath, FileMode.Open, FileAccess.Read, FileShare.Read))
                {
                    output.Write(headerBytes);
                    var writer = new TensorWriter(input, header.DataOffset, output);
                    long done = headerBytes.Length;
                    long writtenBack = 0;
                    for (var i = 0; i < layout.Count; i++)
                    {
                        cancellationToken.ThrowIfCancellationRequested();
                        var entry = layout[i];
                        if (plan.TryGetValue(entry.Tensor.Name, out var patches))
                        {
                            writer.Merge(entry, patches, Prefetchable(i));
                            merged++;
                        }
                        else if (entry.OutputDtype != entry.Tensor.Dtype)
                        {
                            writer.Merge(entry, [], Prefetchable(i));
                            copied++;
                            converted++;
                        }
                        else
                        {
                            writer.Copy(entry.Tensor);
                            copied++;
                        }
                        done += entry.ByteLength;
                        if (output is FileStream file && done - writtenBack >= WritebackStep)
                        {
                            // Hand what is written so far to the disk now, so the closing fsync has little left.
                            file.Flush();
                            LinuxFiles.StartWriteback(file.SafeFileHandle, writtenBack, done - writtenBack);
                            writtenBack = done;
                        }
                        options.Progress?.Report(new MergeProgress(i + 1, layout.Count, done, bytesWritten));
                    }
                    output.Flush();
                    if (output is FileStream outputFile)
                    {
                        outputFile.Flush(flushToDisk: true);
                    }
                    else if (output is DirectOutputStream direct)
                    {
                        direct.FlushToDisk();
                    }
                }
                File.Move(part, outputPath, overwrite: true);
            }
            catch (Exception e)
            {
                TryDelete(part);
                if (e is IOException or UnauthorizedAccessException)
                {
                    throw new LoraMergeException($"writing {outputPath} failed: {e.Message} (no output was left)", e);
                }
                throw;
            }
            return new MergeResult(outputPath, merged, copied, converted, plan.Values.Sum(p => p.Count(x => !x.IsBias)), bytesWritten,
                options.TimeProvider.GetElapsedTime(started), records);
        }
    }

    /// <summary>Reads the inputs and resolves every module without writing anything; returns the number of base tensors that would change.</summary>
    /// <exception cref="LoraMergeException">As <see cref="Merge"/> would refuse the inputs.</exception>
    internal static int Check(string basePath, IReadOnlyList<MergeAdapter> adapters)
    {
        using var header = ReadBase(basePath);
        return Plan(basePath, header, [.. adapters.Select(LoadedAdapter.Load)]).Count;
    }

    private static SafetensorsHeader ReadBase(string basePath)
    {
        try
        {
            return SafetensorsReader.ReadFile(basePath);
        }
        catch (SafetensorsFormatException e)
        {
            throw new LoraMergeException($"base {basePath} is not a valid safetensors file: {e.Message}", e);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new LoraMergeException($"base {basePath}: {e.Message}", e);
        }
    }

    /// <summary>A module patch aimed at one base tensor (its weight, or its bias when <see cref="IsBias"/>).</summary>
    internal sealed record TargetedPatch(LoadedAdapter Adapter, ModulePatch Patch, bool IsBias, long RowStart);

    /// <summary>Resolves every module of every adapter to base tensors and checks shapes; all problems are reported at once.</summary>
    private static Dictionary<string, List<TargetedPatch>> Plan(string basePath, SafetensorsHeader header, List<LoadedAdapter> adapters)
    {
        var names = new BaseTensorNames(header.Tensors.Select(t => (t.Name, t.Shape)));
        var plan = new Dictionary<string, List<TargetedPatch>>(StringComparer.Ordinal);
        var unmatched = new List<string>();
        var mismatched = new List<string>();
        foreach (var adapter in adapters)
        {
            var file = Path.GetFileName(adapter.Path);
            foreach (var patch in adapter.Modules)
            {
                var target = names.Resolve(patch.Module);
                if (target is null)
                {
                    unmatched.Add($"{file}: {patch.Module}");
                    continue;
                }
                header.TryGetTensor(target.Weight, out var weight);
                var rows = target.RowCount is { } count ? $" rows {target.RowStart}–{target.RowStart + count - 1}" : "";
                if (ShapeProblem(patch, weight, target) is { } problem)
                {
                    mismatched.Add($"{file}: {patch.Module} → {weight.Name}{rows}: {problem}");
                    continue;
                }
                Add(weight.Name, new TargetedPatch(adapter, patch, IsBias: false, target.RowStart));
                if (patch.BiasDelta is { } bias)
                {
                    if (!header.TryGetTensor(target.Bias, out var baseBias))
                    {
                        mismatched.Add($"{file}: {bias.Name} → {target.Bias}: the base has no such tensor");
                    }
                    else if (!FloatCodec.IsSupported(baseBias.Dtype) || (target.RowCount is null
                        ? baseBias.ElementCount != bias.Values.Length
                        : baseBias.Shape.Length != 1 || target.RowStart + bias.Values.Length > baseBias.ElementCount))
                    {
                        mismatched.Add($"{file}: {bias.Name} → {baseBias.Name}: {bias.Values.Length} elements onto {baseBias.Dtype} {AdapterShape(baseBias.Shape)}");
                    }
                    else
                    {
                        Add(baseBias.Name, new TargetedPatch(adapter, patch, IsBias: true, target.RowStart));
                    }
                }
            }
        }
        if (unmatched.Count > 0 || mismatched.Count > 0)
        {
            var parts = new List<string>();
            if (unmatched.Count > 0)
            {
                parts.Add($"{unmatched.Count} adapter module(s) match no tensor of {Path.GetFileName(basePath)}: {List(unmatched)}");
            }
            if (mismatched.Count > 0)
            {
                parts.Add($"{mismatched.Count} module(s) do not fit the base tensor: {List(mismatched)}");
            }
            throw new LoraMergeException("cannot merge: " + string.Join("; ", parts));
        }
        return plan;

        void Add(string tensor, TargetedPatch patch)
        {
            if (!plan.TryGetValue(tensor, out var list))
            {
                plan[tensor] = list = [];
            }
            // Modules of one adapter may share a fused tensor (q, k and v of in_proj_weight), never its rows.
            var rows = patch.Patch.Delta.Out;
            if (list.FirstOrDefault(p => p.Adapter == patch.Adapter && p.IsBias == patch.IsBias
                    && p.RowStart < patch.RowStart + rows && patch.RowStart < p.RowStart + p.Patch.Delta.Out) is { } other)
            {
                mismatched.Add($"{Path.GetFileName(patch.Adapter.Path)}: modules '{other.Patch.Module}' and '{patch.Patch.Module}' both target {tensor}");
                return;
            }
            list.Add(patch);
        }
    }

    internal static string? ShapeProblem(ModulePatch patch, SafetensorsTensor weight, BaseTarget target)
    {
        var delta = patch.Delta;
        if (!FloatCodec.IsSupported(weight.Dtype))
        {
            return $"the base tensor is {weight.Dtype}; merge writes F32, F16 and BF16";
        }
        var shape = weight.Shape;
        if (shape.Length < 2 && patch.NetworkType != "Full")
        {
            return $"the base tensor has shape {AdapterShape(shape)}, not a matrix or conv kernel";
        }
        var rest = shape.Length == 0 ? 1 : weight.ElementCount / Math.Max(shape[0], 1);
        var outDim = target.RowCount ?? (shape.Length == 0 ? 1 : shape[0]);
        long[] targetShape = target.RowCount is { } rows ? [rows, .. shape[1..]] : shape;
        var mismatch = outDim != delta.Out || rest != delta.Rest
            || delta.FullShape is { } full && !Squeezed(full).SequenceEqual(Squeezed(targetShape));
        if (mismatch)
        {
            return $"the adapter's {patch.NetworkType} delta is {AdapterShape(delta.FullShape ?? [delta.Out, delta.Rest])}, the base tensor {AdapterShape(targetShape)}";
        }
        if (weight.ElementCount > Array.MaxLength / 4)
        {
            return $"the base tensor has {weight.ElementCount} elements, more than one merge buffer holds";
        }
        if (patch.Dora is { } dora)
        {
            var axis = DoraAxis(dora, targetShape);
            if (axis is null)
            {
                return $"DoRA magnitude '{dora.Tensor.Name}' has shape {AdapterShape(dora.Tensor.Shape)}, neither [{targetShape[0]}] per output row nor [1, {targetShape[1]}, …] per input channel";
            }
            if (axis == false && target.RowCount is not null)
            {
                return "a DoRA norm per input channel cannot be taken over a slice of a fused tensor";
            }
        }
        return null;
    }

    /// <summary>True: the magnitude is per output row; false: per input channel; null: it fits neither.</summary>
    internal static bool? DoraAxis(DoraMagnitude dora, long[] shape)
    {
        var m = dora.Tensor;
        if (m.Values.Length == shape[0] && (m.Shape.Length <= 1 || m.Shape[0] == shape[0]))
        {
            return true;
        }
        if (!dora.PeftConvention && m.Values.Length == shape[1] && m.Shape.Length >= 2 && m.Shape[0] == 1)
        {
            return false;
        }
        return null;
    }

    // A Linear delta may target a 1×1 conv and the reverse: compare without trailing 1s.
    private static long[] Squeezed(long[] shape)
    {
        var length = shape.Length;
        while (length > 2 && shape[length - 1] == 1)
        {
            length--;
        }
        return shape[..length];
    }

    internal static string List(List<string> items) =>
        string.Join(", ", items.Take(MaxListed)) + (items.Count > MaxListed ? $", … ({items.Count - MaxListed} more)" : "");

    private static string AdapterShape(long[] shape) => LoadedAdapter.Shape(shape);

    /// <summary>One output tensor: the base tensor, its output dtype and its new offsets.</summary>
    internal sealed record LayoutEntry(SafetensorsTensor Tensor, string OutputDtype, long Start, long ByteLength);

    private static List<LayoutEntry> Layout(List<SafetensorsTensor> tensors, Dictionary<string, List<TargetedPatch>> plan, MergeDtype dtype)
    {
        var layout = new List<LayoutEntry>(tensors.Count);
        long offset = 0;
        foreach (var tensor in tensors)
        {
            var output = dtype != MergeDtype.Base && FloatCodec.IsSupported(tensor.Dtype) ? dtype.ToString() : tensor.Dtype;
            var length = output == tensor.Dtype ? tensor.ByteLength : tensor.ElementCount * FloatCodec.ElementSize(output);
            if (output != tensor.Dtype && tensor.ElementCount > Array.MaxLength / 4)
            {
                throw new LoraMergeException($"tensor '{tensor.Name}' has {tensor.ElementCount} elements, more than one conversion buffer holds");
            }
            layout.Add(new LayoutEntry(tensor, output, offset, length));
            offset += length;
        }
        return layout;
    }

    private static byte[] HeaderBytes(IReadOnlyDictionary<string, string> baseMetadata, List<LayoutEntry> layout, List<MergedAdapterRecord> records, bool anyChange)
    {
        var metadata = new Dictionary<string, string>(baseMetadata, StringComparer.Ordinal);
        if (anyChange)
        {
            foreach (var key in StaleHashKeys)
            {
                metadata.Remove(key);
            }
        }
        metadata[MergeRecordKey] = MergeRecord(baseMetadata.GetValueOrDefault(MergeRecordKey), records);

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
            foreach (var entry in layout)
            {
                writer.WriteStartObject(entry.Tensor.Name);
                writer.WriteString("dtype", entry.OutputDtype);
                writer.WriteStartArray("shape");
                foreach (var dim in entry.Tensor.Shape)
                {
                    writer.WriteNumberValue(dim);
                }
                writer.WriteEndArray();
                writer.WriteStartArray("data_offsets");
                writer.WriteNumberValue(entry.Start);
                writer.WriteNumberValue(entry.Start + entry.ByteLength);
                writer.WriteEndArray();
                writer.WriteEndObject();
            }
            writer.WriteEndObject();
        }
        return FrameHeader(json) ?? throw new LoraMergeException(
            $"the merged header would be {json.Length} bytes, over the safetensors limit of {SafetensorsReader.MaxHeaderLength}");
    }

    /// <summary>
    /// The header as a safetensors file starts: its length (8 bytes, little-endian), then the JSON space-padded so that
    /// the data section starts 8-aligned, as the safetensors writer does. Null when over the format's header limit.
    /// </summary>
    internal static byte[]? FrameHeader(MemoryStream json)
    {
        var length = (json.Length + 7) / 8 * 8;
        if (length > SafetensorsReader.MaxHeaderLength)
        {
            return null;
        }
        var bytes = new byte[8 + length];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, (ulong)length);
        json.GetBuffer().AsSpan(0, (int)json.Length).CopyTo(bytes.AsSpan(8));
        bytes.AsSpan(8 + (int)json.Length).Fill((byte)' ');
        return bytes;
    }

    internal static string MergeRecord(string? earlier, List<MergedAdapterRecord> records)
    {
        JsonArray array;
        if (earlier is null)
        {
            array = [];
        }
        else
        {
            try
            {
                array = JsonNode.Parse(earlier) as JsonArray ?? throw new LoraMergeException($"the base's __metadata__ '{MergeRecordKey}' is not a JSON list");
            }
            catch (JsonException e)
            {
                throw new LoraMergeException($"the base's __metadata__ '{MergeRecordKey}' is not valid JSON: {e.Message}", e);
            }
        }
        foreach (var record in records)
        {
            array.Add(new JsonObject
            {
                ["file"] = record.File,
                ["sha256"] = record.Sha256,
                ["strength"] = record.Strength,
                ["modules"] = record.Modules,
            });
        }
        return array.ToJsonString();
    }

    internal static void TryDelete(string path)
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
