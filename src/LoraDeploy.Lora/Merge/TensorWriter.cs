using System.Buffers;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;
using LoraDeploy.Lora.Safetensors;

namespace LoraDeploy.Lora.Merge;

/// <summary>
/// Writes output tensors one at a time: copies untouched ones byte for byte (in the kernel into an output file, else
/// through a fixed buffer), and decodes, patches and re-encodes merged ones. Its buffers grow to the largest tensor
/// merged and are reused. While one tensor is merged, the next can be read and decoded into a second buffer
/// (<see cref="Prefetch"/>), so that work overlaps the encoding and writing, which use one core.
/// </summary>
internal sealed class TensorWriter(SafeFileHandle input, long dataOffset, Stream output)
{
    // torch.finfo(torch.float32).eps, the ε LyCORIS and ComfyUI add to DoRA's norm.
    private const double DoraEpsilon = 1.1920928955078125e-07;
    private const int CopyBufferSize = 4 * 1024 * 1024;
    private const int ChunkElements = 64 * 1024;

    private readonly byte[] _copyBuffer = new byte[CopyBufferSize];
    private float[] _values = [];
    private float[] _spare = [];
    private SafetensorsTensor? _prefetched;
    private Task _prefetch = Task.CompletedTask;
    private byte[] _encoded = [];
    private double[] _row = [];
    private bool _kernelCopy = true;

    public void Copy(SafetensorsTensor tensor)
    {
        var position = dataOffset + tensor.DataStart;
        var remaining = tensor.ByteLength;
        // Into the output file itself, the kernel copies; other streams (GGUF's writer, the tests' full disk) and
        // file systems it cannot copy between take the buffer below, from where the kernel stopped.
        if (_kernelCopy && output is FileStream file)
        {
            file.Flush();
            var at = file.Position;
            var copied = LinuxFiles.Copy(input, position, file.SafeFileHandle, at, remaining, out var unsupported);
            file.Position = at + copied;
            position += copied;
            remaining -= copied;
            _kernelCopy = !unsupported;
        }
        while (remaining > 0)
        {
            var chunk = _copyBuffer.AsSpan(0, (int)Math.Min(remaining, _copyBuffer.Length));
            ReadExactly(position, chunk, tensor.Name);
            output.Write(chunk);
            position += chunk.Length;
            remaining -= chunk.Length;
        }
    }

    /// <summary>Applies <paramref name="patches"/> in order (none: a dtype conversion only) and writes the tensor in its output dtype.</summary>
    /// <param name="next">The tensor merged after this one, to read and decode meanwhile into a second buffer; null for none.</param>
    public void Merge(LoraMerger.LayoutEntry entry, IReadOnlyList<LoraMerger.TargetedPatch> patches, SafetensorsTensor? next = null)
    {
        if (InRowChunks(entry, patches))
        {
            MergeInChunks(entry, patches);
            return;
        }
        var tensor = entry.Tensor;
        var count = (int)tensor.ElementCount;
        var prefetched = _prefetched == tensor;
        _prefetched = null;
        _prefetch.GetAwaiter().GetResult();
        if (prefetched)
        {
            (_values, _spare) = (_spare, _values);
        }
        else
        {
            Grow(ref _values, count);
            Load(tensor, _values);
        }
        var values = _values.AsSpan(0, count);
        if (next is not null)
        {
            Prefetch(next);
        }

        foreach (var patch in patches)
        {
            if (patch.IsBias)
            {
                var c = patch.Adapter.Strength * patch.Patch.Scale;
                var bias = patch.Patch.BiasDelta!.Values;
                var slice = values.Slice((int)patch.RowStart, bias.Length);
                for (var i = 0; i < bias.Length; i++)
                {
                    slice[i] = (float)(slice[i] + c * bias[i]);
                }
            }
            else
            {
                var rest = (int)patch.Patch.Delta.Rest;
                var rows = (int)patch.Patch.Delta.Out;
                ApplyWeight(_values, (int)patch.RowStart * rest, [rows, .. tensor.Shape[1..]], patch);
            }
        }

        if (NonFiniteFromMerge(tensor, values, 0) is { } nonFinite)
        {
            throw Refusal(entry, nonFinite);
        }
        var encoded = Grow(ref _encoded, (int)entry.ByteLength);
        var overflow = FloatCodec.Encode(values, entry.OutputDtype, encoded);
        if (overflow >= 0)
        {
            throw Refusal(entry, new ChunkProblem(overflow, values[(int)overflow], null));
        }
        output.Write(encoded);
    }

