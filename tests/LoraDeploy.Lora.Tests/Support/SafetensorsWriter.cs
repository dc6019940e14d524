using System.Buffers.Binary;
using System.Text.Json;
using LoraDeploy.Lora.Safetensors;

namespace LoraDeploy.Lora.Tests.Support;

/// <summary>
/// Test-only safetensors writer. Tensors without explicit bytes are left as holes: written to a
/// file they cost no disk (sparse), so fixtures can carry real base-model shapes.
/// </summary>
internal sealed class SafetensorsWriter
{
    private readonly List<(string Name, string Dtype, long[] Shape, byte[]? Data)> _tensors = [];
    private readonly Dictionary<string, string> _metadata = new(StringComparer.Ordinal);

    public int Count => _tensors.Count;

    public SafetensorsWriter Tensor(string name, string dtype, long[] shape, byte[]? data = null)
    {
        _tensors.Add((name, dtype, shape, data));
        return this;
    }

    public SafetensorsWriter Metadata(string key, string value)
    {
        _metadata[key] = value;
        return this;
    }

    /// <summary>kohya/LyCORIS LoRA module: lora_down [r,in(,k,k)], lora_up [out,r(,1,1)], alpha [].</summary>
    public SafetensorsWriter Lora(string module, int rank, long inDim, long outDim, double? alpha = null, int kernel = 0, string dtype = "F16")
    {
        Tensor(module + ".lora_down.weight", dtype, kernel > 0 ? [rank, inDim, kernel, kernel] : [rank, inDim]);
        Tensor(module + ".lora_up.weight", dtype, kernel > 0 ? [outDim, rank, 1, 1] : [outDim, rank]);
        if (alpha is { } a)
        {
            Tensor(module + ".alpha", "F16", [], Half(a));
        }
        return this;
    }

    /// <summary>PEFT/diffusers LoRA module: lora_A [r,in], lora_B [out,r], no alpha.</summary>
    public SafetensorsWriter Peft(string module, int rank, long inDim, long outDim, string dtype = "BF16")
    {
        Tensor(module + ".lora_A.weight", dtype, [rank, inDim]);
        Tensor(module + ".lora_B.weight", dtype, [outDim, rank]);
        return this;
    }

    /// <summary>A file of exactly this header text (no checks, for hostile input) and <paramref name="dataLength"/> zero bytes.</summary>
    public static byte[] RawFile(string headerJson, long dataLength = 0)
    {
        var json = System.Text.Encoding.UTF8.GetBytes(headerJson);
        var bytes = new byte[8 + json.Length + dataLength];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt64LittleEndian(bytes, (ulong)json.Length);
        json.CopyTo(bytes, 8);
        return bytes;
    }

    public static byte[] Half(double value)
    {
        var bytes = new byte[2];
        BinaryPrimitives.WriteHalfLittleEndian(bytes, (Half)value);
        return bytes;
    }

    /// <summary>The 8-byte prefix plus the space-padded JSON header, and the data section length.</summary>
    public (byte[] Head, long DataLength) BuildHead()
    {
        using var json = new MemoryStream();
        long offset = 0;
        using (var writer = new Utf8JsonWriter(json))
        {
            writer.WriteStartObject();
            if (_metadata.Count > 0)
            {
                writer.WriteStartObject("__metadata__");
                foreach (var (key, value) in _metadata)
                {
                    writer.WriteString(key, value);
                }
                writer.WriteEndObject();
            }
            foreach (var (name, dtype, shape, _) in _tensors)
            {
                var bytes = ByteLength(dtype, shape);
                writer.WriteStartObject(name);
                writer.WriteString("dtype", dtype);
                writer.WriteStartArray("shape");
                foreach (var dim in shape)
                {
                    writer.WriteNumberValue(dim);
                }
                writer.WriteEndArray();
                writer.WriteStartArray("data_offsets");
                writer.WriteNumberValue(offset);
                writer.WriteNumberValue(offset + bytes);
                writer.WriteEndArray();
                writer.WriteEndObject();
                offset += bytes;
            }
            writer.WriteEndObject();
        }
        var headerLength = (json.Length + 7) / 8 * 8;
        var head = new byte[8 + headerLength];
        BinaryPrimitives.WriteUInt64LittleEndian(head, (ulong)headerLength);
        json.ToArray().CopyTo(head, 8);
        head.AsSpan(8 + (int)json.Length).Fill((byte)' ');
        return (head, offset);
    }

