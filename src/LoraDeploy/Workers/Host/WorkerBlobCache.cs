using System.Globalization;
using System.Net;
using System.Net.Http.Headers;
using System.Security.Cryptography;
using System.Text.RegularExpressions;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Workers.Host;

/// <summary>A blob the server's bytes do not match, or one that cannot fit: the adapter fails with this reason.</summary>
public sealed class BlobRefusedException(string message) : Exception(message);

/// <summary>
/// The worker's copy of adapter blobs, fetched from the server by SHA-256: <c>{cache}/{sha}</c> holds only verified
/// bytes; a download grows in <c>{cache}/partial/{sha}.part</c> and resumes there (Range) after a dropped connection or a
/// restart. Byte-bounded LRU: beyond <see cref="WorkerOptions.CacheBytes"/> the least recently used files that are
/// neither in use nor pinned are deleted. One download per blob at a time.
/// </summary>
public sealed partial class WorkerBlobCache
{
    public const string HttpClientName = "LoraDeploy.Worker";

    private readonly IHttpClientFactory _http;
    private readonly WorkerOptions _options;
    private readonly ILogger<WorkerBlobCache> _logger;
    private readonly string _root;
    private readonly string _partial;
    private readonly CancellationToken _stopping;
    private readonly TimeProvider _time;
    private readonly Lock _lock = new();
    private readonly Dictionary<string, Entry> _entries = new(StringComparer.Ordinal);
    private readonly Dictionary<string, Task> _downloads = new(StringComparer.Ordinal);
    private HashSet<string> _pinned = new(StringComparer.Ordinal);
    private long _totalBytes;
    private long _clock;

    /// <summary>A partial download nobody resumed for this long is deleted at start.</summary>
    public static readonly TimeSpan PartialFileLifetime = TimeSpan.FromDays(1);

    public WorkerBlobCache(IHttpClientFactory http, IOptions<WorkerOptions> options, IConfiguration configuration,
        IHostApplicationLifetime lifetime, TimeProvider time, ILogger<WorkerBlobCache> logger)
    {
        _time = time;
        _http = http;
        _options = options.Value;
        _logger = logger;
        _stopping = lifetime.ApplicationStopping;
        _root = Path.GetFullPath(_options.CachePath is { Length: > 0 } path ? path : Path.Combine(DataDirectory.Get(configuration), "worker-cache"));
        _partial = Path.Combine(_root, "partial");
        Directory.CreateDirectory(_partial);
        foreach (var stale in new DirectoryInfo(_partial).EnumerateFiles("*.part").Where(f => f.LastWriteTimeUtc < time.GetUtcNow().UtcDateTime - PartialFileLifetime))
        {
            stale.Delete();
        }
        // Files under their final name were verified before the rename: trust them, oldest first in the LRU.
        foreach (var file in new DirectoryInfo(_root).EnumerateFiles().Where(f => Sha256Hex().IsMatch(f.Name)).OrderBy(f => f.LastWriteTimeUtc))
        {
            _entries[file.Name] = new Entry(file.Length) { LastUse = ++_clock };
            _totalBytes += file.Length;
        }
    }

    [GeneratedRegex(@"^[0-9a-f]{64}\z")]
    internal static partial Regex Sha256Hex();

    public string Location => _root;

    /// <summary>Bytes of verified blobs held.</summary>
    public long TotalBytes
    {
        get
        {
            lock (_lock)
            {
                return _totalBytes;
            }
        }
    }

    public bool Contains(string sha256)
    {
        lock (_lock)
        {
            return _entries.ContainsKey(sha256);
        }
    }

    /// <summary>Blobs the server asked this worker to hold: never evicted while listed.</summary>
    public void SetPinned(IEnumerable<string> sha256s)
    {
        lock (_lock)
        {
            _pinned = new HashSet<string>(sha256s, StringComparer.Ordinal);
        }
    }

