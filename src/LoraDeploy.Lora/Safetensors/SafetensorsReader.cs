using System.Diagnostics;
using System.Buffers.Binary;
using System.Globalization;
using System.Runtime.CompilerServices;
using System.Text;
using System.Text.Json;
using System.Text.Unicode;

namespace LoraDeploy.Lora.Safetensors;

/// <summary>
/// Strict safetensors header reader. Applies every check of the reference Rust crate
/// (<c>SafeTensors::read_metadata</c> + <c>Metadata::validate</c>) and additionally rejects duplicate
/// keys. Reads the header only and allocates in proportion to it, never to the tensor data.
/// </summary>
public static class SafetensorsReader
{
    /// <summary>Largest accepted JSON header, in bytes (the reference crate's <c>MAX_HEADER_SIZE</c>).</summary>
    public const long MaxHeaderLength = 100_000_000;

    private const string MetadataKey = "__metadata__";
    private const int PooledHeaderLimit = 4 * 1024 * 1024;

    // Header JSON is at most 3 levels deep (object -> tensor -> shape); the slack allows unknown
    // extra fields in tensor entries, which the reference crate ignores.
    private const int MaxJsonDepth = 32;

    /// <summary>Reads and validates the header of the file at <paramref name="path"/>.</summary>
    /// <exception cref="SafetensorsFormatException">The file is not a well-formed safetensors file.</exception>
    public static SafetensorsHeader ReadFile(string path)
    {
        using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1);
        return Read(file);
    }

    /// <summary>
    /// Reads and validates the header of a safetensors file from a readable, seekable stream
    /// positioned anywhere; the file is taken to start at position 0 and end at <see cref="Stream.Length"/>.
    /// </summary>
    /// <exception cref="SafetensorsFormatException">The bytes are not a well-formed safetensors file.</exception>
    /// <exception cref="ArgumentException">The stream cannot seek or read.</exception>
    public static SafetensorsHeader Read(Stream stream)
    {
        ArgumentNullException.ThrowIfNull(stream);
        if (!stream.CanSeek || !stream.CanRead)
        {
            throw new ArgumentException("the stream must be readable and seekable", nameof(stream));
        }

        var fileLength = stream.Length;
        stream.Position = 0;
        Span<byte> prefix = stackalloc byte[8];
        if (fileLength < 8 || stream.ReadAtLeast(prefix, 8, throwOnEndOfStream: false) < 8)
        {
            throw new SafetensorsFormatException(
                $"the file is {fileLength} bytes; a safetensors file starts with an 8-byte header length");
        }

        var headerLength = BinaryPrimitives.ReadUInt64LittleEndian(prefix);
        if (headerLength > MaxHeaderLength)
        {
            throw new SafetensorsFormatException(
                $"header length {headerLength} exceeds the limit of {MaxHeaderLength:N0} bytes");
        }
        if ((long)headerLength > fileLength - 8)
        {
            throw new SafetensorsFormatException(
                $"header length {headerLength} runs past the end of the file ({fileLength} bytes)");
        }

        var length = (int)headerLength;
        // Pool the common small headers; a hostile 100 MB header should not stay cached in the pool. The header
        // keeps the bytes (its unescaped names are slices of them) until it is disposed.
        var pooled = length <= PooledHeaderLimit;
        var table = new TensorTable(HeaderPool.Rent<byte>(Math.Max(length, 1), pooled), length, pooled);
        try
        {
            var read = stream.ReadAtLeast(table.JsonToFill, length, throwOnEndOfStream: false);
            if (read < length)
            {
                throw new SafetensorsFormatException(
                    $"the file ended after {read} of {length} header bytes");
            }
            return Parse(table, fileLength);
        }
        catch
        {
            table.Release();
            throw;
        }
    }

    /// <summary>Parses and validates header JSON for a file of <paramref name="fileLength"/> bytes.</summary>
    internal static SafetensorsHeader Parse(TensorTable table, long fileLength)
    {
        var json = table.Json;
        if (!Utf8.IsValid(json))
        {
            throw new SafetensorsFormatException("the header is not valid UTF-8");
        }

        // Made only once names stop ascending (see IsNewName).
        HashSet<int>? names = null;
        IReadOnlyDictionary<string, string>? metadata = null;
        var scratch = new long[8];

        var reader = new Utf8JsonReader(json, new JsonReaderOptions { MaxDepth = MaxJsonDepth });
        try
        {
            if (!reader.Read() || reader.TokenType != JsonTokenType.StartObject)
            {
                throw new SafetensorsFormatException("the header is not a JSON object");
            }
            while (reader.Read() && reader.TokenType == JsonTokenType.PropertyName)
            {
                if (reader.ValueTextEquals(MetadataKeyUtf8))
                {
                    reader.Read();
                    if (metadata is not null)
                    {
                        throw new SafetensorsFormatException($"duplicate key '{MetadataKey}' in the header");
                    }
                    metadata = ReadMetadata(ref reader);
                    continue;
                }
                // GetString (not CopyString) for escaped names so that escapes decoding to invalid UTF-16 fail as they always have.
                // An unescaped name is the bytes between the quotes: the token starts at the opening one.
                var tensor = reader.ValueIsEscaped
                    ? table.AddEscapedName(Encoding.UTF8.GetBytes(reader.GetString()!))
                    : table.AddName((int)reader.TokenStartIndex + 1, reader.ValueSpan.Length);
                Debug.Assert(reader.ValueIsEscaped || table.NameUtf8(tensor).SequenceEqual(reader.ValueSpan));
                reader.Read();
                if (!IsNewName(table, tensor, ref names))
                {
                    throw new SafetensorsFormatException($"duplicate tensor name '{Truncate(table.Name(tensor))}' in the header");
                }
                ReadTensor(ref reader, table, tensor, ref scratch);
            }
            if (reader.Read())
            {
                throw new SafetensorsFormatException("unexpected content after the header object");
            }
        }
        catch (JsonException e)
        {
            throw new SafetensorsFormatException($"the header is not valid JSON: {e.Message}", e);
        }
        catch (InvalidOperationException e)
        {
            // Utf8JsonReader.GetString throws this for escapes that decode to invalid UTF-16.
            throw new SafetensorsFormatException($"the header contains an invalid string: {e.Message}", e);
        }

        var headerLength = json.Length;
        Validate(table, fileLength - 8 - headerLength);
        return new SafetensorsHeader(table, metadata ?? EmptyMetadata, headerLength, fileLength);
    }

    private static ReadOnlySpan<byte> MetadataKeyUtf8 => "__metadata__"u8;

    /// <summary>
    /// Whether tensor <paramref name="tensor"/>'s name differs from every name before it. The safetensors
    /// library writes tensors sorted by dtype, then by name in byte order, so within a dtype group each name is
    /// greater than the one before it and cannot repeat an earlier one: while that holds, no hashing is needed. From
    /// the first name that is not greater (a new dtype group, another writer's order, or a duplicate), every name so
    /// far and every later one goes into a keyed hash set. Either way each name is compared or hashed a bounded
    /// number of times, so the check stays linear whatever the order.
    /// </summary>
    private static bool IsNewName(TensorTable table, int tensor, ref HashSet<int>? names)
    {
        if (names is not null)
        {
            return names.Add(tensor);
        }
        if (tensor == 0 || table.NameUtf8(tensor - 1).SequenceCompareTo(table.NameUtf8(tensor)) < 0)
        {
            return true;
        }
        names = new HashSet<int>(Math.Max(table.Json.Length / 128, tensor * 2), new TensorTable.NameComparer(table));
        for (var earlier = 0; earlier < tensor; earlier++)
        {
            // Distinct: they ascend.
            names.Add(earlier);
        }
        return names.Add(tensor);
    }

    private static readonly IReadOnlyDictionary<string, string> EmptyMetadata =
        new Dictionary<string, string>(StringComparer.Ordinal);

    private static Dictionary<string, string>? ReadMetadata(ref Utf8JsonReader reader)
    {
        if (reader.TokenType == JsonTokenType.Null)
        {
            return null;
        }
        if (reader.TokenType != JsonTokenType.StartObject)
        {
            throw new SafetensorsFormatException($"'{MetadataKey}' must be an object of strings, not {Describe(reader.TokenType)}");
        }
        var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
        while (reader.Read() && reader.TokenType == JsonTokenType.PropertyName)
        {
            var key = reader.GetString()!;
            reader.Read();
            if (reader.TokenType != JsonTokenType.String)
            {
                throw new SafetensorsFormatException(
                    $"'{MetadataKey}' value for '{Truncate(key)}' is {Describe(reader.TokenType)}; metadata values must be strings");
            }
            if (!metadata.TryAdd(key, reader.GetString()!))
            {
                throw new SafetensorsFormatException($"duplicate key '{Truncate(key)}' in '{MetadataKey}'");
            }
        }
        return metadata;
    }

    private static void ReadTensor(ref Utf8JsonReader reader, TensorTable table, int tensor, ref long[] scratch)
    {
        if (reader.TokenType != JsonTokenType.StartObject)
        {
            throw TensorError(table, tensor, "must be a JSON object, not " + Describe(reader.TokenType));
        }

        byte dtype = 0;
        long begin = 0, end = 0;
        bool haveDtype = false, haveShape = false, haveOffsets = false;
        while (reader.Read() && reader.TokenType == JsonTokenType.PropertyName)
        {
            if (reader.ValueTextEquals("dtype"u8))
            {
                if (haveDtype)
                {
                    throw TensorError(table, tensor, "has a duplicate 'dtype' field");
                }
                reader.Read();
                if (reader.TokenType != JsonTokenType.String)
                {
                    throw TensorError(table, tensor, "has a dtype that is " + Describe(reader.TokenType) + ", not a string");
                }
                if (reader.ValueIsEscaped || !SafetensorsDtype.TryGetCode(reader.ValueSpan, out dtype))
                {
                    dtype = KnownDtypeOrThrow(reader.GetString()!, table, tensor);
                }
                haveDtype = true;
            }
            else if (reader.ValueTextEquals("shape"u8))
            {
                if (haveShape)
                {
                    throw TensorError(table, tensor, "has a duplicate 'shape' field");
                }
                reader.Read();
                var dims = ReadIntegers(ref reader, table, tensor, "shape", ref scratch);
                // Stored now: data_offsets reuse the scratch array.
                table.SetShape(tensor, scratch.AsSpan(0, dims));
                haveShape = true;
            }
            else if (reader.ValueTextEquals("data_offsets"u8))
            {
                if (haveOffsets)
                {
                    throw TensorError(table, tensor, "has a duplicate 'data_offsets' field");
                }
                reader.Read();
                var offsets = ReadIntegers(ref reader, table, tensor, "data_offsets", ref scratch);
                if (offsets != 2)
                {
                    throw TensorError(table, tensor, "has " + offsets + " data_offsets; expected [begin, end]");
                }
                (begin, end, haveOffsets) = (scratch[0], scratch[1], true);
            }
            else
            {
                // The reference crate ignores unknown fields in tensor entries.
                reader.Read();
                reader.Skip();
            }
        }

        if (!haveDtype)
        {
            throw TensorError(table, tensor, "has no 'dtype'");
        }
        if (!haveShape)
        {
            throw TensorError(table, tensor, "has no 'shape'");
        }
        if (!haveOffsets)
        {
            throw TensorError(table, tensor, "has no 'data_offsets'");
        }
        table.Set(tensor, dtype, begin, end);
    }

    private static byte KnownDtypeOrThrow(string dtype, TensorTable table, int tensor) =>
        SafetensorsDtype.BitSize(dtype) > 0 && SafetensorsDtype.TryGetCode(dtype, out var code)
            ? code
            : throw TensorError(table, tensor, "has unknown dtype '" + Truncate(dtype) + "'");

    /// <summary>Reads an array of non-negative integers into <paramref name="values"/> (grown as needed); returns the count.</summary>
    private static int ReadIntegers(ref Utf8JsonReader reader, TensorTable table, int tensor, string field, ref long[] values)
    {
        if (reader.TokenType != JsonTokenType.StartArray)
        {
            throw TensorError(table, tensor, "has a '" + field + "' that is " + Describe(reader.TokenType) + ", not an array");
        }
        var count = 0;
        while (reader.Read() && reader.TokenType != JsonTokenType.EndArray)
        {
            if (reader.TokenType != JsonTokenType.Number || !reader.TryGetUInt64(out var value))
            {
                throw TensorError(table, tensor, "has a '" + field + "' entry that is not a non-negative integer");
            }
            if (value > long.MaxValue)
            {
                throw TensorError(table, tensor, "has a '" + field + "' entry " + value + " that is too large");
            }
            if (count == values.Length)
            {
                Array.Resize(ref values, count * 2);
            }
            values[count++] = (long)value;
        }
        return count;
    }

    // Messages are built out of line: interpolated strings in the hot ReadTensor/ReadIntegers would give them
    // large stack frames that are zeroed on every call.
    [MethodImpl(MethodImplOptions.NoInlining)]
    private static SafetensorsFormatException TensorError(TensorTable table, int tensor, string detail) =>
        new($"tensor '{Truncate(table.Name(tensor))}' {detail}");

    private static void Validate(TensorTable table, long dataLength)
    {
        // Validation walks tensors in data order. Writers usually emit them sorted already;
        // only sort (an index) when they are not.
        var records = table.Records;
        int[]? order = null;
        for (var i = 1; i < records.Length; i++)
        {
            if (CompareOffsets(records[i - 1], records[i]) > 0)
            {
                order = new int[records.Length];
                for (var j = 0; j < order.Length; j++)
                {
                    order[j] = j;
                }
                // The same comparisons as sorting the rows themselves, so equal offsets end up in the same order.
                Array.Sort(order, (a, b) => CompareOffsets(table[a], table[b]));
                break;
            }
        }

        long previousEnd = 0;
        var previous = -1;
        for (var k = 0; k < records.Length; k++)
        {
            var index = order is null ? k : order[k];
            ref readonly var tensor = ref records[index];
            if (tensor.DataStart != previousEnd)
            {
                throw new SafetensorsFormatException(previous < 0
                    ? $"tensor '{Truncate(table.Name(index))}' starts at byte {tensor.DataStart}; the data section must start with a tensor at byte 0"
                    : $"tensor '{Truncate(table.Name(index))}' starts at byte {tensor.DataStart} but tensor '{Truncate(table.Name(previous))}' ends at byte {previousEnd} ({(tensor.DataStart > previousEnd ? "gap" : "overlap")})");
            }
            if (tensor.DataEnd < tensor.DataStart)
            {
                throw new SafetensorsFormatException(
                    $"tensor '{Truncate(table.Name(index))}' ends at byte {tensor.DataEnd}, before it starts at byte {tensor.DataStart}");
            }

            ulong elements = 1;
            var shape = table.Shape(index);
            foreach (var dim in shape)
            {
                if (!TryMultiply(elements, (ulong)dim, out elements))
                {
                    throw new SafetensorsFormatException(
                        $"tensor '{Truncate(table.Name(index))}' has shape {FormatShape(shape)} whose element count overflows");
                }
            }
            var dtype = SafetensorsDtype.Names[tensor.Dtype];
            var bitSize = (ulong)SafetensorsDtype.BitSizes[tensor.Dtype];
            if (!TryMultiply(elements, bitSize, out var bits))
            {
                throw new SafetensorsFormatException(
                    $"tensor '{Truncate(table.Name(index))}' has shape {FormatShape(shape)} whose size in bits overflows");
            }
            if (bits % 8 != 0)
            {
                throw new SafetensorsFormatException(
                    $"tensor '{Truncate(table.Name(index))}' holds {bits} bits of {dtype}, which is not a whole number of bytes");
            }
            var span = (ulong)(tensor.DataEnd - tensor.DataStart);
            if (bits / 8 != span)
            {
                throw new SafetensorsFormatException(
                    $"tensor '{Truncate(table.Name(index))}' is {dtype} {FormatShape(shape)} = {bits / 8} bytes but its data_offsets span {span} bytes");
            }
            previousEnd = tensor.DataEnd;
            previous = index;
        }

        if (previousEnd != dataLength)
        {
            throw new SafetensorsFormatException(previousEnd > dataLength
                ? $"tensor '{Truncate(table.Name(previous))}' ends at byte {previousEnd} but the file has {dataLength} data bytes"
                : previous < 0
                    ? $"the header lists no tensors but the file has {dataLength} data bytes after it"
                    : $"the file has {dataLength - previousEnd} trailing bytes after the last tensor '{Truncate(table.Name(previous))}' (ends at byte {previousEnd} of {dataLength})");
        }
    }

    private static int CompareOffsets(in TensorRecord a, in TensorRecord b)
    {
        var c = a.DataStart.CompareTo(b.DataStart);
        return c != 0 ? c : a.DataEnd.CompareTo(b.DataEnd);
    }

    private static bool TryMultiply(ulong a, ulong b, out ulong product)
    {
        var wide = Math.BigMul(a, b, out var low);
        product = low;
        return wide == 0;
    }

    private static string FormatShape(ReadOnlySpan<long> shape) =>
        "[" + string.Join(", ", shape.ToArray().Take(8).Select(d => d.ToString(CultureInfo.InvariantCulture)))
        + (shape.Length > 8 ? $", … ({shape.Length} dims)]" : "]");

    private static string Truncate(string value) => value.Length <= 120 ? value : value[..120] + "…";

    private static string Describe(JsonTokenType token) => token switch
    {
        JsonTokenType.StartObject => "an object",
        JsonTokenType.StartArray => "an array",
        JsonTokenType.String => "a string",
        JsonTokenType.Number => "a number",
        JsonTokenType.True or JsonTokenType.False => "a boolean",
        JsonTokenType.Null => "null",
        _ => token.ToString(),
    };
}
