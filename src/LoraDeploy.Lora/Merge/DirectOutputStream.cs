using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace LoraDeploy.Lora.Merge;

/// <summary>
/// A write-only, sequential file stream that writes with O_DIRECT: bytes go from aligned staging buffers to the disk
/// instead of being copied into the page cache (in the benchmark's VM that copy took as much CPU as the merge's
/// arithmetic) and left dirty for the closing fsync. One buffer is written in the background while the next fills.
/// The tail that does not fill an aligned block is written without O_DIRECT, as is everything after a direct write
/// the file system refused.
/// </summary>
internal sealed class DirectOutputStream : Stream
{
    private const int Alignment = 4096;
    private const int BufferSize = 8 << 20;

    private readonly SafeFileHandle _file;
    private readonly Memory<byte>[] _buffers = [Aligned(), Aligned()];
    private bool _direct = true;
    private int _current;
    private int _filled;
    private long _position;
    private Task _pending = Task.CompletedTask;

    private DirectOutputStream(SafeFileHandle file) => _file = file;

    /// <summary>Creates <paramref name="path"/>: a <see cref="DirectOutputStream"/> where O_DIRECT is available, else a buffered <see cref="FileStream"/>.</summary>
    public static Stream Create(string path)
    {
        var file = File.OpenHandle(path, FileMode.Create, FileAccess.Write, FileShare.None);
        if (LinuxFiles.TrySetDirect(file, direct: true))
        {
            return new DirectOutputStream(file);
        }
        return new FileStream(file, FileAccess.Write, bufferSize: 1 << 20);
    }

    public override bool CanRead => false;
    public override bool CanSeek => false;
    public override bool CanWrite => true;
    public override long Length => throw new NotSupportedException();
    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

    public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));

    public override void Write(ReadOnlySpan<byte> buffer)
    {
        while (buffer.Length > 0)
        {
            var count = Math.Min(buffer.Length, BufferSize - _filled);
            buffer[..count].CopyTo(_buffers[_current].Span[_filled..]);
            _filled += count;
            buffer = buffer[count..];
            if (_filled == BufferSize)
            {
                // Wait for the other buffer's write, then write this one while the caller fills the other.
                _pending.GetAwaiter().GetResult();
                var full = _buffers[_current];
                var at = _position;
                _pending = Task.Run(() => WriteOut(full.Span, at));
                _position += BufferSize;
                _current ^= 1;
                _filled = 0;
            }
        }
    }

    /// <summary>Writes out everything written so far (not to disk: <see cref="FlushToDisk"/>).</summary>
    public override void Flush()
    {
        _pending.GetAwaiter().GetResult();
        var rest = _buffers[_current].Span[.._filled];
        var aligned = rest.Length / Alignment * Alignment;
        WriteOut(rest[..aligned], _position);
        WriteOut(rest[aligned..], _position + aligned);
        _position += rest.Length;
        _filled = 0;
    }

    public void FlushToDisk()
    {
        Flush();
        RandomAccess.FlushToDisk(_file);
    }

    public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
    public override void SetLength(long value) => throw new NotSupportedException();

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            try
            {
                _pending.GetAwaiter().GetResult();
            }
            catch (IOException)
            {
                // Only a merge that already failed disposes with a write outstanding; its error is the one reported.
            }
            _file.Dispose();
        }
        base.Dispose(disposing);
    }

    private void WriteOut(ReadOnlySpan<byte> bytes, long at)
    {
        if (bytes.IsEmpty)
        {
            return;
        }
        if (_direct && at % Alignment == 0 && bytes.Length % Alignment == 0)
        {
            try
            {
                RandomAccess.Write(_file, bytes, at);
                return;
            }
            catch (IOException)
            {
                // Some file systems accept O_DIRECT and refuse the writes: write through the page cache instead
                // (a real failure such as a full disk fails again below).
            }
        }
        if (_direct)
        {
            _direct = false;
            LinuxFiles.TrySetDirect(_file, direct: false);
        }
        RandomAccess.Write(_file, bytes, at);
    }

    // Pinned, so the aligned window never moves.
    private static Memory<byte> Aligned()
    {
        var array = GC.AllocateUninitializedArray<byte>(BufferSize + Alignment, pinned: true);
        var address = Marshal.UnsafeAddrOfPinnedArrayElement(array, 0);
        return array.AsMemory((int)((Alignment - address % Alignment) % Alignment), BufferSize);
    }
}
