using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace LoraDeploy.Lora.Merge;

/// <summary>
/// Linux <c>copy_file_range(2)</c>: copies a byte range from one file to another inside the kernel, so untouched
/// tensors do not pass through user space (and on file systems that share extents, no bytes move at all).
/// </summary>
internal static partial class KernelFileCopy
{
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

    [LibraryImport("libc", SetLastError = true)]
    private static partial nint copy_file_range(int fdIn, ref long offIn, int fdOut, ref long offOut, nuint length, uint flags);
}
