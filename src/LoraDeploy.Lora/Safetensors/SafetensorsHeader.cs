namespace LoraDeploy.Lora.Safetensors;

/// <summary>
/// The validated header of a safetensors file: tensor table, <c>__metadata__</c> and layout.
/// Produced by <see cref="SafetensorsReader"/>; tensor data is not loaded, read it on demand
/// with <see cref="OpenTensor"/>.
/// </summary>
/// <remarks>
/// The reader keeps tensor names as UTF-8 bytes; <see cref="Tensors"/> and the name index behind
/// <see cref="TryGetTensor"/> are built on first use, so probing a header makes no string per tensor.
/// </remarks>
public sealed class SafetensorsHeader
{
    private SafetensorsTensor[]? _tensors;
    private Dictionary<string, SafetensorsTensor>? _byName;

    internal SafetensorsHeader(
        List<TensorEntry> entries,
        IReadOnlyDictionary<string, string> metadata,
        long headerLength,
        long fileLength)
    {
        Entries = entries;
        Metadata = metadata;
        HeaderLength = headerLength;
        FileLength = fileLength;
    }

    /// <summary>Tensors in the order they appear in the header JSON.</summary>
    public IReadOnlyList<SafetensorsTensor> Tensors => _tensors ??= Materialize();

    /// <summary>Number of tensors; unlike <c>Tensors.Count</c>, does not build the tensor list.</summary>
    public int TensorCount => Entries.Count;

    /// <summary>The reader's tensor table, in header order (a list, not an interface, so that loops over it make no enumerator).</summary>
    internal List<TensorEntry> Entries { get; }

    /// <summary>The <c>__metadata__</c> map (empty when absent).</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>Length in bytes of the JSON header (the little-endian u64 at the start of the file).</summary>
    public long HeaderLength { get; }

    /// <summary>Absolute file offset of the data section: 8 + <see cref="HeaderLength"/>.</summary>
    public long DataOffset => 8 + HeaderLength;

    /// <summary>Total file length in bytes.</summary>
    public long FileLength { get; }

    /// <summary>Length of the data section in bytes.</summary>
    public long DataLength => FileLength - DataOffset;

    /// <summary>Looks a tensor up by name.</summary>
    public bool TryGetTensor(string name, out SafetensorsTensor tensor) =>
        (_byName ??= Tensors.ToDictionary(t => t.Name, StringComparer.Ordinal)).TryGetValue(name, out tensor!);

    /// <summary>
    /// Returns a read-only stream over one tensor's bytes inside <paramref name="file"/> (which must be
    /// the seekable stream the header was read from). The returned stream does not own <paramref name="file"/>.
    /// </summary>
    /// <exception cref="KeyNotFoundException">No tensor has that name.</exception>
    public Stream OpenTensor(Stream file, string name)
    {
        ArgumentNullException.ThrowIfNull(file);
        if (!TryGetTensor(name, out var tensor))
        {
            throw new KeyNotFoundException($"no tensor named '{name}'");
        }
        return new BoundedReadStream(file, DataOffset + tensor.DataStart, tensor.ByteLength);
    }

    /// <summary>Reads one tensor's bytes into <paramref name="destination"/>, which must be exactly its byte length.</summary>
    public void ReadTensor(Stream file, string name, Span<byte> destination)
    {
        using var stream = OpenTensor(file, name);
        if (destination.Length != stream.Length)
        {
            throw new ArgumentException($"tensor '{name}' has {stream.Length} bytes; destination has {destination.Length}", nameof(destination));
        }
        stream.ReadExactly(destination);
    }

    // Threads racing here build equal arrays; either may win.
    private SafetensorsTensor[] Materialize() =>
        [.. Entries.Select(e => new SafetensorsTensor(e.Name, e.Dtype, e.Shape, e.DataStart, e.DataEnd))];
}