    /// <summary>
    /// Plain LoRA patches (and dtype conversions) need no whole-tensor pass such as DoRA's norm: their rows are
    /// independent, so the tensor is merged a few rows at a time while those rows are in cache, on every core.
    /// </summary>
    private static bool InRowChunks(LoraMerger.LayoutEntry entry, IReadOnlyList<LoraMerger.TargetedPatch> patches) =>
        entry.Tensor.ElementCount > 0 && (patches.Count == 0 || entry.Tensor.Shape.Length >= 2
            && patches.All(p => !p.IsBias && p.Patch.Dora is null && p.Patch.Delta is LowRankDelta { HasBlockedPath: true }));

    /// <summary>
    /// Each chunk of rows, on whichever core is free: read, decode to F32, add every patch's rows, check for values that
    /// became non-finite, encode into its place in the output bytes. The same sums as the whole-tensor path
    /// (<see cref="LowRankDelta.AddRows"/>), without passing a whole F32 tensor through memory four times.
    /// </summary>
    private void MergeInChunks(LoraMerger.LayoutEntry entry, IReadOnlyList<LoraMerger.TargetedPatch> patches)
    {
        _prefetch.GetAwaiter().GetResult();
        _prefetched = null;
        var tensor = entry.Tensor;
        var rows = (int)(tensor.Shape.Length == 0 ? 1 : tensor.Shape[0]);
        var rest = (int)(tensor.ElementCount / rows);
        // Rows per chunk: a few hundred KiB of F32, a multiple of the kernel's 4-row blocks.
        var chunkRows = Math.Max(1, ChunkElements / rest);
        if (chunkRows > 4)
        {
            chunkRows &= ~3;
        }
        var chunks = (rows + chunkRows - 1) / chunkRows;
        var encoded = Grow(ref _encoded, (int)entry.ByteLength);
        var encodedArray = _encoded;
        ChunkProblem? problem = null;
        var gate = new Lock();

        Parallel.For(0, chunks, () => ArrayPool<float>.Shared.Rent(chunkRows * rest), (k, _, scratch) =>
        {
            var first = k * chunkRows;
            if (MergeChunk(entry, patches, first, Math.Min(chunkRows, rows - first), rest, scratch, encodedArray) is { } found)
            {
                lock (gate)
                {
                    // The first by kind, then by position, whichever chunk finds it first: the same error every run.
                    if (problem is null || found.IsNonFinite && !problem.IsNonFinite || found.IsNonFinite == problem.IsNonFinite && found.Index < problem.Index)
                    {
                        problem = found;
                    }
                }
            }
            return scratch;
        }, scratch => ArrayPool<float>.Shared.Return(scratch));

        if (problem is not null)
        {
            throw Refusal(entry, problem);
        }
        output.Write(encoded);
    }

