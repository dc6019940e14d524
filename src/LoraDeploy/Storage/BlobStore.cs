using System.ComponentModel.DataAnnotations;
using System.Runtime.InteropServices;
using System.Text.RegularExpressions;

namespace LoraDeploy.Storage;

/// <summary>Settings section <c>Storage</c>.</summary>
public sealed class StorageOptions
{
    public const string Section = "Storage";

    /// <summary>Blob folder; replicas share one. Default <c>DATA_DIR/blobs</c>.</summary>
    public string? Path { get; set; }
}

public enum BlobPutResult
{
    /// <summary>The bytes are now stored under their hash.</summary>
    Stored,

    /// <summary>A blob with that hash was already there (same hash, same bytes); the staging file was discarded.</summary>
    AlreadyExists,
}

/// <summary>
/// Content-addressed blob store: <c>sha256/ab/abcd…</c>. Blobs are never overwritten; a blob appears only
/// complete (fsynced, renamed into place, folder fsynced), so a row can safely point at it afterwards.
/// </summary>
public interface IBlobStore
{
    /// <summary>A staging path on the same filesystem as the blobs (so the final move is an atomic rename).</summary>
    string StagingPath(string name);

    /// <summary>The staging files present now, with their last write time (for collecting abandoned ones).</summary>
    IEnumerable<(string Name, DateTime LastWriteUtc)> StagingFiles();

    /// <summary>Moves a verified staging file into place under <paramref name="sha256"/>.</summary>
    Task<BlobPutResult> PutAsync(string sha256, string stagingPath, CancellationToken ct);

    bool Exists(string sha256);

    /// <summary>The blob's local path (for header-only reads by the prober), or null when absent.</summary>
    string? LocalPath(string sha256);

    bool Delete(string sha256);
}

public sealed partial class FileSystemBlobStore : IBlobStore
{
    private readonly string _root;
    private readonly string _staging;

    public FileSystemBlobStore(string root)
    {
        _root = System.IO.Path.GetFullPath(root);
        _staging = System.IO.Path.Combine(_root, "staging");
        Directory.CreateDirectory(_staging);
    }

    [GeneratedRegex(@"^[0-9a-f]{64}\z")]
    private static partial Regex Sha256Hex();

    public string StagingPath(string name)
    {
        if (name.Contains('/') || name.Contains('\\') || name.Contains(".."))
        {
            throw new ArgumentException("Staging names are plain file names.", nameof(name));
        }
        return System.IO.Path.Combine(_staging, name);
    }

    public IEnumerable<(string Name, DateTime LastWriteUtc)> StagingFiles() =>
        new DirectoryInfo(_staging).EnumerateFiles().Select(f => (f.Name, f.LastWriteTimeUtc));

    public async Task<BlobPutResult> PutAsync(string sha256, string stagingPath, CancellationToken ct)
    {
        var target = PathOf(sha256);
        if (File.Exists(target))
        {
            File.Delete(stagingPath);
            return BlobPutResult.AlreadyExists;
        }
        await using (var staged = new FileStream(stagingPath, FileMode.Open, FileAccess.ReadWrite, FileShare.None))
        {
            staged.Flush(flushToDisk: true);
        }
        var folder = System.IO.Path.GetDirectoryName(target)!;
        Directory.CreateDirectory(folder);
        try
        {
            File.Move(stagingPath, target, overwrite: false);
        }
        catch (IOException) when (File.Exists(target))
        {
            File.Delete(stagingPath); // another writer stored the same hash first
            return BlobPutResult.AlreadyExists;
        }
        FsyncDirectory(folder);
        return BlobPutResult.Stored;
    }

    public bool Exists(string sha256) => File.Exists(PathOf(sha256));

    public string? LocalPath(string sha256)
    {
        var path = PathOf(sha256);
        return File.Exists(path) ? path : null;
    }

    public bool Delete(string sha256)
    {
        var path = PathOf(sha256);
        if (!File.Exists(path))
        {
            return false;
        }
        File.Delete(path);
        return true;
    }

    private string PathOf(string sha256)
    {
        if (!Sha256Hex().IsMatch(sha256))
        {
            throw new ArgumentException("A blob key is a lowercase SHA-256 hex digest.", nameof(sha256));
        }
        return System.IO.Path.Combine(_root, "sha256", sha256[..2], sha256);
    }

    /// <summary>Makes the rename itself durable: .NET has no API to fsync a directory, so ask libc.</summary>
    private static void FsyncDirectory(string folder)
    {
        if (!OperatingSystem.IsLinux() && !OperatingSystem.IsMacOS())
        {
            return;
        }
        var fd = Native.open(folder, Native.ORdOnly | (OperatingSystem.IsLinux() ? Native.ODirectoryLinux : 0));
        if (fd < 0)
        {
            return;
        }
        try
        {
            _ = Native.fsync(fd);
        }
        finally
        {
            _ = Native.close(fd);
        }
    }

    private static partial class Native
    {
        public const int ORdOnly = 0;
        public const int ODirectoryLinux = 0x10000;

        [LibraryImport("libc", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
        public static partial int open(string path, int flags);

        [LibraryImport("libc", SetLastError = true)]
        public static partial int fsync(int fd);

        [LibraryImport("libc")]
        public static partial int close(int fd);
    }
}

public static class StorageExtensions
{
    public static IServiceCollection AddBlobStorage(this IServiceCollection services, IConfiguration configuration)
    {
        services.AddOptions<StorageOptions>().BindConfiguration(StorageOptions.Section).ValidateOnStart();
        services.AddSingleton<IBlobStore>(_ =>
        {
            var configured = configuration.GetSection(StorageOptions.Section).Get<StorageOptions>()?.Path;
            var root = string.IsNullOrWhiteSpace(configured)
                ? System.IO.Path.Combine(DataDirectory.Get(configuration), "blobs")
                : configured;
            return new FileSystemBlobStore(root);
        });
        return services;
    }
}
