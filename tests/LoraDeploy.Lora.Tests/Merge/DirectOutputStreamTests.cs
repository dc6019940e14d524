using System.Runtime.InteropServices;
using LoraDeploy.Lora.Merge;
using LoraDeploy.Lora.Tests.Support;

namespace LoraDeploy.Lora.Tests.Merge;

/// <summary>
/// The merge's O_DIRECT output: pieces of any size, across several staging buffers, with an unaligned tail and writes
/// after a flush, land in the file in order.
/// </summary>
public sealed class DirectOutputStreamTests : IDisposable
{
    private readonly string _dir = TempFiles.Directory();

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void Pieces_of_odd_sizes_across_several_buffers_arrive_in_order()
    {
        var path = Path.Combine(_dir, "out.part");
        var expected = new byte[(19 << 20) + 12345];
        new Random(5).NextBytes(expected);
        int[] sizes = [1, 4095, (3 << 20) + 7, 8 << 20, 100, 5 << 20, 17];
        using (var stream = DirectOutputStream.Create(path))
        {
            Assert.SkipUnless(stream is DirectOutputStream, "O_DIRECT is not available here, so the merge writes through a FileStream");
            Assert.Contains("O_DIRECT", OpenFlags(path));
            var written = 0;
            for (var i = 0; written < expected.Length; i++)
            {
                var size = Math.Min(sizes[i % sizes.Length], expected.Length - written);
                stream.Write(expected.AsSpan(written, size));
                written += size;
                if (i == 3)
                {
                    // A flush midway leaves the file position unaligned: later writes still land right after it.
                    stream.Flush();
                }
            }
            ((DirectOutputStream)stream).FlushToDisk();
        }

        Assert.True(expected.AsSpan().SequenceEqual(File.ReadAllBytes(path)), "the file differs from what was written");
    }

    /// <summary>"O_DIRECT" when the open file at <paramref name="path"/> has it in /proc/self/fdinfo (flags in octal).</summary>
    private static string OpenFlags(string path)
    {
        foreach (var fd in Directory.GetFiles("/proc/self/fd"))
        {
            var target = new FileInfo(fd).LinkTarget;
            if (target == path)
            {
                var flags = File.ReadLines($"/proc/self/fdinfo/{Path.GetFileName(fd)}").First(l => l.StartsWith("flags:", StringComparison.Ordinal));
                var direct = RuntimeInformation.ProcessArchitecture == Architecture.Arm64 ? 0x10000 : 0x4000;
                return (Convert.ToInt64(flags["flags:".Length..].Trim(), 8) & direct) != 0 ? "O_DIRECT" : flags;
            }
        }
        return "not open";
    }
}