    /// <summary>
    /// The verified blob, fetched first if missing. The lease keeps the file from eviction until disposed.
    /// Throws <see cref="BlobRefusedException"/> for bytes that do not match (deleted) or a blob over the budget;
    /// <see cref="HttpRequestException"/>/<see cref="IOException"/> when the server cannot be reached.
    /// </summary>
    public async Task<BlobLease> AcquireAsync(string sha256, long? sizeBytes, CancellationToken ct)
    {
        if (!Sha256Hex().IsMatch(sha256))
        {
            throw new BlobRefusedException($"'{sha256}' is not a lowercase SHA-256 hex digest.");
        }
        if (sizeBytes > _options.CacheBytes)
        {
            throw new BlobRefusedException(
                $"the adapter is {sizeBytes} bytes, more than this worker's whole cache ({WorkerOptions.Section}:CacheBytes = {_options.CacheBytes}).");
        }
        while (true)
        {
            Task download;
            lock (_lock)
            {
                var path = Path.Combine(_root, sha256);
                if (_entries.TryGetValue(sha256, out var entry))
                {
                    if (File.Exists(path))
                    {
                        entry.InUse++;
                        entry.LastUse = ++_clock;
                        return new BlobLease(this, sha256, path);
                    }
                    // Deleted behind our back (someone cleaned the folder): forget it and fetch again.
                    _entries.Remove(sha256);
                    _totalBytes -= entry.Size;
                }
                if (!_downloads.TryGetValue(sha256, out download!))
                {
                    // Not tied to this caller: others may be waiting for the same bytes.
                    download = Task.Run(() => DownloadAsync(sha256, sizeBytes, _stopping), CancellationToken.None);
                    _downloads[sha256] = download;
                    _ = download.ContinueWith(_ => Forget(sha256), CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
                }
            }
            await download.WaitAsync(ct);
        }
    }

    private void Forget(string sha256)
    {
        lock (_lock)
        {
            _downloads.Remove(sha256);
        }
    }

    private void Release(string sha256)
    {
        lock (_lock)
        {
            if (_entries.TryGetValue(sha256, out var entry) && entry.InUse > 0)
            {
                entry.InUse--;
            }
            EvictOverBudget();
        }
    }

    private async Task DownloadAsync(string sha256, long? sizeBytes, CancellationToken ct)
    {
        var part = Path.Combine(_partial, sha256 + ".part");
        for (var attempt = 1; ; attempt++)
        {
            try
            {
                await FetchIntoAsync(sha256, part, sizeBytes, ct);
                break;
            }
            catch (Exception e) when (e is IOException or HttpRequestException && !ct.IsCancellationRequested && attempt < _options.FetchAttempts)
            {
                // A dropped connection: the next attempt asks for the rest (Range) of what is already in the .part file.
                _logger.LogWarning("Fetching blob {Sha256} stopped at {Bytes} bytes ({Reason}); resuming (attempt {Attempt} of {Attempts}).",
                    sha256, LengthOf(part), e.Message, attempt + 1, _options.FetchAttempts);
                await Task.Delay(TimeSpan.FromMilliseconds(Math.Min(5000, 200 * (1 << Math.Min(attempt, 5)))), _time, ct);
            }
        }

        var actual = await HashFileAsync(part, ct);
        if (!string.Equals(actual, sha256, StringComparison.Ordinal))
        {
            File.Delete(part);
            throw new BlobRefusedException($"the server's bytes for adapter {sha256} hash to {actual}; refused and deleted (the stored blob is damaged).");
        }
        var length = new FileInfo(part).Length;
        var final = Path.Combine(_root, sha256);
        File.Move(part, final, overwrite: true);
        lock (_lock)
        {
            // No eviction here: the waiters take their leases first; the next release evicts what is over budget.
            _entries[sha256] = new Entry(length) { LastUse = ++_clock };
            _totalBytes += length;
        }
        _logger.LogInformation("Fetched and verified blob {Sha256} ({Bytes} bytes).", sha256, length);
    }

    private async Task FetchIntoAsync(string sha256, string part, long? sizeBytes, CancellationToken ct)
    {
        var have = LengthOf(part);
        if (sizeBytes is { } size && have >= size)
        {
            return; // complete already (a restart between the last byte and the rename); verification decides
        }
        using var request = new HttpRequestMessage(HttpMethod.Get, string.Format(CultureInfo.InvariantCulture, WorkerProtocol.BlobPathFormat, sha256));
        if (have > 0)
        {
            request.Headers.Range = new RangeHeaderValue(have, null);
        }
        var client = _http.CreateClient(HttpClientName);
        using var response = await client.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, ct);
        if (response.StatusCode == HttpStatusCode.RequestedRangeNotSatisfiable)
        {
            // The .part file is not a prefix of what the server has: start over.
            File.Delete(part);
            throw new IOException("the server refused the resume range; starting over");
        }
        if (response.StatusCode == HttpStatusCode.NotFound)
        {
            throw new BlobRefusedException($"the server has no blob {sha256}.");
        }
        response.EnsureSuccessStatusCode();
        var append = response.StatusCode == HttpStatusCode.PartialContent;
        if (append && response.Content.Headers.ContentRange?.From != have)
        {
            File.Delete(part);
            throw new IOException($"the server resumed at byte {response.Content.Headers.ContentRange?.From}, not {have}; starting over");
        }
        var limit = sizeBytes ?? _options.CacheBytes;
        await using var body = await response.Content.ReadAsStreamAsync(ct);
        await using var file = new FileStream(part, append ? FileMode.Append : FileMode.Create, FileAccess.Write, FileShare.None, 81920, useAsync: true);
        var buffer = new byte[81920];
        int read;
        while ((read = await body.ReadAsync(buffer, ct)) > 0)
        {
            if (file.Position + read > limit)
            {
                file.Close();
                File.Delete(part);
                throw new BlobRefusedException($"the server sent more than the {limit} bytes expected for adapter {sha256}; refused and deleted.");
            }
            await file.WriteAsync(buffer.AsMemory(0, read), ct);
        }
        await file.FlushAsync(ct);
        file.Flush(flushToDisk: true);
    }

