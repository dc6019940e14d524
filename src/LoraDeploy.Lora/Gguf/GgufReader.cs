using System.Buffers.Binary;
using System.Globalization;
using System.Text;

namespace LoraDeploy.Lora.Gguf;

/// <summary>
/// One metadata value of a GGUF file. Scalars are boxed as the CLR type of their GGUF type (u32 → <see cref="uint"/>,
/// f32 → <see cref="float"/>, bool → <see cref="bool"/>, string → <see cref="string"/>…); arrays are a
/// <see cref="GgufArray"/>.
/// </summary>
public sealed record GgufValue(GgufValueType Type, object Value)
{
    /// <summary>The value as a 64-bit integer if it is an integer type that fits.</summary>
    public bool TryGetInt64(out long value)
    {
        (var ok, value) = Value switch
        {
            byte v => (true, (long)v),
            sbyte v => (true, v),
            ushort v => (true, v),
            short v => (true, v),
            uint v => (true, v),
            int v => (true, v),
            ulong v when v <= long.MaxValue => (true, (long)v),
            long v => (true, v),
            _ => (false, 0L),
        };
        return ok;
    }

    public override string ToString() => Value switch
    {
        GgufArray array => array.ToString(),
        string s => s,
        IFormattable f => f.ToString(null, CultureInfo.InvariantCulture),
        _ => Value.ToString() ?? "",
    };
}

/// <summary>
/// A metadata array. <see cref="Items"/> holds the elements (a typed CLR array, e.g. <c>uint[]</c> or
/// <c>string[]</c>) when the array is at most the reader's keep limit, and is null for larger ones (tokenizer vocabularies
/// and merges): those are validated and skipped, which keeps describing a base model small.
/// </summary>
public sealed record GgufArray(GgufValueType ElementType, long Count, Array? Items)
{
    public override string ToString() => $"array of {Count} {ElementType}";
}

/// <summary>A tensor's entry in the GGUF header (its data is not read).</summary>
/// <param name="Ne">ggml dimensions, fastest-varying first (the torch shape reversed).</param>
/// <param name="Type">ggml type number (<c>ggml_type</c>).</param>
/// <param name="Offset">Offset of the data relative to the data section.</param>
/// <param name="ByteLength">Size of the data in bytes.</param>
public sealed record GgufTensorInfo(string Name, uint Type, long[] Ne, long Offset, long ByteLength)
{
    public string TypeName => GgufReader.TypeName(Type);
}

/// <summary>The header of a GGUF file: version, metadata, tensor infos and where the data section starts.</summary>
public sealed class GgufFile
{
    internal GgufFile(uint version, IReadOnlyDictionary<string, GgufValue> metadata, IReadOnlyList<GgufTensorInfo> tensors,
        int alignment, long dataOffset, long fileLength)
    {
        Version = version;
        Metadata = metadata;
        Tensors = tensors;
        Alignment = alignment;
        DataOffset = dataOffset;
        FileLength = fileLength;
        TensorsByName = tensors.ToDictionary(t => t.Name, StringComparer.Ordinal);
    }

    public uint Version { get; }
    public IReadOnlyDictionary<string, GgufValue> Metadata { get; }
    /// <summary>Tensor infos in file order.</summary>
    public IReadOnlyList<GgufTensorInfo> Tensors { get; }
    public IReadOnlyDictionary<string, GgufTensorInfo> TensorsByName { get; }
    public int Alignment { get; }
    /// <summary>Absolute file offset of the data section.</summary>
    public long DataOffset { get; }
    public long FileLength { get; }

    /// <summary><c>general.architecture</c>, or null when absent or not a string.</summary>
    public string? Architecture => GetString("general.architecture");

    public string? GetString(string key) => Metadata.TryGetValue(key, out var v) && v.Value is string s ? s : null;

    /// <summary>An integer value of any GGUF integer type, or null when absent, not an integer, or out of range.</summary>
    public long? GetInt64(string key) => Metadata.TryGetValue(key, out var v) && v.TryGetInt64(out var n) ? n : null;

    public float? GetFloat32(string key) => Metadata.TryGetValue(key, out var v) && v.Value is float f ? f : null;
}

