using System.Buffers;
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
        // Pool the common small headers; a hostile 100 MB header should not stay cached in the pool.
        var pooled = length <= PooledHeaderLimit;
        var buffer = pooled ? ArrayPool<byte>.Shared.Rent(Math.Max(length, 1)) : new byte[length];
        try
        {
            var read = stream.ReadAtLeast(buffer.AsSpan(0, length), length, throwOnEndOfStream: false);
            if (read < length)
            {
                throw new SafetensorsFormatException(
                    $"the file ended after {read} of {length} header bytes");
            }
            return Parse(buffer.AsSpan(0, length), fileLength);
        }
        finally
        {
            if (pooled)
            {
                ArrayPool<byte>.Shared.Return(buffer);
            }
        }
    }

    /// <summary>Parses and validates header JSON for a file of <paramref name="fileLength"/> bytes.</summary>
    internal static SafetensorsHeader Parse(ReadOnlySpan<byte> json, long fileLength)
    {
        if (!Utf8.IsValid(json))
        {
            throw new SafetensorsFormatException("the header is not valid UTF-8");
        }

        // A tensor entry takes at least ~50 bytes of JSON and typically ~100-150; presizing saves rehashing.
        var capacity = json.Length / 128;
        var tensors = new List<TensorEntry>(capacity);
        // Made only once names stop ascending (see IsNewName).
        HashSet<TensorEntry>? names = null;
        var nameChunks = new NameChunks(json.Length);
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
                var tensor = reader.ValueIsEscaped
                    ? nameChunks.Add(Encoding.UTF8.GetBytes(reader.GetString()!))
                    : nameChunks.Add(reader.ValueSpan);
                reader.Read();
                if (!IsNewName(tensor, tensors, ref names, capacity))
                {
                    throw new SafetensorsFormatException($"duplicate tensor name '{Truncate(tensor.Name)}' in the header");
                }
                ReadTensor(ref reader, tensor, ref scratch);
                tensors.Add(tensor);
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
        Validate(tensors, fileLength - 8 - headerLength);
        return new SafetensorsHeader(tensors, metadata ?? EmptyMetadata, headerLength, fileLength);
    }

    private static ReadOnlySpan<byte> MetadataKeyUtf8 => "__metadata__"u8;

    /// <summary>
    /// Whether <paramref name="tensor"/>'s name differs from every name in <paramref name="earlier"/>. The safetensors
    /// library writes tensors sorted by dtype, then by name in byte order, so within a dtype group each name is
    /// greater than the one before it and cannot repeat an earlier one: while that holds, no hashing is needed. From
    /// the first name that is not greater (a new dtype group, another writer's order, or a duplicate), every name so
    /// far and every later one goes into a keyed hash set. Either way each name is compared or hashed a bounded
    /// number of times, so the check stays linear whatever the order.
    /// </summary>
    private static bool IsNewName(TensorEntry tensor, List<TensorEntry> earlier, ref HashSet<TensorEntry>? names, int capacity)
    {
        if (names is not null)
        {
            return names.Add(tensor);
        }
        if (earlier.Count == 0 || earlier[^1].NameUtf8.SequenceCompareTo(tensor.NameUtf8) < 0)
        {
            return true;
        }
        names = new HashSet<TensorEntry>(Math.Max(capacity, earlier.Count * 2), TensorEntry.NameComparer);
        foreach (var name in earlier)
        {
            // Distinct: they ascend.
            names.Add(name);
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

    private static void ReadTensor(ref Utf8JsonReader reader, TensorEntry tensor, ref long[] scratch)
    {
        if (reader.TokenType != JsonTokenType.StartObject)
        {
            throw TensorError(tensor, "must be a JSON object, not " + Describe(reader.TokenType));
        }

        string? dtype = null;
        long[]? shape = null;
        long begin = 0, end = 0;
        var haveOffsets = false;
        while (reader.Read() && reader.TokenType == JsonTokenType.PropertyName)
        {
            if (reader.ValueTextEquals("dtype"u8))
            {
                if (dtype is not null)
                {
                    throw TensorError(tensor, "has a duplicate 'dtype' field");
                }
                reader.Read();
                if (reader.TokenType != JsonTokenType.String)
                {
                    throw TensorError(tensor, "has a dtype that is " + Describe(reader.TokenType) + ", not a string");
                }
                dtype = (reader.ValueIsEscaped ? null : SafetensorsDtype.Intern(reader.ValueSpan))
                    ?? KnownDtypeOrThrow(reader.GetString()!, tensor);
            }
            else if (reader.ValueTextEquals("shape"u8))
            {
                if (shape is not null)
                {
                    throw TensorError(tensor, "has a duplicate 'shape' field");
                }
                reader.Read();
                var dims = ReadIntegers(ref reader, tensor, "shape", ref scratch);
                shape = dims == 0 ? [] : scratch[..dims];
            }
            else if (reader.ValueTextEquals("data_offsets"u8))
            {
                if (haveOffsets)
                {
                    throw TensorError(tensor, "has a duplicate 'data_offsets' field");
                }
                reader.Read();
                var offsets = ReadIntegers(ref reader, tensor, "data_offsets", ref scratch);
                if (offsets != 2)
                {
                    throw TensorError(tensor, "has " + offsets + " data_offsets; expected [begin, end]");
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

        if (dtype is null)
        {
            throw TensorError(tensor, "has no 'dtype'");
        }
        if (shape is null)
        {
            throw TensorError(tensor, "has no 'shape'");
        }
        if (!haveOffsets)
        {
            throw TensorError(tensor, "has no 'data_offsets'");
        }
        (tensor.Dtype, tensor.Shape, tensor.DataStart, tensor.DataEnd) = (dtype, shape, begin, end);
    }

    private static string KnownDtypeOrThrow(string dtype, TensorEntry tensor) =>
        SafetensorsDtype.BitSize(dtype) > 0
            ? dtype
            : throw TensorError(tensor, "has unknown dtype '" + Truncate(dtype) + "'");

    /// <summary>Reads an array of non-negative integers into <paramref name="values"/> (grown as needed); returns the count.</summary>
    private static int ReadIntegers(ref Utf8JsonReader reader, TensorEntry tensor, string field, ref long[] values)
    {
        if (reader.TokenType != JsonTokenType.StartArray)
        {
            throw TensorError(tensor, "has a '" + field + "' that is " + Describe(reader.TokenType) + ", not an array");
        }
        var count = 0;
        while (reader.Read() && reader.TokenType != JsonTokenType.EndArray)
        {
            if (reader.TokenType != JsonTokenType.Number || !reader.TryGetUInt64(out var value))
            {
                throw TensorError(tensor, "has a '" + field + "' entry that is not a non-negative integer");
            }
            if (value > long.MaxValue)
            {
                throw TensorError(tensor, "has a '" + field + "' entry " + value + " that is too large");
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
    private static SafetensorsFormatException TensorError(TensorEntry tensor, string detail) =>
        new($"tensor '{Truncate(tensor.Name)}' {detail}");

    private static void Validate(List<TensorEntry> tensors, long dataLength)
    {
        // Validation walks tensors in data order. Writers usually emit them sorted already;
        // only sort (a copy) when they are not.
        IReadOnlyList<TensorEntry> ordered = tensors;
        for (var i = 1; i < tensors.Count; i++)
        {
            if (CompareOffsets(tensors[i - 1], tensors[i]) > 0)
            {
                var copy = tensors.ToArray();
                Array.Sort(copy, CompareOffsets);
                ordered = copy;
                break;
            }
        }

        long previousEnd = 0;
        TensorEntry? previous = null;
        foreach (var tensor in ordered)
        {
            if (tensor.DataStart != previousEnd)
            {
                throw new SafetensorsFormatException(previous is null
                    ? $"tensor '{Truncate(tensor.Name)}' starts at byte {tensor.DataStart}; the data section must start with a tensor at byte 0"
                    : $"tensor '{Truncate(tensor.Name)}' starts at byte {tensor.DataStart} but tensor '{Truncate(previous.Name)}' ends at byte {previousEnd} ({(tensor.DataStart > previousEnd ? "gap" : "overlap")})");
            }
            if (tensor.DataEnd < tensor.DataStart)
            {
                throw new SafetensorsFormatException(
                    $"tensor '{Truncate(tensor.Name)}' ends at byte {tensor.DataEnd}, before it starts at byte {tensor.DataStart}");
            }

            ulong elements = 1;
            foreach (var dim in tensor.Shape)
            {
                if (!TryMultiply(elements, (ulong)dim, out elements))
                {
                    throw new SafetensorsFormatException(
                        $"tensor '{Truncate(tensor.Name)}' has shape {FormatShape(tensor.Shape)} whose element count overflows");
                }
            }
            var bitSize = (ulong)SafetensorsDtype.BitSize(tensor.Dtype);
            if (!TryMultiply(elements, bitSize, out var bits))
            {
                throw new SafetensorsFormatException(
                    $"tensor '{Truncate(tensor.Name)}' has shape {FormatShape(tensor.Shape)} whose size in bits overflows");
            }
            if (bits % 8 != 0)
            {
                throw new SafetensorsFormatException(
                    $"tensor '{Truncate(tensor.Name)}' holds {bits} bits of {tensor.Dtype}, which is not a whole number of bytes");
            }
            var span = (ulong)(tensor.DataEnd - tensor.DataStart);
            if (bits / 8 != span)
            {
                throw new SafetensorsFormatException(
                    $"tensor '{Truncate(tensor.Name)}' is {tensor.Dtype} {FormatShape(tensor.Shape)} = {bits / 8} bytes but its data_offsets span {span} bytes");
            }
            previousEnd = tensor.DataEnd;
            previous = tensor;
        }

        if (previousEnd != dataLength)
        {
            throw new SafetensorsFormatException(previousEnd > dataLength
                ? $"tensor '{Truncate(previous!.Name)}' ends at byte {previousEnd} but the file has {dataLength} data bytes"
                : previous is null
                    ? $"the header lists no tensors but the file has {dataLength} data bytes after it"
                    : $"the file has {dataLength - previousEnd} trailing bytes after the last tensor '{Truncate(previous.Name)}' (ends at byte {previousEnd} of {dataLength})");
        }
    }

    private static int CompareOffsets(TensorEntry a, TensorEntry b)
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

    private static string FormatShape(long[] shape) =>
        "[" + string.Join(", ", shape.Take(8).Select(d => d.ToString(CultureInfo.InvariantCulture)))
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