    /// <summary>Rows <paramref name="first"/> to <paramref name="first"/> + <paramref name="count"/> − 1 of the tensor, merged and encoded into <paramref name="encoded"/>; a value that cannot be written is returned, not thrown.</summary>
    /// <remarks>Optimised at once, as the kernel and codec it calls are: a merge runs its loops for seconds and then
    /// ends, and tiered compilation spent a third of the merge's CPU running them unoptimised and recompiling them.</remarks>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private ChunkProblem? MergeChunk(LoraMerger.LayoutEntry entry, IReadOnlyList<LoraMerger.TargetedPatch> patches, int first, int count, int rest,
        float[] scratch, byte[] encoded)
    {
        var tensor = entry.Tensor;
        var inSize = FloatCodec.ElementSize(tensor.Dtype);
        var outSize = FloatCodec.ElementSize(entry.OutputDtype);
        var values = scratch.AsSpan(0, count * rest);
        var bytes = MemoryMarshal.AsBytes(values);
        // Read into the top of the buffer and decoded in place, as Load does.
        var raw = bytes[(bytes.Length - count * rest * inSize)..];
        var start = (long)first * rest;
        ReadExactly(dataOffset + tensor.DataStart + start * inSize, raw, tensor.Name);
        FloatCodec.Decode(raw, tensor.Dtype, values);
        foreach (var patch in patches)
        {
            var delta = (LowRankDelta)patch.Patch.Delta;
            var patchFirst = (int)patch.RowStart;
            var from = Math.Max(first, patchFirst);
            var to = Math.Min(first + count, patchFirst + (int)delta.Out);
            if (from < to)
            {
                delta.AddRows(scratch, (patchFirst - first) * rest, patch.Adapter.Strength * patch.Patch.Scale, from - patchFirst, to - from);
            }
        }
        if (NonFiniteFromMerge(tensor, values, start) is { } nonFinite)
        {
            return nonFinite;
        }
        var overflow = FloatCodec.Encode(values, entry.OutputDtype, encoded.AsSpan((int)(start * outSize), count * rest * outSize));
        return overflow >= 0 ? new ChunkProblem(start + overflow, values[(int)overflow], null) : null;
    }

    /// <summary>The first of <paramref name="values"/> (the tensor's from element <paramref name="start"/>) that is NaN or ±Inf where the base value was finite, or null.</summary>
    private ChunkProblem? NonFiniteFromMerge(SafetensorsTensor tensor, Span<float> values, long start)
    {
        var size = FloatCodec.ElementSize(tensor.Dtype);
        Span<byte> raw = stackalloc byte[4];
        Span<float> original = stackalloc float[1];
        for (var i = FloatCodec.IndexOfNonFinite(values); i >= 0 && i < values.Length; i++)
        {
            if (!float.IsFinite(values[i]))
            {
                // Rare: the base's own bytes tell whether the base value was already non-finite (then it is kept).
                ReadExactly(dataOffset + tensor.DataStart + (start + i) * size, raw[..size], tensor.Name);
                FloatCodec.Decode(raw[..size], tensor.Dtype, original);
                if (float.IsFinite(original[0]))
                {
                    return new ChunkProblem(start + i, values[i], original[0]);
                }
            }
        }
        return null;
    }

    private static LoraMergeException Refusal(LoraMerger.LayoutEntry entry, ChunkProblem problem) => problem.IsNonFinite
        ? new LoraMergeException($"merging into '{entry.Tensor.Name}' gives {problem.Value} at element {problem.Index} (base value {problem.BaseValue}); check the adapter strengths and that the adapter belongs to this base")
        : new LoraMergeException($"merged tensor '{entry.Tensor.Name}' has {problem.Value} at element {problem.Index}, beyond the range of {entry.OutputDtype}");

    /// <summary>A merged value that cannot be written: non-finite where the base was finite (with <see cref="BaseValue"/>), or beyond the output dtype.</summary>
    private sealed record ChunkProblem(long Index, float Value, float? BaseValue)
    {
        public bool IsNonFinite => BaseValue is not null;
    }

    /// <summary>
    /// Starts reading and decoding <paramref name="tensor"/>, the next one to merge, into the spare buffer; the
    /// <see cref="Merge"/> of that tensor picks it up (and reports its errors).
    /// </summary>
    private void Prefetch(SafetensorsTensor tensor)
    {
        Grow(ref _spare, (int)tensor.ElementCount);
        var buffer = _spare;
        _prefetched = tensor;
        _prefetch = Task.Run(() => Load(tensor, buffer));
    }

    /// <summary>
    /// Reads the tensor's bytes into the top of <paramref name="values"/> (as many bytes as its F32 values take) and
    /// decodes them in place: element i is written at 4i, below the 2-byte elements not yet read at 2·count + 2j
    /// (j &gt; i), so one buffer serves as both; <see cref="FloatCodec.Decode"/> goes front to back. F32 bytes are
    /// already the values.
    /// </summary>
    private void Load(SafetensorsTensor tensor, float[] values)
    {
        var count = (int)tensor.ElementCount;
        var bytes = MemoryMarshal.AsBytes(values.AsSpan(0, count));
        var raw = bytes[(bytes.Length - (int)tensor.ByteLength)..];
        ReadExactly(dataOffset + tensor.DataStart, raw, tensor.Name);
        FloatCodec.Decode(raw, tensor.Dtype, values.AsSpan(0, count));
    }

    /// <param name="buffer">The tensor's values.</param>
    /// <param name="offset">Where the rows the patch covers start (0, or a fused tensor's slice).</param>
    /// <param name="shape">The shape of those rows.</param>
    private void ApplyWeight(float[] buffer, int offset, long[] shape, LoraMerger.TargetedPatch target)
    {
        var patch = target.Patch;
        var delta = patch.Delta;
        var strength = target.Adapter.Strength;
        var rest = (int)delta.Rest;
        var rows = (int)delta.Out;
        var values = buffer.AsSpan(offset, rows * rest);
        var row = Grow(ref _row, rest);

        if (patch.Dora is not { } dora)
        {
            var c = strength * patch.Scale;
            if (delta is LowRankDelta { HasBlockedPath: true } lowRank)
            {
                lowRank.AddTo(buffer, offset, c);
                return;
            }
            // Rows are independent and each is rounded on its own, so the result does not depend on the split.
            if (delta.IsThreadSafe && rows >= 64 && Environment.ProcessorCount > 1)
            {
                Parallel.For(0, rows, () => new double[rest], (o, _, rowBuffer) =>
                {
                    delta.Row(o, rowBuffer);
                    AddRow(buffer.AsSpan(offset + o * rest, rest), rowBuffer, c);
                    return rowBuffer;
                }, _ => { });
                return;
            }
            for (var o = 0; o < rows; o++)
            {
                delta.Row(o, row);
                AddRow(values.Slice(o * rest, rest), row, c);
            }
            return;
        }

        var magnitude = dora.Tensor.Values;
        // PEFT folds the strength into the scaling and normalises the result; LyCORIS normalises W + scale·ΔW and
        // blends the normalisation factor toward 1 by the strength.
        var scale = dora.PeftConvention ? strength * patch.Scale : patch.Scale;
        if (LoraMerger.DoraAxis(dora, shape) == true)
        {
            for (var o = 0; o < rows; o++)
            {
                delta.Row(o, row);
                var w = values.Slice(o * rest, rest);
                double squares = 0;
                for (var j = 0; j < rest; j++)
                {
                    row[j] = w[j] + scale * row[j];
                    squares += row[j] * row[j];
                }
                var norm = Math.Sqrt(squares);
                var factor = dora.PeftConvention ? magnitude[o] / norm : 1 + strength * (magnitude[o] / (norm + DoraEpsilon) - 1);
                for (var j = 0; j < rest; j++)
                {
                    w[j] = (float)(row[j] * factor);
                }
            }
            return;
        }

        // Per input channel: the norm runs over the output rows and the kernel, so it needs a first pass.
        var channels = (int)shape[1];
        var kernel = rest / channels;
        var columnSquares = new double[channels];
        for (var o = 0; o < rows; o++)
        {
            delta.Row(o, row);
            var w = values.Slice(o * rest, rest);
            for (var j = 0; j < rest; j++)
            {
                var v = w[j] + scale * row[j];
                columnSquares[j / kernel] += v * v;
            }
        }
        var factors = new double[channels];
        for (var i = 0; i < channels; i++)
        {
            factors[i] = 1 + strength * (magnitude[i] / (Math.Sqrt(columnSquares[i]) + DoraEpsilon) - 1);
        }
        for (var o = 0; o < rows; o++)
        {
            delta.Row(o, row);
            var w = values.Slice(o * rest, rest);
            for (var j = 0; j < rest; j++)
            {
                w[j] = (float)((w[j] + scale * row[j]) * factors[j / kernel]);
            }
        }
    }

    private static void AddRow(Span<float> weights, ReadOnlySpan<double> row, double coefficient)
    {
        for (var j = 0; j < weights.Length; j++)
        {
            weights[j] = (float)(weights[j] + coefficient * row[j]);
        }
    }

    private void ReadExactly(long position, Span<byte> destination, string name)
    {
        while (destination.Length > 0)
        {
            var read = RandomAccess.Read(input, destination, position);
            if (read == 0)
            {
                throw new LoraMergeException($"the base file ended while reading tensor '{name}' (was it changed during the merge?)");
            }
            destination = destination[read..];
            position += read;
        }
    }

    private static Span<T> Grow<T>(ref T[] buffer, int length)
    {
        if (buffer.Length < length)
        {
            buffer = new T[length];
        }
        return buffer.AsSpan(0, length);
    }
}
