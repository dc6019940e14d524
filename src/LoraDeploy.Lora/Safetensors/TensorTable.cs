using System.Buffers;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text;

namespace LoraDeploy.Lora.Safetensors;

/// <summary>One tensor as the reader keeps it: a row of plain values, so that a table of them is one array.</summary>
internal struct TensorRecord
{
    public long DataStart;
    public long DataEnd;
    /// <summary>Where the name's unescaped UTF-8 starts: in the header JSON, or in the escaped-name buffer if <see cref="NameEscaped"/>.</summary>
    public int NameStart;
    public int NameLength;
    /// <summary>Where the dimensions start in the table's shared dimension array.</summary>
    public int ShapeStart;
    public int Rank;
    /// <summary>Index into <see cref="SafetensorsDtype.Names"/>.</summary>
    public byte Dtype;
    public bool NameEscaped;

    public readonly long ByteLength => DataEnd - DataStart;
}

/// <summary>
/// The reader's tensor table, kept the way <c>JsonDocument</c> keeps its data: rows in one array, all dimensions in
/// another, names as slices of the header bytes (only escaped names are copied, unescaped). For headers up to
/// <see cref="SafetensorsReader"/>'s pooling limit the arrays come from the shared pools and go back on
/// <see cref="Release"/>; a table never released is simply collected.
/// </summary>
internal sealed class TensorTable
{
    private readonly bool _pooled;
    private readonly int _jsonLength;
    private byte[] _json;
    private TensorRecord[] _records;
    private long[] _dims;
    private int _dimCount;
    private byte[]? _escaped;
    private int _escapedUsed;

    /// <param name="json">The header bytes (the first <paramref name="jsonLength"/>); the table owns the array from here on.</param>
    /// <param name="pooled">Whether <paramref name="json"/> came from the pool, and whether the table's own arrays should.</param>
    public TensorTable(byte[] json, int jsonLength, bool pooled)
    {
        _json = json;
        _jsonLength = jsonLength;
        _pooled = pooled;
        // A tensor entry takes at least ~50 bytes of JSON and typically ~100-150; a shape one or two dimensions.
        _records = HeaderPool.Rent<TensorRecord>(Math.Max(4, jsonLength / 128), pooled);
        _dims = HeaderPool.Rent<long>(Math.Max(16, jsonLength / 64), pooled);
    }

    public int Count { get; private set; }

    /// <summary>Whether the table's arrays come from the shared pools (headers up to the reader's pooling limit).</summary>
    public bool Pooled => _pooled;

    public ReadOnlySpan<byte> Json => new(_json, 0, _jsonLength);

    /// <summary>The header bytes, for the reader to fill from the file before parsing.</summary>
    public Span<byte> JsonToFill => new(_json, 0, _jsonLength);

    public ReadOnlySpan<TensorRecord> Records => new(_records, 0, Count);

    public ref readonly TensorRecord this[int index] => ref _records[index];

    public ReadOnlySpan<byte> NameUtf8(int index)
    {
        ref readonly var r = ref _records[index];
        return new(r.NameEscaped ? _escaped : _json, r.NameStart, r.NameLength);
    }

    public string Name(int index) => Encoding.UTF8.GetString(NameUtf8(index));

    public ReadOnlySpan<long> Shape(int index)
    {
        ref readonly var r = ref _records[index];
        return new(_dims, r.ShapeStart, r.Rank);
    }

    public string Dtype(int index) => SafetensorsDtype.Names[_records[index].Dtype];

    public long ElementCount(int index) => SafetensorsTensor.CountElements(Shape(index));

    /// <summary>Adds a tensor whose name is the JSON bytes at <paramref name="start"/> (no escapes); returns its index.</summary>
    public int AddName(int start, int length) => AddRecord(start, length, escaped: false);

