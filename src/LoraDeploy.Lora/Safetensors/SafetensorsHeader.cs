namespace LoraDeploy.Lora.Safetensors;

/// <summary>
/// The validated header of a safetensors file: tensor table, <c>__metadata__</c> and layout.
/// Produced by <see cref="SafetensorsReader"/>; tensor data is not loaded, read it on demand
/// with <see cref="OpenTensor"/>.
/// </summary>
/// <remarks>
/// Like <c>JsonDocument</c>, the header keeps its tensor table in arrays rented from the shared pools (names stay
/// UTF-8 slices of the header bytes), so reading and probing a header allocates almost nothing; dispose it to give
/// them back. An undisposed header is still correct: the GC collects the arrays instead. After <see cref="Dispose"/>
/// every member that reads the tensor table (<see cref="Tensors"/>, <see cref="TensorCount"/>,
/// <see cref="TryGetTensor"/>, <see cref="OpenTensor"/>, <see cref="ReadTensor"/>, probing) throws
/// <see cref="ObjectDisposedException"/>; <see cref="Metadata"/> and the lengths hold no pooled memory and stay
/// readable. Disposing while another thread uses the header is not supported. <see cref="Tensors"/> and the name
/// index behind <see cref="TryGetTensor"/> are built on first use, so probing a header makes no string per tensor.
/// </remarks>
public sealed class SafetensorsHeader : IDisposable
{
    private TensorTable? _table;
    private SafetensorsTensor[]? _tensors;
    private Dictionary<string, SafetensorsTensor>? _byName;

    internal SafetensorsHeader(
        TensorTable table,
        IReadOnlyDictionary<string, string> metadata,
        long headerLength,
        long fileLength)
    {
        _table = table;
        Metadata = metadata;
        HeaderLength = headerLength;
        FileLength = fileLength;
    }

    /// <summary>Tensors in the order they appear in the header JSON.</summary>
    public IReadOnlyList<SafetensorsTensor> Tensors
    {
        get
        {
            var table = Table;
            return _tensors ??= Materialize(table);
        }
    }

    /// <summary>Number of tensors; unlike <c>Tensors.Count</c>, does not build the tensor list.</summary>
    public int TensorCount => Table.Count;

    /// <summary>The reader's tensor table, in header order.</summary>
    /// <exception cref="ObjectDisposedException">The header has been disposed.</exception>
    internal TensorTable Table
    {
        get
        {
            var table = _table;
            ObjectDisposedException.ThrowIf(table is null, this);
            return table;
        }
    }

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
    public bool TryGetTensor(string name, out SafetensorsTensor tensor)
    {
        var tensors = Tensors;
        return (_byName ??= tensors.ToDictionary(t => t.Name, StringComparer.Ordinal)).TryGetValue(name, out tensor!);
    }

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

    /// <summary>Gives the tensor table's arrays back to the pool; the header's tensors cannot be read afterwards.</summary>
    public void Dispose() => Interlocked.Exchange(ref _table, null)?.Release();

    // Threads racing here build equal arrays; either may win.
    private static SafetensorsTensor[] Materialize(TensorTable table)
    {
        var tensors = new SafetensorsTensor[table.Count];
        for (var i = 0; i < tensors.Length; i++)
        {
            ref readonly var r = ref table[i];
            tensors[i] = new SafetensorsTensor(table.Name(i), table.Dtype(i), table.Shape(i).ToArray(), r.DataStart, r.DataEnd);
        }
        return tensors;
    }
}
