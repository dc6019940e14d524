using System.Buffers;
using System.ComponentModel.DataAnnotations;
using System.Security.Cryptography;
using System.Runtime.InteropServices;
using System.Text.RegularExpressions;
using Amazon.S3;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Storage;

public enum StorageProvider
{
    /// <summary>A folder (<c>Storage:Path</c>); replicas share it.</summary>
    Filesystem,

    /// <summary>An S3-compatible bucket (<c>Storage:S3:*</c>); replicas need no shared folder.</summary>
    S3,
}

/// <summary>Settings section <c>Storage</c>.</summary>
public sealed class StorageOptions
{
    public const string Section = "Storage";

    /// <summary><c>filesystem</c> (default) or <c>s3</c>.</summary>
    public StorageProvider Provider { get; set; } = StorageProvider.Filesystem;

    /// <summary>Blob folder; replicas share one. Default <c>DATA_DIR/blobs</c>. With S3 only the local staging folder lives here.</summary>
    public string? Path { get; set; }

    /// <summary>Settings section <c>Storage:S3</c>, read when <see cref="Provider"/> is <c>s3</c>.</summary>
    public S3StorageOptions S3 { get; set; } = new();
}

public enum BlobPutResult
{
    /// <summary>The bytes are now stored under their hash.</summary>
    Stored,

    /// <summary>A blob with that hash was already there (same hash, same bytes); the new bytes were discarded.</summary>
    AlreadyExists,

    /// <summary>The bytes do not hash to the given SHA-256; nothing was stored and the bytes were discarded.</summary>
    HashMismatch,
}

/// <summary>
/// Content-addressed blob store: blobs are read and written as streams under their SHA-256, never by path. Blobs
/// are never overwritten; a blob appears only complete and verified (fsynced, renamed into place, folder fsynced),
/// so a row can safely point at it afterwards. Staging files are named partial writes (resumable downloads) that
/// become blobs through <see cref="CommitStagingAsync"/>.
/// </summary>
public interface IBlobStore
{
    /// <summary>Where the store keeps its bytes, for messages to people only (e.g. which disk is full).</summary>
    string Location { get; }

    /// <summary>
    /// Opens the blob for reading: seekable, positions relative to <paramref name="offset"/>, at most
    /// <paramref name="length"/> bytes (to the end when null). Null when no such blob exists.
    /// </summary>
    Task<Stream?> OpenReadAsync(string sha256, long offset = 0, long? length = null, CancellationToken ct = default);

    /// <summary>
    /// Stores <paramref name="content"/> under <paramref name="sha256"/>, hashing as it writes; the blob appears only
    /// when the bytes match. An existing blob is never overwritten.
    /// </summary>
    Task<BlobPutResult> PutAsync(string sha256, Stream content, CancellationToken ct = default);

    bool Exists(string sha256);

    bool Delete(string sha256);

    /// <summary>
    /// Opens (creating when absent) the staging file <paramref name="name"/> for reading and writing, exclusively,
    /// so a download resumes the bytes an earlier process left there.
    /// </summary>
    Stream OpenStaging(string name);

    /// <summary>The staging file's length, 0 when there is none.</summary>
    long StagingLength(string name);

    /// <summary>The staging files present now, with their last write time (for collecting abandoned ones).</summary>
    IEnumerable<(string Name, DateTime LastWriteUtc)> StagingFiles();

    /// <summary>Makes the staging file the blob <paramref name="sha256"/> after verifying its bytes; the staging file is gone afterwards.</summary>
    Task<BlobPutResult> CommitStagingAsync(string name, string sha256, CancellationToken ct = default);

    bool DeleteStaging(string name);
}

public sealed partial class FileSystemBlobStore : IBlobStore
{
    private const int CopyBufferSize = 1024 * 1024;

    private readonly string _root;
    private readonly StagingFolder _staging;

    public FileSystemBlobStore(string root)
    {
        _root = System.IO.Path.GetFullPath(root);
        _staging = new StagingFolder(System.IO.Path.Combine(_root, "staging"));
    }

    public string Location => _root;

    [GeneratedRegex(@"^[0-9a-f]{64}\z")]
    internal static partial Regex Sha256Hex();

