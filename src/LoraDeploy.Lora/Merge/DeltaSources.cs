using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace LoraDeploy.Lora.Merge;

/// <summary>
/// A module's weight delta ΔW (before alpha/rank and strength), produced one output row at a time so that it is
/// never materialised at the size of the base tensor. A row is ΔW[o, ·] flattened over the remaining dimensions
/// (in·kh·kw), in the base tensor's row-major order. Rows are summed in double; <see cref="LowRankDelta.AddTo"/>
/// adds a whole low-rank delta summed in F32.
/// </summary>
internal abstract class DeltaSource
{
    /// <summary>Output rows of ΔW (the base tensor's first dimension).</summary>
    public required long Out { get; init; }

    /// <summary>Elements per row: the product of the base tensor's other dimensions.</summary>
    public required long Rest { get; init; }

    /// <summary>The full shape when the factors determine it (e.g. a conv's kernel); null when only [out, rest] is known.</summary>
    public long[]? FullShape { get; init; }

    /// <summary>Whether <see cref="Row"/> may run on several threads at once.</summary>
    public virtual bool IsThreadSafe => true;

    /// <summary>Writes ΔW[o, ·] into <paramref name="row"/> (length <see cref="Rest"/>), overwriting it.</summary>
    public abstract void Row(long o, Span<double> row);
}

/// <summary>
/// ΔW = U·V with U [out, r] and V [r, rest]: LoRA/LoCon, and the Tucker forms once the core is folded into V.
/// Factors read from the file stay float (a float product is exact in double); folded ones are double.
/// </summary>
internal sealed class LowRankDelta : DeltaSource
{
    /// <summary>row += u·v, widened to double: SIMD, with the same separate multiply and add as the scalar tail (no fused multiply-add), so every element is the same as in a plain loop.</summary>
    private static void AddScaled(Span<double> row, double u, ReadOnlySpan<float> v)
    {
        var j = 0;
        if (Vector.IsHardwareAccelerated)
        {
            var scale = new Vector<double>(u);
            var width = Vector<float>.Count;
            var half = Vector<double>.Count;
            for (; j <= v.Length - width; j += width)
            {
                Vector.Widen(new Vector<float>(v[j..]), out var low, out var high);
                (new Vector<double>(row[j..]) + scale * low).CopyTo(row[j..]);
                (new Vector<double>(row[(j + half)..]) + scale * high).CopyTo(row[(j + half)..]);
            }
        }
        for (; j < v.Length; j++)
        {
            row[j] += u * v[j];
        }
    }

    private readonly float[]? _uFloat;
    private readonly double[]? _uDouble;
    private readonly float[]? _vFloat;
    private readonly double[]? _vDouble;
    private readonly int _rank;

    public LowRankDelta(float[] u, float[] v, int rank) => (_uFloat, _vFloat, _rank) = (u, v, rank);

    public LowRankDelta(double[] u, double[] v, int rank) => (_uDouble, _vDouble, _rank) = (u, v, rank);

    public LowRankDelta(float[] u, double[] v, int rank) => (_uFloat, _vDouble, _rank) = (u, v, rank);

    private LowRankDelta(float[]? uFloat, double[]? uDouble, float[]? vFloat, double[]? vDouble, int rank) =>
        (_uFloat, _uDouble, _vFloat, _vDouble, _rank) = (uFloat, uDouble, vFloat, vDouble, rank);

    /// <summary>The same delta with its rows reordered: row o of the result is row <paramref name="sourceRow"/>(o) of this one.</summary>
    public LowRankDelta WithRows(Func<int, int> sourceRow)
    {
        var rows = (int)Out;
        T[]? Reordered<T>(T[]? u)
        {
            if (u is null)
            {
                return null;
            }
            var result = new T[u.Length];
            for (var o = 0; o < rows; o++)
            {
                Array.Copy(u, sourceRow(o) * _rank, result, o * _rank, _rank);
            }
            return result;
        }
        return new LowRankDelta(Reordered(_uFloat), Reordered(_uDouble), _vFloat, _vDouble, _rank) { Out = Out, Rest = Rest, FullShape = FullShape };
    }