    public byte[] ToBytes()
    {
        var (head, dataLength) = BuildHead();
        var file = new byte[head.Length + dataLength];
        head.CopyTo(file, 0);
        WriteData((offset, data) => data.CopyTo(file, head.Length + offset));
        return file;
    }

    /// <summary>Writes the file; unset tensor data stays a hole (sparse).</summary>
    public string WriteTo(string path)
    {
        var (head, dataLength) = BuildHead();
        using var file = new FileStream(path, FileMode.Create, FileAccess.Write);
        file.Write(head);
        WriteData((offset, data) =>
        {
            file.Position = head.Length + offset;
            file.Write(data);
        });
        file.SetLength(head.Length + dataLength);
        return path;
    }

    private void WriteData(Action<long, byte[]> write)
    {
        long offset = 0;
        foreach (var (_, dtype, shape, data) in _tensors)
        {
            var bytes = ByteLength(dtype, shape);
            if (data is not null)
            {
                if (data.Length != bytes)
                {
                    throw new InvalidOperationException($"data for a {dtype} {string.Join('x', shape)} tensor must be {bytes} bytes");
                }
                write(offset, data);
            }
            offset += bytes;
        }
    }

    private static long ByteLength(string dtype, long[] shape)
    {
        long elements = 1;
        foreach (var dim in shape)
        {
            elements *= dim;
        }
        return elements * SafetensorsDtype.BitSize(dtype) / 8;
    }

    /// <summary>Loads a <c>headers/*.json</c> fixture ({tensors, metadata}) into a writer.</summary>
    public static SafetensorsWriter FromFixture(string path)
    {
        using var doc = JsonDocument.Parse(File.ReadAllBytes(path));
        var writer = new SafetensorsWriter();
        if (doc.RootElement.TryGetProperty("metadata", out var metadata) && metadata.ValueKind == JsonValueKind.Object)
        {
            foreach (var entry in metadata.EnumerateObject())
            {
                writer.Metadata(entry.Name, entry.Value.ValueKind == JsonValueKind.String ? entry.Value.GetString()! : entry.Value.GetRawText());
            }
        }
        foreach (var tensor in doc.RootElement.GetProperty("tensors").EnumerateObject())
        {
            var shape = tensor.Value.GetProperty("shape").EnumerateArray().Select(d => d.GetInt64()).ToArray();
            writer.Tensor(tensor.Name, tensor.Value.GetProperty("dtype").GetString()!, shape);
        }
        return writer;
    }
}

/// <summary>A read-only seekable stream of <c>head</c> followed by zeros up to <c>length</c>; lets tests
/// present multi-gigabyte files without allocating them.</summary>
internal sealed class HeadThenZerosStream(byte[] head, long length) : Stream
{
    private long _position;

    public override bool CanRead => true;
    public override bool CanSeek => true;
    public override bool CanWrite => false;
    public override long Length => length;
    public override long Position { get => _position; set => _position = value; }

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

    public override int Read(Span<byte> buffer)
    {
        var n = (int)Math.Clamp(length - _position, 0, buffer.Length);
        for (var i = 0; i < n; i++)
        {
            var p = _position + i;
            buffer[i] = p < head.Length ? head[p] : (byte)0;
        }
        _position += n;
        return n;
    }

    public override long Seek(long offset, SeekOrigin origin) => _position = origin switch
    {
        SeekOrigin.Begin => offset,
        SeekOrigin.Current => _position + offset,
        _ => length + offset,
    };

    public override void Flush()
    {
    }

    public override void SetLength(long value) => throw new NotSupportedException();
    public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
}

internal static class TempFiles
{
    public static string Directory()
    {
        var dir = Path.Combine(Path.GetTempPath(), "loradeploy-lora-tests", Guid.NewGuid().ToString("n"));
        System.IO.Directory.CreateDirectory(dir);
        return dir;
    }
}
