using System.Runtime.InteropServices;
using System.Text;

namespace LoraDeploy.Lora.Safetensors;

/// <summary>
/// One tensor as the reader keeps it: its name as unescaped UTF-8 bytes inside a shared chunk (see
/// <see cref="NameChunks"/>), so that reading a header makes no string per tensor. The name string is
/// created on first use.
/// </summary>
internal sealed class TensorEntry(byte[] nameChunk, int nameStart, int nameLength)
{
    private string? _name;

    /// <summary>Compares entries by name bytes; hashes with the BCL's per-process randomised Marvin hash.</summary>
    public static readonly IEqualityComparer<TensorEntry> NameComparer = new ByName();

    public ReadOnlySpan<byte> NameUtf8 => new(nameChunk, nameStart, nameLength);

    public string Name => _name ??= Encoding.UTF8.GetString(NameUtf8);

    // Set by the reader once it has read the tensor's object.
    public string Dtype { get; set; } = "";
    public long[] Shape { get; set; } = [];
    public long DataStart { get; set; }
    public long DataEnd { get; set; }

    public long ByteLength => DataEnd - DataStart;

    public long ElementCount => SafetensorsTensor.CountElements(Shape);

    private sealed class ByName : IEqualityComparer<TensorEntry>
    {
        public bool Equals(TensorEntry? x, TensorEntry? y) => x!.NameUtf8.SequenceEqual(y!.NameUtf8);

        // Names come from untrusted files: a keyed hash keeps crafted collisions from making the set quadratic.
        // Marvin reads UTF-16 units, so the bytes go in pairs and an odd last byte is mixed in separately.
        public int GetHashCode(TensorEntry entry)
        {
            var name = entry.NameUtf8;
            var hash = string.GetHashCode(MemoryMarshal.Cast<byte, char>(name));
            return (name.Length & 1) == 0 ? hash : HashCode.Combine(hash, name[^1]);
        }
    }
}

/// <summary>
/// Append-only storage for tensor names: chunks of at most <see cref="ChunkSize"/> bytes (below the
/// large-object-heap threshold), a name never split across two. A longer name gets a chunk of its own.
/// </summary>
internal struct NameChunks(int headerLength)
{
    public const int ChunkSize = 32 * 1024;

    private readonly int _firstChunk = Math.Min(headerLength, ChunkSize);
    private byte[]? _chunk;
    private int _used;

    public TensorEntry Add(ReadOnlySpan<byte> name)
    {
        if (_chunk is null || _chunk.Length - _used < name.Length)
        {
            // Uninitialised: every byte handed out is written first.
            _chunk = GC.AllocateUninitializedArray<byte>(Math.Max(name.Length, _chunk is null ? _firstChunk : ChunkSize));
            _used = 0;
        }
        name.CopyTo(_chunk.AsSpan(_used));
        var entry = new TensorEntry(_chunk, _used, name.Length);
        _used += name.Length;
        return entry;
    }
}