    /// <summary>Whether <see cref="AddTo"/> can take this delta: float factors, 256-bit vectors and fused multiply-add in hardware (elsewhere it is a slow software fallback).</summary>
    public bool HasBlockedPath => _uFloat is not null && _vFloat is not null && Vector256.IsHardwareAccelerated && Fma.IsSupported;

    /// <summary>
    /// weights[o, j] += c·ΔW[o, j] for every row, accumulated in F32 as the merge math allows ("accumulate in F32"):
    /// each ΔW element is the sum over m in order of u·v with fused multiply-add, then added to the weight with one
    /// more. Blocks of 4 rows × 2 vectors of columns keep their 8 sums in registers over the whole rank, so V is read
    /// once per 4 rows and nothing but the result touches memory. Within 1e-6 relative of <see cref="Row"/>'s double
    /// sums for the ranks adapters have.
    /// </summary>
    /// <param name="weights">The tensor's values; the rows start at <paramref name="offset"/>.</param>
    public void AddTo(float[] weights, int offset, double c)
    {
        var rows = (int)Out;
        var rest = (int)Rest;
        var blocks = rows / 4;
        var u = _uFloat!;
        var v = _vFloat!;
        var rank = _rank;
        var scale = (float)c;
        // A few large chunks per core: blocks of 4 rows are too small to hand out one by one (the pool's threads then
        // spend their time yielding to each other), and a few per core still even out a core taken by something else.
        var chunks = Math.Min(blocks, Environment.ProcessorCount * 4);
        Parallel.For(0, chunks, chunk =>
        {
            for (var block = (int)((long)blocks * chunk / chunks); block < (int)((long)blocks * (chunk + 1) / chunks); block++)
            {
                AddBlock(weights, offset, block * 4, 4, rest, rank, u, v, scale);
            }
        });
        if (rows % 4 != 0)
        {
            AddBlock(weights, offset, blocks * 4, rows % 4, rest, rank, u, v, scale);
        }
    }

