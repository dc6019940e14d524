namespace LoraDeploy.Storage;

/// <summary>
/// A read-only, seekable window <c>[start, start + length)</c> of a blob file; positions are relative to the window,
/// so readers (e.g. an HTTP Range answer) see the range as a whole stream. Owns the file.
/// </summary>
internal sealed class RangeStream(FileStream file, long start, long length) : Stream
{
    private long _position;

    public override bool CanRead => true;
    public override bool CanSeek => true;
    public override bool CanWrite => false;
    public override long Length => length;

    public override long Position
    {
        get => _position;
        set => _position = value >= 0 ? value : throw new ArgumentOutOfRangeException(nameof(value));
    }

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

    public override int Read(Span<byte> buffer)
    {
        var n = Window(buffer.Length);
        if (n == 0)
        {
            return 0;
        }
        var read = RandomAccess.Read(file.SafeFileHandle, buffer[..n], start + _position);
        _position += read;
        return read;
    }

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        var n = Window(buffer.Length);
        if (n == 0)
        {
            return 0;
        }
        var read = await RandomAccess.ReadAsync(file.SafeFileHandle, buffer[..n], start + _position, cancellationToken).ConfigureAwait(false);
        _position += read;
        return read;
    }

    public override long Seek(long offset, SeekOrigin origin) => Position = origin switch
    {
        SeekOrigin.Begin => offset,
        SeekOrigin.Current => _position + offset,
        SeekOrigin.End => length + offset,
        _ => throw new ArgumentOutOfRangeException(nameof(origin)),
    };

    public override void Flush()
    {
    }

    public override void SetLength(long value) => throw new NotSupportedException();

    public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            file.Dispose();
        }
        base.Dispose(disposing);
    }

    /// <summary>How many of <paramref name="wanted"/> bytes are left in the window from the current position.</summary>
    private int Window(int wanted) => (int)Math.Clamp(length - _position, 0, wanted);
}