/// <summary>
/// Reads a GGUF file's header — metadata and tensor infos, never the tensor data — applying the checks of ggml's own
/// reader (<c>gguf_init_from_file_impl</c>: version 2 or 3, unique keys and names, names under 64 bytes, at most 4
/// dimensions, known types with whole blocks per row, offsets that are exactly the running aligned sum, data inside
/// the file) plus bounds of its own, so that a hostile file (huge counts or lengths, nested arrays, truncation) fails
/// with a <see cref="GgufFormatException"/> after reading a bounded number of bytes and allocating in proportion to
/// what the file really holds.
/// </summary>
public static class GgufReader
{
    /// <summary>Largest metadata array whose elements are kept (bigger ones are validated and skipped).</summary>
    public const int DefaultMaxArrayElementsKept = 65_536;
    /// <summary>Largest accepted string (a chat template is tens of KB; nothing legitimate comes near this).</summary>
    public const int MaxStringBytes = 64 * 1024 * 1024;
    /// <summary>ggml's <c>GGML_MAX_NAME</c> is 64 including the terminator.</summary>
    public const int MaxTensorNameBytes = 63;
    public const int MaxDimensions = 4;

    private const uint Magic = 0x46554747; // "GGUF" little-endian

    /// <summary>Reads the header of the GGUF file at <paramref name="path"/>.</summary>
    /// <exception cref="GgufFormatException">The file is not a well-formed GGUF file.</exception>
    public static GgufFile ReadFile(string path, int maxArrayElementsKept = DefaultMaxArrayElementsKept)
    {
        using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1 << 16);
        return Read(file, maxArrayElementsKept);
    }

    /// <summary>Reads the header from a readable, seekable stream holding the whole file from position 0.</summary>
    /// <exception cref="GgufFormatException">The bytes are not a well-formed GGUF file.</exception>
    public static GgufFile Read(Stream stream, int maxArrayElementsKept = DefaultMaxArrayElementsKept)
    {
        ArgumentNullException.ThrowIfNull(stream);
        if (!stream.CanSeek || !stream.CanRead)
        {
            throw new ArgumentException("the stream must be readable and seekable", nameof(stream));
        }
        ArgumentOutOfRangeException.ThrowIfNegative(maxArrayElementsKept);
        stream.Position = 0;
        return new Parser(stream, maxArrayElementsKept).Parse();
    }

    /// <summary>ggml's name for a type number, or "type N" for one this reader does not know.</summary>
    public static string TypeName(uint type) => type < Types.Length && Types[type].Name is { } name ? name : $"type {type}";

    /// <summary>Elements per block and bytes per block of each ggml type (ggml's <c>type_traits</c>); gaps are removed types.</summary>
    private static readonly (string? Name, int BlockSize, int TypeSize)[] Types =
    [
        ("F32", 1, 4), ("F16", 1, 2), ("Q4_0", 32, 18), ("Q4_1", 32, 20), (null, 0, 0), (null, 0, 0),
        ("Q5_0", 32, 22), ("Q5_1", 32, 24), ("Q8_0", 32, 34), ("Q8_1", 32, 36), ("Q2_K", 256, 84), ("Q3_K", 256, 110),
        ("Q4_K", 256, 144), ("Q5_K", 256, 176), ("Q6_K", 256, 210), ("Q8_K", 256, 292), ("IQ2_XXS", 256, 66),
        ("IQ2_XS", 256, 74), ("IQ3_XXS", 256, 98), ("IQ1_S", 256, 50), ("IQ4_NL", 32, 18), ("IQ3_S", 256, 110),
        ("IQ2_S", 256, 82), ("IQ4_XS", 256, 136), ("I8", 1, 1), ("I16", 1, 2), ("I32", 1, 4), ("I64", 1, 8),
        ("F64", 1, 8), ("IQ1_M", 256, 56), ("BF16", 1, 2), (null, 0, 0), (null, 0, 0), (null, 0, 0),
        ("TQ1_0", 256, 54), ("TQ2_0", 256, 66), (null, 0, 0), (null, 0, 0), (null, 0, 0), ("MXFP4", 32, 17),
        // NVFP4 (40) and Q1_0 (41) are newer than b10221's documented set; their layouts are from ggml master.
        ("NVFP4", 64, 36), ("Q1_0", 128, 18),
    ];

    private sealed class Parser(Stream stream, int maxArrayElementsKept)
    {
        private readonly long _length = stream.Length;
        private readonly byte[] _scratch = new byte[8];
        private readonly byte[] _skip = new byte[4096];
        private long _position;

        public GgufFile Parse()
        {
            if (_length < 24)
            {
                throw new GgufFormatException($"the file is {_length} bytes; a GGUF header is at least 24");
            }
            if (U32("the magic") != Magic)
            {
                throw new GgufFormatException("the file does not start with the GGUF magic bytes 'GGUF'");
            }
            var version = U32("the version");
            if ((version & 0xFFFF) == 0)
            {
                throw new GgufFormatException($"version field 0x{version:X8} looks like a big-endian GGUF, which is not supported");
            }
            if (version == 1)
            {
                throw new GgufFormatException("GGUF version 1 is no longer supported by llama.cpp");
            }
            if (version is < 2 or > GgufWriter.Version)
            {
                throw new GgufFormatException($"GGUF version {version} is not supported (llama.cpp reads versions 2 and 3)");
            }

            var tensorCount = Count("tensor count", minBytesEach: 8 + 1 + 4 + 4 + 8);
            var kvCount = Count("metadata count", minBytesEach: 8 + 1 + 4 + 1);

            var metadata = new Dictionary<string, GgufValue>((int)Math.Min(kvCount, 1024), StringComparer.Ordinal);
            for (long i = 0; i < kvCount; i++)
            {
                var key = String($"metadata key #{i}", MaxStringBytes);
                if (key.Length == 0)
                {
                    throw new GgufFormatException($"metadata key #{i} is empty");
                }
                var type = ValueType($"metadata '{Truncate(key)}'");
                var value = Value($"metadata '{Truncate(key)}'", type);
                if (!metadata.TryAdd(key, value))
                {
                    throw new GgufFormatException($"metadata key '{Truncate(key)}' appears twice");
                }
            }

            var alignment = GgufWriter.DefaultAlignment;
            if (metadata.TryGetValue("general.alignment", out var alignmentValue))
            {
                if (alignmentValue.Value is not uint a || a == 0 || (a & (a - 1)) != 0 || a > 1 << 30)
                {
                    throw new GgufFormatException($"general.alignment must be a u32 power of two, not {alignmentValue.Type} {alignmentValue}");
                }
                alignment = (int)a;
            }

            var tensors = new List<GgufTensorInfo>((int)Math.Min(tensorCount, 4096));
            var names = new HashSet<string>(StringComparer.Ordinal);
            long expectedOffset = 0;
            for (long i = 0; i < tensorCount; i++)
            {
                var tensor = TensorInfo(i, expectedOffset);
                if (!names.Add(tensor.Name))
                {
                    throw new GgufFormatException($"tensor '{tensor.Name}' is listed twice");
                }
                tensors.Add(tensor);
                expectedOffset = checked(expectedOffset + Align(tensor.ByteLength, alignment));
            }

            var dataOffset = tensorCount > 0 ? Align(_position, alignment) : _position;
            foreach (var tensor in tensors)
            {
                var end = dataOffset + tensor.Offset + tensor.ByteLength;
                if (end > _length)
                {
                    throw new GgufFormatException(
                        $"tensor '{tensor.Name}' ends at byte {end} but the file has {_length} bytes (truncated)");
                }
            }
            return new GgufFile(version, metadata, tensors, alignment, dataOffset, _length);
        }

        private GgufTensorInfo TensorInfo(long index, long expectedOffset)
        {
            var name = String($"tensor #{index}'s name", MaxStringBytes);
            if (Encoding.UTF8.GetByteCount(name) > MaxTensorNameBytes)
            {
                throw new GgufFormatException($"tensor name '{Truncate(name)}' is longer than ggml's {MaxTensorNameBytes} bytes");
            }
            var what = $"tensor '{name}'";
            var dims = U32(what + "'s dimension count");
            if (dims > MaxDimensions)
            {
                throw new GgufFormatException($"{what} has {dims} dimensions; ggml allows at most {MaxDimensions}");
            }
            var ne = new long[dims];
            long elements = 1;
            for (var d = 0; d < dims; d++)
            {
                var n = U64(what + "'s dimensions");
                if (n > long.MaxValue)
                {
                    throw new GgufFormatException($"{what} has dimension {n}, which is negative as ggml's int64");
                }
                ne[d] = (long)n;
                if (ne[d] != 0 && elements > long.MaxValue / ne[d])
                {
                    throw new GgufFormatException($"{what} has dimensions [{string.Join(", ", ne[..(d + 1)])}] whose element count overflows");
                }
                elements *= ne[d];
            }
            var type = U32(what + "'s type");
            if (type >= Types.Length || Types[type].Name is null)
            {
                throw new GgufFormatException($"{what} has ggml type {type}, which is not a type llama.cpp knows");
            }
            var (typeName, blockSize, typeSize) = Types[type];
            var rowElements = dims > 0 ? ne[0] : 1;
            if (rowElements % blockSize != 0)
            {
                throw new GgufFormatException($"{what} is {typeName} with rows of {rowElements} elements, not a multiple of its block size {blockSize}");
            }
            long byteLength;
            try
            {
                byteLength = checked(elements / blockSize * typeSize);
            }
            catch (OverflowException)
            {
                throw new GgufFormatException($"{what}'s size in bytes overflows");
            }
            if (byteLength > _length)
            {
                throw new GgufFormatException($"{what} needs {byteLength} bytes of data but the whole file is {_length} bytes");
            }
            var offset = U64(what + "'s offset");
            if (offset != (ulong)expectedOffset)
            {
                throw new GgufFormatException($"{what} has offset {offset}, expected {expectedOffset} (tensors must be contiguous and aligned, in order)");
            }
            return new GgufTensorInfo(name, type, ne, expectedOffset, byteLength);
        }

        private GgufValueType ValueType(string what)
        {
            var type = U32(what + "'s type");
            if (type > (uint)GgufValueType.Float64)
            {
                throw new GgufFormatException($"{what} has value type {type}, which GGUF does not define");
            }
            return (GgufValueType)type;
        }

        private GgufValue Value(string what, GgufValueType type)
        {
            if (type != GgufValueType.Array)
            {
                return new GgufValue(type, Scalar(what, type));
            }
            var elementType = ValueType(what + "'s array element");
            if (elementType == GgufValueType.Array)
            {
                throw new GgufFormatException($"{what} is an array of arrays, which llama.cpp does not read");
            }
            var count = Count(what + "'s array length", elementType == GgufValueType.String ? 8 : ScalarSize(elementType));
            if (count > maxArrayElementsKept)
            {
                Skip(what, elementType, count);
                return new GgufValue(type, new GgufArray(elementType, count, null));
            }
            var items = Array.CreateInstance(ClrType(elementType), (int)count);
            for (var i = 0; i < count; i++)
            {
                items.SetValue(Scalar(what, elementType), i);
            }
            return new GgufValue(type, new GgufArray(elementType, count, items));
        }

        private void Skip(string what, GgufValueType elementType, long count)
        {
            if (elementType != GgufValueType.String)
            {
                Advance(what, count * ScalarSize(elementType));
                return;
            }
            for (long i = 0; i < count; i++)
            {
                var length = U64(what);
                if (length > MaxStringBytes)
                {
                    throw new GgufFormatException($"{what} holds a string of {length} bytes; the limit is {MaxStringBytes}");
                }
                Advance(what, (long)length);
            }
        }

        private object Scalar(string what, GgufValueType type)
        {
            switch (type)
            {
                case GgufValueType.UInt8: return Bytes(what, 1)[0];
                case GgufValueType.Int8: return (sbyte)Bytes(what, 1)[0];
                case GgufValueType.UInt16: return BinaryPrimitives.ReadUInt16LittleEndian(Bytes(what, 2));
                case GgufValueType.Int16: return BinaryPrimitives.ReadInt16LittleEndian(Bytes(what, 2));
                case GgufValueType.UInt32: return U32(what);
                case GgufValueType.Int32: return BinaryPrimitives.ReadInt32LittleEndian(Bytes(what, 4));
                case GgufValueType.Float32: return BinaryPrimitives.ReadSingleLittleEndian(Bytes(what, 4));
                // ggml reads a bool as one byte and does not check it is 0 or 1; neither do we.
                case GgufValueType.Bool: return Bytes(what, 1)[0] != 0;
                case GgufValueType.String: return String(what, MaxStringBytes);
                case GgufValueType.UInt64: return U64(what);
                case GgufValueType.Int64: return BinaryPrimitives.ReadInt64LittleEndian(Bytes(what, 8));
                case GgufValueType.Float64: return BinaryPrimitives.ReadDoubleLittleEndian(Bytes(what, 8));
                default: throw new GgufFormatException($"{what} has value type {type}, which is not a scalar");
            }
        }

        private static int ScalarSize(GgufValueType type) => type switch
        {
            GgufValueType.UInt8 or GgufValueType.Int8 or GgufValueType.Bool => 1,
            GgufValueType.UInt16 or GgufValueType.Int16 => 2,
            GgufValueType.UInt32 or GgufValueType.Int32 or GgufValueType.Float32 => 4,
            _ => 8,
        };

        private static Type ClrType(GgufValueType type) => type switch
        {
            GgufValueType.UInt8 => typeof(byte),
            GgufValueType.Int8 => typeof(sbyte),
            GgufValueType.UInt16 => typeof(ushort),
            GgufValueType.Int16 => typeof(short),
            GgufValueType.UInt32 => typeof(uint),
            GgufValueType.Int32 => typeof(int),
            GgufValueType.Float32 => typeof(float),
            GgufValueType.Bool => typeof(bool),
            GgufValueType.String => typeof(string),
            GgufValueType.UInt64 => typeof(ulong),
            GgufValueType.Int64 => typeof(long),
            _ => typeof(double),
        };

        /// <summary>A u64 count of items of at least <paramref name="minBytesEach"/> bytes that must fit in the rest of the file.</summary>
        private long Count(string what, int minBytesEach)
        {
            var count = U64(what);
            var remaining = _length - _position;
            if (count > (ulong)(remaining / minBytesEach))
            {
                throw new GgufFormatException(
                    $"{what} is {count}, but the {remaining} bytes left in the file cannot hold that many");
            }
            return (long)count;
        }

        private string String(string what, int maxBytes)
        {
            var length = U64(what + "'s length");
            if (length > (ulong)maxBytes)
            {
                throw new GgufFormatException($"{what} is a string of {length} bytes; the limit is {maxBytes}");
            }
            var bytes = new byte[(int)length];
            Fill(what, bytes);
            try
            {
                return new UTF8Encoding(false, throwOnInvalidBytes: true).GetString(bytes);
            }
            catch (DecoderFallbackException)
            {
                throw new GgufFormatException($"{what} is not valid UTF-8");
            }
        }

        private uint U32(string what) => BinaryPrimitives.ReadUInt32LittleEndian(Bytes(what, 4));
        private ulong U64(string what) => BinaryPrimitives.ReadUInt64LittleEndian(Bytes(what, 8));

        private ReadOnlySpan<byte> Bytes(string what, int count)
        {
            var span = _scratch.AsSpan(0, count);
            Fill(what, span);
            return span;
        }

        private void Fill(string what, Span<byte> destination)
        {
            if (destination.Length > _length - _position)
            {
                throw Truncated(what);
            }
            var read = stream.ReadAtLeast(destination, destination.Length, throwOnEndOfStream: false);
            if (read < destination.Length)
            {
                throw Truncated(what);
            }
            _position += destination.Length;
        }

        private void Advance(string what, long count)
        {
            if (count > _length - _position)
            {
                throw Truncated(what);
            }
            if (count <= _skip.Length)
            {
                // Small skips (a vocabulary is hundreds of thousands of short strings) read through the buffer
                // instead of seeking for each one.
                Fill(what, _skip.AsSpan(0, (int)count));
                return;
            }
            _position += count;
            stream.Position = _position;
        }

        private GgufFormatException Truncated(string what) =>
            new($"the file ends at byte {_length} while reading {what} (truncated)");
    }

    private static long Align(long n, int alignment) => (n + alignment - 1) / alignment * alignment;

    private static string Truncate(string value) => value.Length <= 120 ? value : value[..120] + "…";
}