    /// <summary>
    /// <see cref="AddTo"/> for rows <paramref name="first"/> to <paramref name="first"/> + <paramref name="count"/> − 1
    /// only, on the calling thread: row o goes to <c>weights[offset + o·rest]</c> (so <paramref name="offset"/> may be
    /// negative for a buffer that holds only those rows). Every element gets the same sums as through <see cref="AddTo"/>.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public void AddRows(float[] weights, int offset, double c, int first, int count)
    {
        var rest = (int)Rest;
        var end = first + count;
        var o = first;
        for (; o + 4 <= end; o += 4)
        {
            AddBlock(weights, offset, o, 4, rest, _rank, _uFloat!, _vFloat!, (float)c);
        }
        if (o < end)
        {
            AddBlock(weights, offset, o, end - o, rest, _rank, _uFloat!, _vFloat!, (float)c);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void AddBlock(float[] weights, int offset, int first, int count, int rest, int rank, float[] u, float[] v, float c)
    {
        var j = 0;
        if (count == 4)
        {
            if (Vector512.IsHardwareAccelerated)
            {
                j = AddBlock512(weights, offset, first, rest, rank, u, v, c);
            }
            j = AddBlock256(weights, offset, first, j, rest, rank, u, v, c);
        }
        // The columns past the last full vectors, and blocks of fewer than 4 rows: the same sums one at a time.
        for (var o = first; o < first + count; o++)
        {
            for (var jj = j; jj < rest; jj++)
            {
                var sum = 0f;
                for (var m = 0; m < rank; m++)
                {
                    sum = MathF.FusedMultiplyAdd(u[o * rank + m], v[m * rest + jj], sum);
                }
                ref var w = ref weights[offset + o * rest + jj];
                w = MathF.FusedMultiplyAdd(c, sum, w);
            }
        }
    }

    /// <summary>4 rows × 32 columns per step; returns the first column not done.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static int AddBlock512(float[] weights, int offset, int first, int rest, int rank, float[] u, float[] v, float c)
    {
        var j = 0;
        for (; j <= rest - 32; j += 32)
        {
            Vector512<float> a0 = default, b0 = default, a1 = default, b1 = default, a2 = default, b2 = default, a3 = default, b3 = default;
            for (var m = 0; m < rank; m++)
            {
                var low = Vector512.LoadUnsafe(ref v[m * rest + j]);
                var high = Vector512.LoadUnsafe(ref v[m * rest + j + 16]);
                var u0 = Vector512.Create(u[first * rank + m]);
                var u1 = Vector512.Create(u[(first + 1) * rank + m]);
                var u2 = Vector512.Create(u[(first + 2) * rank + m]);
                var u3 = Vector512.Create(u[(first + 3) * rank + m]);
                a0 = Vector512.FusedMultiplyAdd(u0, low, a0); b0 = Vector512.FusedMultiplyAdd(u0, high, b0);
                a1 = Vector512.FusedMultiplyAdd(u1, low, a1); b1 = Vector512.FusedMultiplyAdd(u1, high, b1);
                a2 = Vector512.FusedMultiplyAdd(u2, low, a2); b2 = Vector512.FusedMultiplyAdd(u2, high, b2);
                a3 = Vector512.FusedMultiplyAdd(u3, low, a3); b3 = Vector512.FusedMultiplyAdd(u3, high, b3);
            }
            var scale = Vector512.Create(c);
            Apply(ref weights[offset + first * rest + j], a0, b0, scale);
            Apply(ref weights[offset + (first + 1) * rest + j], a1, b1, scale);
            Apply(ref weights[offset + (first + 2) * rest + j], a2, b2, scale);
            Apply(ref weights[offset + (first + 3) * rest + j], a3, b3, scale);
        }
        return j;
    }

    /// <summary>4 rows × 16 columns per step from column <paramref name="j"/>; returns the first column not done.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static int AddBlock256(float[] weights, int offset, int first, int j, int rest, int rank, float[] u, float[] v, float c)
    {
        for (; j <= rest - 16; j += 16)
        {
            Vector256<float> a0 = default, b0 = default, a1 = default, b1 = default, a2 = default, b2 = default, a3 = default, b3 = default;
            for (var m = 0; m < rank; m++)
            {
                var low = Vector256.LoadUnsafe(ref v[m * rest + j]);
                var high = Vector256.LoadUnsafe(ref v[m * rest + j + 8]);
                var u0 = Vector256.Create(u[first * rank + m]);
                var u1 = Vector256.Create(u[(first + 1) * rank + m]);
                var u2 = Vector256.Create(u[(first + 2) * rank + m]);
                var u3 = Vector256.Create(u[(first + 3) * rank + m]);
                a0 = Vector256.FusedMultiplyAdd(u0, low, a0); b0 = Vector256.FusedMultiplyAdd(u0, high, b0);
                a1 = Vector256.FusedMultiplyAdd(u1, low, a1); b1 = Vector256.FusedMultiplyAdd(u1, high, b1);
                a2 = Vector256.FusedMultiplyAdd(u2, low, a2); b2 = Vector256.FusedMultiplyAdd(u2, high, b2);
                a3 = Vector256.FusedMultiplyAdd(u3, low, a3); b3 = Vector256.FusedMultiplyAdd(u3, high, b3);
            }
            var scale = Vector256.Create(c);
            Apply(ref weights[offset + first * rest + j], a0, b0, scale);
            Apply(ref weights[offset + (first + 1) * rest + j], a1, b1, scale);
            Apply(ref weights[offset + (first + 2) * rest + j], a2, b2, scale);
            Apply(ref weights[offset + (first + 3) * rest + j], a3, b3, scale);
        }
        return j;
    }

    private static void Apply(ref float target, Vector512<float> low, Vector512<float> high, Vector512<float> scale)
    {
        Vector512.FusedMultiplyAdd(scale, low, Vector512.LoadUnsafe(ref target)).StoreUnsafe(ref target);
        Vector512.FusedMultiplyAdd(scale, high, Vector512.LoadUnsafe(ref target, 16)).StoreUnsafe(ref target, 16);
    }

    private static void Apply(ref float target, Vector256<float> low, Vector256<float> high, Vector256<float> scale)
    {
        Vector256.FusedMultiplyAdd(scale, low, Vector256.LoadUnsafe(ref target)).StoreUnsafe(ref target);
        Vector256.FusedMultiplyAdd(scale, high, Vector256.LoadUnsafe(ref target, 8)).StoreUnsafe(ref target, 8);
    }

    public override void Row(long o, Span<double> row)
    {
        row.Clear();
        var rest = (int)Rest;
        for (var m = 0; m < _rank; m++)
        {
            var index = o * _rank + m;
            var u = _uFloat is null ? _uDouble![index] : _uFloat[index];
            if (_vFloat is not null)
            {
                AddScaled(row, u, _vFloat.AsSpan(m * rest, rest));
            }
            else
            {
                var v = _vDouble.AsSpan(m * rest, rest);
                for (var j = 0; j < rest; j++)
                {
                    row[j] += u * v[j];
                }
            }
        }
    }
}

/// <summary>LoHa: ΔW = (W1a·W1b) ⊙ (W2a·W2b).</summary>
internal sealed class HadamardDelta(LowRankDelta first, LowRankDelta second) : DeltaSource
{
    // One row of the second product.
    private double[]? _scratch;

    public override bool IsThreadSafe => false;

    public override void Row(long o, Span<double> row)
    {
        first.Row(o, row);
        var other = (_scratch ??= new double[row.Length]).AsSpan(0, row.Length);
        second.Row(o, other);
        for (var j = 0; j < row.Length; j++)
        {
            row[j] *= other[j];
        }
    }
}

/// <summary>LoKr: ΔW = kron(W1 [a, c], W2 [b, d·kh·kw]) laid out as [a·b, c·d, kh, kw].</summary>
internal sealed class KroneckerDelta : DeltaSource
{
    private readonly double[] _w1;
    private readonly double[] _w2;
    private readonly int _b;
    private readonly int _c;
    private readonly int _w2Row;

    /// <param name="w1">[a, c] row-major.</param>
    /// <param name="w2">[b, w2Row] row-major, w2Row = d·kh·kw.</param>
    public KroneckerDelta(double[] w1, int c, double[] w2, int b, int w2Row)
    {
        _w1 = w1;
        _w2 = w2;
        _b = b;
        _c = c;
        _w2Row = w2Row;
    }

    public override void Row(long o, Span<double> row)
    {
        var p = (int)(o / _b);
        var q = (int)(o % _b);
        var w2 = _w2.AsSpan(q * _w2Row, _w2Row);
        for (var s = 0; s < _c; s++)
        {
            var f = _w1[p * _c + s];
            var target = row.Slice(s * _w2Row, _w2Row);
            for (var t = 0; t < _w2Row; t++)
            {
                target[t] = f * w2[t];
            }
        }
    }
}

/// <summary>A full difference tensor (LyCORIS "full" / <c>diff</c>).</summary>
internal sealed class FullDelta(float[] diff) : DeltaSource
{
    public override void Row(long o, Span<double> row)
    {
        var rest = (int)Rest;
        var source = diff.AsSpan((int)(o * rest), rest);
        for (var j = 0; j < rest; j++)
        {
            row[j] = source[j];
        }
    }
}
