using System.Security.Cryptography;

namespace LoraDeploy.Lora.Safetensors;

/// <summary>SHA-256 helpers for safetensors files; computed on demand because they read every byte.</summary>
public static class SafetensorsHashes
{
    /// <summary>Lower-case hex SHA-256 of the whole file.</summary>
    public static string FileSha256(string path)
    {
        using var file = File.OpenRead(path);
        return Convert.ToHexStringLower(SHA256.HashData(file));
    }

    /// <summary>
    /// Lower-case hex SHA-256 of the data section (the bytes after the header), as used by
    /// kohya's <c>sshs_model_hash</c> and ModelSpec's <c>modelspec.hash_sha256</c> (which adds a <c>0x</c> prefix).
    /// </summary>
    public static string DataSha256(string path, SafetensorsHeader header)
    {
        ArgumentNullException.ThrowIfNull(header);
        using var file = File.OpenRead(path);
        return DataSha256(file, header);
    }

    /// <summary>Lower-case hex SHA-256 of the data section of a seekable stream.</summary>
    public static string DataSha256(Stream file, SafetensorsHeader header)
    {
        ArgumentNullException.ThrowIfNull(file);
        ArgumentNullException.ThrowIfNull(header);
        using var data = new BoundedReadStream(file, header.DataOffset, header.DataLength);
        return Convert.ToHexStringLower(SHA256.HashData(data));
    }
}
