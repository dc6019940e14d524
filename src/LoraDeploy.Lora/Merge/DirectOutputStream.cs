using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace LoraDeploy.Lora.Merge;

/// <summary>
/// A write-only, sequential file stream that writes with O_DIRECT: bytes go from aligned staging buffers to the disk
/// instead of being copied into the page cache (in the benchmark's VM that copy took as much CPU as the merge's
/// arithmetic) and left dirty for the closing fsync. Full buffers are written in the background while the next ones
/// fill, so a whole tensor can be handed over and the disk keeps writing while the next one is computed. The tail that
/// does not fill an aligned block is written without O_DIRECT, as is everything after a direct write the file system
/// refused. Disposing does not write what is still buffered (a failed merge's output is deleted anyway): call
/// <see cref="FlushToDisk"/> first.
/// </summary>
internal sealed class DirectOutputStream : Stream
{
    private const int Alignment = 4096;
    private const int BufferSize = 8 << 20;
    private const int BufferCount = 4;

    private readonly SafeFileHandle _file;
    private readonly Memory<byte>[] _buffers = [.. Enumerable.Range(0, BufferCount).Select(_ => Aligned())];
    private readonly Task[] _pending = [.. Enumerable.Repeat(Task.CompletedTask, BufferCount)];
    // Cleared (by whichever write finds O_DIRECT refused) for all later writes.
    private volatile bool _direct = true;
    private int _current;
    private int _filled;
    private long _position;

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
                // Write this one in the background; the next buffer is free once its previous write is done.
                var full = _buffers[_current];
                var at = _position;
                _pending[_current] = Task.Run(() => WriteOut(full.Span, at));
                _position += BufferSize;
                _current = (_current + 1) % BufferCount;
                _filled = 0;
                _pending[_current].GetAwaiter().GetResult();
            }
        }
    }

    /// <summary>Writes out everything written so far (not to disk: <see cref="FlushToDisk"/>).</summary>
    public override void Flush()
    {
        WaitForWrites();
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
            foreach (var write in _pending)
            {
                try
                {
                    write.GetAwaiter().GetResult();
                }
                catch (IOException)
                {
                    // Only a merge that already failed disposes with a write outstanding; its error is the one reported.
                }
            }
            _file.Dispose();
        }
        base.Dispose(disposing);
    }

    private void WaitForWrites()
    {
        foreach (var write in _pending)
        {
            write.GetAwaiter().GetResult();
        }
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