    /// <summary>Adds a tensor whose name had escapes, as its unescaped UTF-8; returns its index.</summary>
    public int AddEscapedName(ReadOnlySpan<byte> name)
    {
        // Escaped names are rare: a plain array, grown as needed.
        if (_escaped is null || _escaped.Length - _escapedUsed < name.Length)
        {
            Array.Resize(ref _escaped, Math.Max(_escapedUsed + name.Length, (_escaped?.Length ?? 64) * 2));
        }
        name.CopyTo(_escaped.AsSpan(_escapedUsed));
        _escapedUsed += name.Length;
        return AddRecord(_escapedUsed - name.Length, name.Length, escaped: true);
    }

    private int AddRecord(int start, int length, bool escaped)
    {
        if (Count == _records.Length)
        {
            Grow(ref _records, Count);
        }
        _records[Count] = new TensorRecord { NameStart = start, NameLength = length, NameEscaped = escaped };
        return Count++;
    }

    /// <summary>Sets the shape of the tensor at <paramref name="index"/>, copied into the shared dimension array.</summary>
    public void SetShape(int index, ReadOnlySpan<long> shape)
    {
        if (_dims.Length - _dimCount < shape.Length)
        {
            Grow(ref _dims, _dimCount, _dimCount + shape.Length);
        }
        shape.CopyTo(_dims.AsSpan(_dimCount));
        ref var r = ref _records[index];
        (r.ShapeStart, r.Rank) = (_dimCount, shape.Length);
        _dimCount += shape.Length;
    }

    /// <summary>Sets the dtype and data offsets of the tensor at <paramref name="index"/>.</summary>
    public void Set(int index, byte dtype, long dataStart, long dataEnd)
    {
        ref var r = ref _records[index];
        (r.Dtype, r.DataStart, r.DataEnd) = (dtype, dataStart, dataEnd);
    }

    /// <summary>Gives the pooled arrays back. The table must not be used afterwards (the header sees to that).</summary>
    public void Release()
    {
        HeaderPool.Return(_records, _pooled);
        HeaderPool.Return(_dims, _pooled);
        HeaderPool.Return(_json, _pooled);
        // Whatever still refers to the table reads empty arrays rather than another header's rows.
        (_records, _dims, _json, _escaped, Count) = ([], [], [], null, 0);
    }

    private void Grow<T>(ref T[] array, int used, int needed = 0)
    {
        var bigger = HeaderPool.Rent<T>(Math.Max(needed, array.Length * 2), _pooled);
        array.AsSpan(0, used).CopyTo(bigger);
        HeaderPool.Return(array, _pooled);
        array = bigger;
    }

    /// <summary>Compares tensors by name bytes; hashes with the BCL's per-process randomised Marvin hash.</summary>
    public sealed class NameComparer(TensorTable table) : IEqualityComparer<int>
    {
        public bool Equals(int x, int y) => table.NameUtf8(x).SequenceEqual(table.NameUtf8(y));

        // Names come from untrusted files: a keyed hash keeps crafted collisions from making the set quadratic.
        // Marvin reads UTF-16 units, so the bytes go in pairs and an odd last byte is mixed in separately.
        public int GetHashCode(int index)
        {
            var name = table.NameUtf8(index);
            var hash = string.GetHashCode(MemoryMarshal.Cast<byte, char>(name));
            return (name.Length & 1) == 0 ? hash : HashCode.Combine(hash, name[^1]);
        }
    }
}

/// <summary>The shared array pools, as the reader uses them (or plain arrays for headers too large to pool).</summary>
internal static class HeaderPool
{
    /// <summary>
    /// Bytes of arrays this thread has taken for headers, from the pool or not. An array that comes back from the pool
    /// is no allocation to the GC, so the fuzz test adds this to what the GC counts to bound the reader's memory.
    /// </summary>
    [ThreadStatic]
    internal static long RentedBytes;

    public static T[] Rent<T>(int length, bool pooled)
    {
        var array = pooled ? ArrayPool<T>.Shared.Rent(length) : new T[length];
        RentedBytes += (long)array.Length * Unsafe.SizeOf<T>();
        return array;
    }

    public static void Return<T>(T[] array, bool pooled)
    {
        if (pooled && array.Length > 0)
        {
            // Plain values only (records, dimensions, bytes, the prober's modules and names): nothing to clear for the GC's sake.
            ArrayPool<T>.Shared.Return(array);
        }
    }
}