    private static async Task<string> HashFileAsync(string path, CancellationToken ct)
    {
        await using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 81920, useAsync: true);
        return Convert.ToHexStringLower(await SHA256.HashDataAsync(file, ct));
    }

    private static long LengthOf(string path) => File.Exists(path) ? new FileInfo(path).Length : 0;

    /// <summary>Deletes least recently used files until within budget; files in use or pinned stay (the cache may then stay over).</summary>
    private void EvictOverBudget()
    {
        while (_totalBytes > _options.CacheBytes)
        {
            var victim = _entries.Where(e => e.Value.InUse == 0 && !_pinned.Contains(e.Key)).MinBy(e => e.Value.LastUse);
            if (victim.Key is null)
            {
                _logger.LogWarning("Blob cache holds {Bytes} bytes, over its budget of {Budget}, but every file is in use or pinned.",
                    _totalBytes, _options.CacheBytes);
                return;
            }
            try
            {
                File.Delete(Path.Combine(_root, victim.Key));
            }
            catch (IOException e)
            {
                _logger.LogWarning("Could not delete cached blob {Sha256}: {Reason}", victim.Key, e.Message);
            }
            _entries.Remove(victim.Key);
            _totalBytes -= victim.Value.Size;
            _logger.LogInformation("Evicted blob {Sha256} ({Bytes} bytes) from the cache.", victim.Key, victim.Value.Size);
        }
    }

    private sealed class Entry(long size)
    {
        public long Size { get; } = size;
        public long LastUse { get; set; }
        public int InUse { get; set; }
    }

    /// <summary>A verified blob held for use; disposing lets the LRU evict it again.</summary>
    public sealed class BlobLease(WorkerBlobCache cache, string sha256, string path) : IDisposable
    {
        private int _disposed;

        public string Path { get; } = path;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) == 0)
            {
                cache.Release(sha256);
            }
        }
    }
}
