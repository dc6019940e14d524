using System.Buffers.Binary;
using System.Text;

namespace LoraDeploy.Lora.Gguf;

/// <summary>ggml tensor types this project writes (values are ggml's <c>ggml_type</c>).</summary>
public enum GgmlType : uint
{
    F32 = 0,
    F16 = 1,
    BF16 = 30,
}

/// <summary>GGUF metadata value types (values are GGUF's <c>gguf_type</c>).</summary>
public enum GgufValueType : uint
{
    UInt8 = 0,
    Int8 = 1,
    UInt16 = 2,
    Int16 = 3,
    UInt32 = 4,
    Int32 = 5,
    Float32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    UInt64 = 10,
    Int64 = 11,
    Float64 = 12,
}

/// <summary>
/// Writes a GGUF v3 file: metadata, tensor infos, then each tensor's bytes padded to the alignment, in declaration
/// order (llama.cpp requires offsets to be exactly that running sum). Tensor bytes are streamed by a callback so a
/// large adapter never has to sit in memory whole. llama.cpp is strict about key types: integer hparams are u32 and
/// epsilons/rope bases f32, which is why every value is added with its type explicit.
/// </summary>
public sealed class GgufWriter
{
    public const uint Version = 3;
    public const int DefaultAlignment = 32;
    /// <summary>ggml's GGML_MAX_NAME (64) including the terminator.</summary>
    public const int MaxTensorNameBytes = 63;

    private readonly List<(string Key, GgufValueType Type, object Value)> _metadata = [];
    private readonly List<Tensor> _tensors = [];
    private readonly HashSet<string> _keys = new(StringComparer.Ordinal);
    private readonly HashSet<string> _names = new(StringComparer.Ordinal);

    private sealed record Tensor(string Name, GgmlType Type, long[] Ne, long ByteCount, Action<Stream> WriteData);

    public int Alignment { get; init; } = DefaultAlignment;

    public GgufWriter Add(string key, string value) => AddValue(key, GgufValueType.String, value);
    public GgufWriter Add(string key, uint value) => AddValue(key, GgufValueType.UInt32, value);
    public GgufWriter Add(string key, int value) => AddValue(key, GgufValueType.Int32, value);
    public GgufWriter Add(string key, float value) => AddValue(key, GgufValueType.Float32, value);
    public GgufWriter Add(string key, bool value) => AddValue(key, GgufValueType.Bool, value);
    public GgufWriter Add(string key, ulong value) => AddValue(key, GgufValueType.UInt64, value);
    public GgufWriter Add(string key, IReadOnlyList<string> values) => AddValue(key, GgufValueType.Array, (GgufValueType.String, (object)values));
    public GgufWriter Add(string key, IReadOnlyList<float> values) => AddValue(key, GgufValueType.Array, (GgufValueType.Float32, (object)values));
    public GgufWriter Add(string key, IReadOnlyList<int> values) => AddValue(key, GgufValueType.Array, (GgufValueType.Int32, (object)values));
    public GgufWriter Add(string key, IReadOnlyList<uint> values) => AddValue(key, GgufValueType.Array, (GgufValueType.UInt32, (object)values));

    /// <summary>
    /// Adds a value as <see cref="GgufReader"/> returns it, of any GGUF type (arrays included), e.g. to carry a base
    /// model's metadata over unchanged. An array must have its elements (read with a large enough keep limit).
    /// </summary>
    public GgufWriter Add(string key, GgufValue value)
    {
        ArgumentNullException.ThrowIfNull(value);
        if (value.Value is GgufArray { Items: null } array)
        {
            throw new ArgumentException($"metadata '{key}' is an {array} whose elements were not kept when it was read", nameof(value));
        }
        return AddValue(key, value.Type, value.Value);
    }

    /// <summary>Declares a tensor whose bytes <paramref name="writeData"/> writes when the file is written.</summary>
    /// <param name="ne">ggml dimensions, fastest-varying first (the torch shape reversed).</param>
    public GgufWriter AddTensor(string name, GgmlType type, ReadOnlySpan<long> ne, Action<Stream> writeData)
    {
        var elements = Declare(name, ne);
        _tensors.Add(new Tensor(name, type, ne.ToArray(), checked(elements * ElementSize(type)), writeData));
        return this;
    }