    public Task<Stream?> OpenReadAsync(string sha256, long offset = 0, long? length = null, CancellationToken ct = default)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        if (length is { } l)
        {
            ArgumentOutOfRangeException.ThrowIfNegative(l, nameof(length));
        }
        ct.ThrowIfCancellationRequested();
        FileStream file;
        try
        {
            // Unbuffered: readers either copy with their own large buffer or make small positioned reads (the prober).
            file = new FileStream(PathOf(sha256), FileMode.Open, FileAccess.Read, FileShare.Read | FileShare.Delete, bufferSize: 0, FileOptions.Asynchronous);
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            return Task.FromResult<Stream?>(null);
        }
        if (offset == 0 && (length is null || length >= file.Length))
        {
            return Task.FromResult<Stream?>(file);
        }
        var start = Math.Min(offset, file.Length);
        var end = length is { } len ? Math.Min(file.Length, start + len) : file.Length;
        return Task.FromResult<Stream?>(new RangeStream(file, start, end - start));
    }

    public async Task<BlobPutResult> PutAsync(string sha256, Stream content, CancellationToken ct = default)
    {
        var target = PathOf(sha256);
        if (File.Exists(target))
        {
            return BlobPutResult.AlreadyExists;
        }
        var temp = _staging.PathOf($"put-{Guid.NewGuid():N}.tmp");
        try
        {
            using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
            await using (var output = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, bufferSize: 0, FileOptions.Asynchronous))
            {
                var buffer = ArrayPool<byte>.Shared.Rent(CopyBufferSize);
                try
                {
                    int n;
                    while ((n = await content.ReadAsync(buffer.AsMemory(0, CopyBufferSize), ct).ConfigureAwait(false)) > 0)
                    {
                        hash.AppendData(buffer, 0, n);
                        await output.WriteAsync(buffer.AsMemory(0, n), ct).ConfigureAwait(false);
                    }
                }
                finally
                {
                    ArrayPool<byte>.Shared.Return(buffer);
                }
            }
            if (!string.Equals(Convert.ToHexStringLower(hash.GetHashAndReset()), sha256, StringComparison.Ordinal))
            {
                File.Delete(temp);
                return BlobPutResult.HashMismatch;
            }
            return MoveIntoPlace(temp, target);
        }
        catch
        {
            TryDeleteFile(temp);
            throw;
        }
    }

    public bool Exists(string sha256) => File.Exists(PathOf(sha256));

    public bool Delete(string sha256) => DeleteIfPresent(PathOf(sha256));

    public Stream OpenStaging(string name) => _staging.Open(name);

    public long StagingLength(string name) => _staging.Length(name);

    public IEnumerable<(string Name, DateTime LastWriteUtc)> StagingFiles() => _staging.Files();

    /// <summary>
    /// Verifies rather than trusts the caller's hash: it reads the bytes back once (from the page cache, just written),
    /// which is what lets the store promise that a blob's bytes match its name, whatever wrote the staging file
    /// (a resumed download hashes a prefix an earlier process left, and replicas share the staging folder).
    /// </summary>
    public async Task<BlobPutResult> CommitStagingAsync(string name, string sha256, CancellationToken ct = default)
    {
        var staged = _staging.PathOf(name);
        var target = PathOf(sha256);
        if (File.Exists(target))
        {
            File.Delete(staged);
            return BlobPutResult.AlreadyExists;
        }
        string actual;
        await using (var file = new FileStream(staged, FileMode.Open, FileAccess.Read, FileShare.None, bufferSize: 0, FileOptions.Asynchronous))
        {
            actual = Convert.ToHexStringLower(await SHA256.HashDataAsync(file, ct).ConfigureAwait(false));
        }
        if (!string.Equals(actual, sha256, StringComparison.Ordinal))
        {
            File.Delete(staged);
            return BlobPutResult.HashMismatch;
        }
        return MoveIntoPlace(staged, target);
    }

    public bool DeleteStaging(string name) => _staging.Delete(name);

    private static bool DeleteIfPresent(string path)
    {
        if (!File.Exists(path))
        {
            return false;
        }
        File.Delete(path);
        return true;
    }

    /// <summary>fsyncs the verified file and renames it into place (never over an existing blob), then fsyncs the folder.</summary>
    private static BlobPutResult MoveIntoPlace(string source, string target)
    {
        using (var file = new FileStream(source, FileMode.Open, FileAccess.ReadWrite, FileShare.None, bufferSize: 0))
        {
            file.Flush(flushToDisk: true);
        }
        var folder = System.IO.Path.GetDirectoryName(target)!;
        Directory.CreateDirectory(folder);
        try
        {
            File.Move(source, target, overwrite: false);
        }
        catch (IOException) when (File.Exists(target))
        {
            File.Delete(source); // another writer stored the same hash first
            return BlobPutResult.AlreadyExists;
        }
        FsyncDirectory(folder);
        return BlobPutResult.Stored;
    }

    private static void TryDeleteFile(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (IOException)
        {
            // Best effort: the staging collector removes leftovers after the grace period.
        }
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
        services.AddSingleton<IValidateOptions<StorageOptions>, S3StorageOptions.Validation>();
        services.AddSingleton<IBlobStore>(sp =>
        {
            var options = sp.GetRequiredService<IOptions<StorageOptions>>().Value;
            var root = string.IsNullOrWhiteSpace(options.Path)
                ? System.IO.Path.Combine(DataDirectory.Get(configuration), "blobs")
                : options.Path;
            return options.Provider switch
            {
                // Staging stays local: a resumable download needs a file it can append to.
                StorageProvider.S3 => new S3BlobStore(
                    sp.GetRequiredService<IAmazonS3>(), options.S3,
                    new StagingFolder(System.IO.Path.Combine(root, "staging")), sp.GetRequiredService<ILogger<S3BlobStore>>()),
                _ => new FileSystemBlobStore(root),
            };
        });
        // The SDK client owns a connection pool: one per process, disposed with the container.
        services.AddSingleton(sp => S3BlobStore.CreateClient(sp.GetRequiredService<IOptions<StorageOptions>>().Value.S3));
        return services;
    }
}
