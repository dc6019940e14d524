using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace LoraDeploy.Lora.Merge;

/// <summary>
/// Linux file calls .NET does not offer: <c>copy_file_range(2)</c> copies a range from one file to another inside the
/// kernel, so untouched tensors do not pass through user space (and on file systems that share extents, no bytes move
/// at all); <c>sync_file_range(2)</c> starts writing a range to disk without waiting for it; <c>fcntl(2)</c> turns
/// O_DIRECT on and off.
/// </summary>
internal static partial class LinuxFiles
{
    private const uint SyncFileRangeWrite = 2;
    private const int FGetFl = 3;
    private const int FSetFl = 4;

    private const int EINTR = 4;
    private const int EXDEV = 18;
    private const int EINVAL = 22;
    private const int ENOSYS = 38;
    private const int EOPNOTSUPP = 95;

    /// <summary>
    /// Copies up to <paramref name="length"/> bytes from <paramref name="input"/> at <paramref name="inputOffset"/> to
    /// <paramref name="output"/> at <paramref name="outputOffset"/>, looping on short copies. Returns the bytes copied:
    /// fewer than asked when the kernel cannot copy between these files (not Linux, or ENOSYS, EXDEV, EINVAL,
    /// EOPNOTSUPP; <paramref name="unsupported"/> is then set) or the input ended; the caller copies the rest itself.
    /// </summary>
    /// <exception cref="IOException">The copy failed for another reason (e.g. ENOSPC, EIO).</exception>
    public static long Copy(SafeFileHandle input, long inputOffset, SafeFileHandle output, long outputOffset, long length, out bool unsupported)
    {
        unsupported = false;
        if (!OperatingSystem.IsLinux())
        {
            unsupported = true;
            return 0;
        }
        long copied = 0;
        // Both handles stay open for the whole call (the caller owns them), so their raw descriptors stay valid.
        var inputFd = (int)input.DangerousGetHandle();
        var outputFd = (int)output.DangerousGetHandle();
        while (copied < length)
        {
            var result = copy_file_range(inputFd, ref inputOffset, outputFd, ref outputOffset, (nuint)Math.Min(length - copied, 1L << 30), 0);
            if (result > 0)
            {
                copied += result;
                continue;
            }
            if (result == 0)
            {
                return copied;
            }
            var errno = Marshal.GetLastPInvokeError();
            if (errno == EINTR)
            {
                continue;
            }
            if (errno is ENOSYS or EXDEV or EINVAL or EOPNOTSUPP)
            {
                unsupported = true;
                return copied;
            }
            throw new IOException($"copy_file_range: {Marshal.GetPInvokeErrorMessage(errno)}");
        }
        return copied;
    }

    /// <summary>
    /// Starts writeback of the dirty pages of <paramref name="file"/> in [offset, offset + length) and returns; a hint
    /// only (no-op off Linux or on error), the final fsync is what makes the file durable. Without it the kernel starts
    /// writing only past its dirty threshold (10% of free memory) or after 30 s, so a merge of a file smaller than that
    /// would write everything in its closing fsync instead of while it computes.
    /// </summary>
    public static void StartWriteback(SafeFileHandle file, long offset, long length)
    {
        if (OperatingSystem.IsLinux())
        {
            _ = sync_file_range((int)file.DangerousGetHandle(), offset, length, SyncFileRangeWrite);
        }
    }

    /// <summary>
    /// Turns O_DIRECT on or off for <paramref name="file"/>: writes then go from the caller's buffer to the disk, not
    /// through the page cache, and must be aligned (buffer address, offset and length). False when not Linux on x64 or
    /// Arm64 (O_DIRECT's value differs by architecture) or the file system refuses.
    /// </summary>
    public static bool TrySetDirect(SafeFileHandle file, bool direct)
    {
        var flag = !OperatingSystem.IsLinux() ? 0 : RuntimeInformation.ProcessArchitecture switch
        {
            Architecture.X64 => 0x4000,
            Architecture.Arm64 => 0x10000,
            _ => 0,
        };
        if (flag == 0)
        {
            return false;
        }
        var fd = (int)file.DangerousGetHandle();
        var flags = fcntl(fd, FGetFl, 0);
        return flags >= 0 && fcntl(fd, FSetFl, direct ? flags | flag : flags & ~flag) == 0;
    }

    // fcntl is variadic in C; its third argument is an int here, passed as the fixed ones are on x64 and Arm64 Linux.
    [LibraryImport("libc", SetLastError = true)]
    private static partial int fcntl(int fd, int command, int argument);

    [LibraryImport("libc", SetLastError = true)]
    private static partial int sync_file_range(int fd, long offset, long length, uint flags);

    [LibraryImport("libc", SetLastError = true)]
    private static partial nint copy_file_range(int fdIn, ref long offIn, int fdOut, ref long offOut, nuint length, uint flags);
}
