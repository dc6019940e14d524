using System.Runtime.InteropServices;

namespace LoraDeploy.Serving.ComfyUi;

/// <summary>
/// The folder ComfyUI reads LoRAs from (<c>BaseModels:{name}:ComfyUi:LoraFolder</c>, registered in its
/// <c>extra_model_paths.yaml</c>). Adapters are placed under their SHA-256 name, never half-written under it: a hard
/// link to the verified cache file when both are on one filesystem (no bytes copied, atomic), else a copy to
/// <c>.part</c>, fsynced and renamed (ComfyUI ignores <c>.part</c>). Pools sharing a folder share the files, counted.
/// </summary>
public sealed partial class LoraFolder(string path)
{
    private readonly Dictionary<string, int> _users = new(StringComparer.Ordinal);
    private readonly Lock _lock = new();

    public string Path { get; } = System.IO.Path.GetFullPath(path);

    /// <summary>False forces the copy path even on one filesystem (the placement benchmark compares both).</summary>
    public bool AllowHardLink { get; init; } = true;

    public static string FileName(string sha256) => $"{sha256}.safetensors";

    /// <summary>How the last placement went (for logs and the benchmark).</summary>
    public enum Placement
    {
        AlreadyThere,
        HardLinked,
        Copied,
    }

    /// <summary>Places the verified blob at <paramref name="source"/> as <c>{sha256}.safetensors</c>.</summary>
    public async Task<Placement> PlaceAsync(string sha256, string source, CancellationToken ct)
    {
        lock (_lock)
        {
            _users[sha256] = _users.GetValueOrDefault(sha256) + 1;
        }
        try
        {
            return await PlaceFileAsync(sha256, source, ct);
        }
        catch
        {
            Release(sha256);
            throw;
        }
    }

    /// <summary>Removes the file once no pool uses it any more.</summary>
    public void Remove(string sha256)
    {
        if (Release(sha256))
        {
            File.Delete(System.IO.Path.Combine(Path, FileName(sha256)));
        }
    }

    private bool Release(string sha256)
    {
        lock (_lock)
        {
            var left = _users.GetValueOrDefault(sha256) - 1;
            if (left > 0)
            {
                _users[sha256] = left;
                return false;
            }
            _users.Remove(sha256);
            return true;
        }
    }

    private async Task<Placement> PlaceFileAsync(string sha256, string source, CancellationToken ct)
    {
        var target = System.IO.Path.Combine(Path, FileName(sha256));
        var size = new FileInfo(source).Length;
        if (File.Exists(target))
        {
            if (new FileInfo(target).Length == size)
            {
                return Placement.AlreadyThere; // an earlier run (or another pool) placed it; names are content hashes
            }
            File.Delete(target); // a damaged leftover of an earlier run: never served
        }
        if (AllowHardLink && TryHardLink(source, target))
        {
            return Placement.HardLinked;
        }
        var part = target + $".{Guid.NewGuid():N}.part";
        try
        {
            await using (var from = new FileStream(source, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 20, useAsync: true))
            await using (var to = new FileStream(part, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20, useAsync: true))
            {
                await from.CopyToAsync(to, 1 << 20, ct);
                to.Flush(flushToDisk: true);
            }
            File.Move(part, target, overwrite: true); // the same bytes under the same name if another pool raced us
            return Placement.Copied;
        }
        finally
        {
            File.Delete(part);
        }
    }

    /// <summary>A hard link (Linux/macOS <c>link(2)</c>); false when not possible (another filesystem, Windows), so the caller copies.</summary>
    private static bool TryHardLink(string source, string target)
    {
        if (OperatingSystem.IsWindows())
        {
            return false;
        }
        if (Link(source, target) == 0)
        {
            return true;
        }
        // EEXIST: someone placed it between our check and now; it is the same content-addressed file.
        return Marshal.GetLastPInvokeError() == 17 && File.Exists(target);
    }

    [LibraryImport("libc", EntryPoint = "link", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int Link(string oldPath, string newPath);
}
