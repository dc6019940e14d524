using System.Buffers.Binary;
using System.Text;

namespace LoraDeploy.Lora;

/// <summary>
/// Names what a file is from its first bytes when it is not a safetensors file (a pickle checkpoint, a zip, an HTML
/// page, a GGUF model …), so a user hears "this is a pickle" rather than the reader's "header length 85966670672
/// exceeds the limit".
/// </summary>
public static class AdapterFileKind
{
    /// <summary>How many leading bytes <see cref="Describe"/> looks at.</summary>
    public const int HeadLength = 512;

    /// <summary>
    /// What the file that starts with <paramref name="head"/> is, as a phrase to follow "… is" (e.g. "a PickleTensor
    /// (pickle) file, which can run code when loaded; only safetensors are read"), or null when it starts like a
    /// safetensors file or like nothing we know; the safetensors reader's own message applies then.
    /// </summary>
    public static string? Describe(ReadOnlySpan<byte> head)
    {
        if (head.Length == 0)
        {
            return "empty";
        }
        if (LooksLikeSafetensors(head))
        {
            return null;
        }
        // Pickle protocol 2-5 starts with PROTO (0x80) and its version: torch.save's legacy .ckpt/.pt/.bin format.
        if (head.Length >= 2 && head[0] == 0x80 && head[1] is >= 2 and <= 5)
        {
            return "a PickleTensor (pickle) file, which can run code when loaded; only safetensors are read";
        }
        if (head.StartsWith("PK\x03\x04"u8))
        {
            // torch.save's zip format holds "<name>/data.pkl": a pickle inside a zip.
            return head.IndexOf("data.pkl"u8) >= 0
                ? "a PyTorch checkpoint (a zip with a pickle inside), which can run code when loaded; only safetensors are read"
                : "a zip archive; unpack it and inspect the .safetensors file inside";
        }
        if (head.StartsWith("GGUF"u8))
        {
            return "a GGUF file (llama.cpp's format), not a safetensors file; only safetensors are read";
        }
        if (head.StartsWith((ReadOnlySpan<byte>)[0x1f, 0x8b]))
        {
            return "a gzip archive; unpack it and inspect the .safetensors file inside";
        }
        if (head.StartsWith((ReadOnlySpan<byte>)[(byte)'7', (byte)'z', 0xbc, 0xaf, 0x27, 0x1c]) || head.StartsWith("Rar!"u8))
        {
            return "a 7z or RAR archive; unpack it and inspect the .safetensors file inside";
        }
        if (head.StartsWith((ReadOnlySpan<byte>)[0x89, (byte)'P', (byte)'N', (byte)'G']) || head.StartsWith((ReadOnlySpan<byte>)[0xff, 0xd8, 0xff]) || head.StartsWith("RIFF"u8) || head.StartsWith("GIF8"u8))
        {
            return "an image, not a safetensors file (a model's preview image saved instead of the file?)";
        }
        var text = head.TrimStart((ReadOnlySpan<byte>)[(byte)' ', (byte)'\t', (byte)'\r', (byte)'\n', 0xef, 0xbb, 0xbf]); // whitespace and a UTF-8 BOM
        if (text.Length > 0 && text[0] == (byte)'<')
        {
            var start = Encoding.ASCII.GetString(text[..Math.Min(text.Length, 64)]).ToLowerInvariant();
            return start.StartsWith("<?xml", StringComparison.Ordinal) && !start.Contains("<html", StringComparison.Ordinal)
                ? "an XML document, not a safetensors file"
                : "an HTML page, not a safetensors file (often a login or error page saved instead of the file)";
        }
        if (text.Length > 0 && text[0] is (byte)'{' or (byte)'[')
        {
            return "a JSON document, not a safetensors file";
        }
        return null;
    }

    /// <summary>
    /// safetensors starts with an 8-byte little-endian header length the reader accepts, then the JSON header's '{'
    /// (the downloader checks a file's first bytes with this before fetching the rest).
    /// </summary>
    public static bool LooksLikeSafetensors(ReadOnlySpan<byte> head)
    {
        if (head.Length < 9)
        {
            return false;
        }
        var headerLength = BinaryPrimitives.ReadUInt64LittleEndian(head);
        return headerLength is >= 2 and <= (ulong)Safetensors.SafetensorsReader.MaxHeaderLength && head[8] == (byte)'{';
    }

    /// <summary>Reads the first <see cref="HeadLength"/> bytes of a file and describes it (see <see cref="Describe"/>).</summary>
    public static string? DescribeFile(string path)
    {
        using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 0);
        var head = new byte[HeadLength];
        var read = file.ReadAtLeast(head, head.Length, throwOnEndOfStream: false);
        return Describe(head.AsSpan(0, read));
    }
}