    /// <summary>
    /// Declares a tensor of any ggml type number (quantized ones included, e.g. blocks copied from another GGUF) whose
    /// size in bytes the caller knows; the callback must write exactly that many.
    /// </summary>
    public GgufWriter AddTensor(string name, uint ggmlType, ReadOnlySpan<long> ne, long byteCount, Action<Stream> writeData)
    {
        Declare(name, ne);
        ArgumentOutOfRangeException.ThrowIfNegative(byteCount);
        _tensors.Add(new Tensor(name, (GgmlType)ggmlType, ne.ToArray(), byteCount, writeData));
        return this;
    }

    /// <summary>Checks a new tensor's name and dimensions and returns its element count.</summary>
    private long Declare(string name, ReadOnlySpan<long> ne)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        if (Encoding.UTF8.GetByteCount(name) > MaxTensorNameBytes)
        {
            throw new ArgumentException($"tensor name '{name}' is longer than ggml's {MaxTensorNameBytes} bytes", nameof(name));
        }
        if (ne.Length is < 1 or > 4)
        {
            throw new ArgumentException($"tensor '{name}' has {ne.Length} dimensions; ggml allows 1 to 4", nameof(ne));
        }
        if (!_names.Add(name))
        {
            throw new ArgumentException($"tensor '{name}' is declared twice", nameof(name));
        }
        long elements = 1;
        foreach (var d in ne)
        {
            ArgumentOutOfRangeException.ThrowIfNegative(d, nameof(ne));
            elements = checked(elements * d);
        }
        return elements;
    }

    public GgufWriter AddTensor(string name, GgmlType type, ReadOnlySpan<long> ne, ReadOnlyMemory<byte> data) =>
        AddTensor(name, type, ne, stream => stream.Write(data.Span));

    public GgufWriter AddTensor(string name, ReadOnlySpan<long> ne, float[] values)
    {
        var bytes = new byte[values.Length * sizeof(float)];
        for (var i = 0; i < values.Length; i++)
        {
            BinaryPrimitives.WriteSingleLittleEndian(bytes.AsSpan(i * sizeof(float)), values[i]);
        }
        return AddTensor(name, GgmlType.F32, ne, bytes);
    }

    public static int ElementSize(GgmlType type) => type switch
    {
        GgmlType.F32 => 4,
        GgmlType.F16 or GgmlType.BF16 => 2,
        _ => throw new ArgumentOutOfRangeException(nameof(type), type, "unsupported ggml type"),
    };

    public void WriteTo(string path)
    {
        using var file = new FileStream(path, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20);
        WriteTo(file);
        file.Flush(flushToDisk: true);
    }

    public void WriteTo(Stream output)
    {
        if (Alignment <= 0 || (Alignment & (Alignment - 1)) != 0)
        {
            throw new InvalidOperationException($"alignment {Alignment} is not a power of two");
        }
        var metadata = new List<(string Key, GgufValueType Type, object Value)>(_metadata);
        if (Alignment != DefaultAlignment && !_keys.Contains("general.alignment"))
        {
            metadata.Add(("general.alignment", GgufValueType.UInt32, (uint)Alignment));
        }

        var header = new HeaderWriter();
        header.U32(0x46554747); // "GGUF" little-endian
        header.U32(Version);
        header.U64((ulong)_tensors.Count);
        header.U64((ulong)metadata.Count);
        foreach (var (key, type, value) in metadata)
        {
            header.String(key);
            header.U32((uint)type);
            header.Value(type, value);
        }
        long offset = 0;
        foreach (var tensor in _tensors)
        {
            header.String(tensor.Name);
            header.U32((uint)tensor.Ne.Length);
            foreach (var d in tensor.Ne)
            {
                header.U64((ulong)d);
            }
            header.U32((uint)tensor.Type);
            header.U64((ulong)offset);
            offset += Align(tensor.ByteCount);
        }
        var headerBytes = header.ToArray();
        output.Write(headerBytes);
        if (_tensors.Count > 0)
        {
            WritePadding(output, headerBytes.Length);
        }

        foreach (var tensor in _tensors)
        {
            var counting = new CountingStream(output);
            tensor.WriteData(counting);
            if (counting.Written != tensor.ByteCount)
            {
                throw new InvalidOperationException($"tensor '{tensor.Name}' wrote {counting.Written} bytes; its shape and type need {tensor.ByteCount}");
            }
            WritePadding(output, tensor.ByteCount);
        }
    }

    private GgufWriter AddValue(string key, GgufValueType type, object value)
    {
        ArgumentException.ThrowIfNullOrEmpty(key);
        if (!_keys.Add(key))
        {
            throw new ArgumentException($"metadata key '{key}' is set twice", nameof(key));
        }
        _metadata.Add((key, type, value));
        return this;
    }

    private long Align(long n) => (n + Alignment - 1) / Alignment * Alignment;

    private void WritePadding(Stream output, long written)
    {
        var pad = (int)(Align(written) - written);
        if (pad > 0)
        {
            output.Write(new byte[pad]);
        }
    }

    private sealed class HeaderWriter
    {
        private readonly MemoryStream _buffer = new();
        private readonly byte[] _scratch = new byte[8];

        public byte[] ToArray() => _buffer.ToArray();

        public void U16(ushort v) { BinaryPrimitives.WriteUInt16LittleEndian(_scratch, v); _buffer.Write(_scratch, 0, 2); }
        public void U32(uint v) { BinaryPrimitives.WriteUInt32LittleEndian(_scratch, v); _buffer.Write(_scratch, 0, 4); }
        public void U64(ulong v) { BinaryPrimitives.WriteUInt64LittleEndian(_scratch, v); _buffer.Write(_scratch, 0, 8); }

        public void String(string s)
        {
            var bytes = Encoding.UTF8.GetBytes(s);
            U64((ulong)bytes.Length);
            _buffer.Write(bytes);
        }

        public void Value(GgufValueType type, object value)
        {
            switch (type)
            {
                case GgufValueType.String: String((string)value); break;
                case GgufValueType.UInt8: _buffer.WriteByte((byte)value); break;
                case GgufValueType.Int8: _buffer.WriteByte(unchecked((byte)(sbyte)value)); break;
                case GgufValueType.UInt16: U16((ushort)value); break;
                case GgufValueType.Int16: U16(unchecked((ushort)(short)value)); break;
                case GgufValueType.UInt32: U32((uint)value); break;
                case GgufValueType.Int32: U32(unchecked((uint)(int)value)); break;
                case GgufValueType.UInt64: U64((ulong)value); break;
                case GgufValueType.Int64: U64(unchecked((ulong)(long)value)); break;
                case GgufValueType.Float32: U32(BitConverter.SingleToUInt32Bits((float)value)); break;
                case GgufValueType.Float64: U64(BitConverter.DoubleToUInt64Bits((double)value)); break;
                case GgufValueType.Bool: _buffer.WriteByte((bool)value ? (byte)1 : (byte)0); break;
                case GgufValueType.Array when value is GgufArray array:
                    // As read by GgufReader: a typed CLR array of the element type.
                    U32((uint)array.ElementType);
                    U64((ulong)array.Count);
                    foreach (var item in array.Items!)
                    {
                        Value(array.ElementType, item!);
                    }
                    break;
                case GgufValueType.Array:
                    var (elementType, items) = ((GgufValueType, object))value;
                    U32((uint)elementType);
                    switch (items)
                    {
                        case IReadOnlyList<string> strings: U64((ulong)strings.Count); foreach (var s in strings) { String(s); } break;
                        case IReadOnlyList<float> floats: U64((ulong)floats.Count); foreach (var f in floats) { Value(GgufValueType.Float32, f); } break;
                        case IReadOnlyList<int> ints: U64((ulong)ints.Count); foreach (var i in ints) { Value(GgufValueType.Int32, i); } break;
                        case IReadOnlyList<uint> uints: U64((ulong)uints.Count); foreach (var u in uints) { U32(u); } break;
                        default: throw new InvalidOperationException("unsupported array element type");
                    }
                    break;
                default: throw new InvalidOperationException($"unsupported metadata type {type}");
            }
        }
    }

    /// <summary>Passes writes through and counts them, so a tensor callback that writes the wrong amount is caught.</summary>
    private sealed class CountingStream(Stream inner) : Stream
    {
        public long Written { get; private set; }
        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => Written; set => throw new NotSupportedException(); }
        public override void Flush() => inner.Flush();
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));
        public override void Write(ReadOnlySpan<byte> buffer)
        {
            inner.Write(buffer);
            Written += buffer.Length;
        }
    }
}
