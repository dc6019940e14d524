using System.Diagnostics;
using System.Text.Json;
using LoraDeploy.Data;
using LoraDeploy.Lora;
using LoraDeploy.Lora.Safetensors;
using LoraDeploy.Sources;
using LoraDeploy.Storage;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Pipeline;

/// <summary>
/// Runs one claimed download: fetch into a staging file named after the download row (so whichever replica
/// holds the lease resumes the same bytes), verify the hash and the safetensors container, store the blob,
/// then mark the row done. Renews its lease while it works, publishes progress, and cancels itself when no
/// deploy waits for the file any more.
/// </summary>
public sealed partial class DownloadWorker(
    string owner,
    IDbContextFactory<LoraDeployDbContext> contexts,
    CivitaiDownloader downloader,
    IBlobStore blobs,
    PipelineMetrics metrics,
    IOptions<PipelineOptions> options,
    TimeProvider time,
    ILogger<DownloadWorker> logger)
{
    private DateTime Now => time.GetUtcNow().UtcDateTime;
    private TimeSpan Lease => options.Value.LeaseDuration;

    public async Task<bool> ClaimAsync(long downloadId, CancellationToken ct)
    {
        await using var db = await contexts.CreateDbContextAsync(ct);
        var now = Now;
        return await db.Downloads
            .Where(d => d.Id == downloadId && (d.Status == DownloadStatus.Pending || (d.Status == DownloadStatus.Downloading && d.LeaseExpiresAt < now)))
            .ExecuteUpdateAsync(set => set
                .SetProperty(d => d.Status, DownloadStatus.Downloading)
                .SetProperty(d => d.LeaseOwner, owner)
                .SetProperty(d => d.LeaseExpiresAt, now + Lease)
                .SetProperty(d => d.Attempts, d => d.Attempts + 1)
                .SetProperty(d => d.StartedAt, d => d.StartedAt ?? now)
                .SetProperty(d => d.StalledSince, (DateTime?)null)
                .SetProperty(d => d.UpdatedAt, now), ct) == 1;
    }

    public async Task RunAsync(long downloadId, CancellationToken stoppingToken)
    {
        await using var db = await contexts.CreateDbContextAsync(stoppingToken);
        var row = await db.Downloads.FirstAsync(d => d.Id == downloadId, stoppingToken);
        var file = JsonSerializer.Deserialize(row.ResolvedJson!, PipelineJsonContext.Default.ResolvedCivitaiFile)!;
        var staging = $"download-{downloadId}.part";
        // Every line names the deploys this shared download serves, so a user's deploy id finds them.
        var waiting = await db.ImportJobs.Where(j => j.DownloadId == downloadId && j.Status == ImportJobStatus.Importing)
            .Select(j => j.DeployId).ToListAsync(stoppingToken);
        using var scope = logger.BeginScope("Download {DownloadId} for deploys {DeployIds}", downloadId, string.Join(",", waiting));
        if (row.Attempts > options.Value.MaxDownloadStarts)
        {
            // Every earlier start ended without an outcome; whatever stops the worker would stop this one too.
            await EndAsync(db, downloadId, DownloadStatus.Failed, PipelineReasonClass.Internal,
                $"The download of CivitAI file {file.FileId} was started {row.Attempts - 1} times and each time its worker stopped without finishing (a crash or a restart; the server log has the details: search for download {downloadId}). Start the deploy again to retry.",
                null, stoppingToken);
            return;
        }

        // The deadline counts from the first start, so restarts and take-overs do not reset it.
        var deadline = options.Value.DownloadDeadline;
        var left = (row.StartedAt ?? Now) + deadline - Now;
        using var overdue = new CancellationTokenSource(left > TimeSpan.Zero ? left : TimeSpan.Zero, time);
        using var work = CancellationTokenSource.CreateLinkedTokenSource(stoppingToken, overdue.Token);
        var progress = new LatestProgress();
        var abandoned = false;
        var renewal = RenewWhileRunningAsync(downloadId, progress, () => { abandoned = true; work.Cancel(); }, work.Token);
        var clock = Stopwatch.StartNew();
        var startBytes = blobs.StagingLength(staging);
        LogStarting(downloadId, file.FileId, file.VersionId, startBytes);
        try
        {
            var result = await downloader.DownloadAsync(file, blobs, staging, progress, work.Token);
            metrics.BytesDownloaded(result.Bytes - startBytes);
            await work.CancelAsync();
            await renewal;
            await VerifyAndStoreAsync(db, downloadId, file, staging, result, stoppingToken);
            metrics.DownloadCompleted(clock.Elapsed);
        }
        catch (OperationCanceledException) when (abandoned)
        {
            await renewal;
            TryDelete(staging);
            await EndAsync(db, downloadId, DownloadStatus.Cancelled, "", "", null, CancellationToken.None);
            LogAbandoned(downloadId);
        }
        catch (OperationCanceledException) when (stoppingToken.IsCancellationRequested)
        {
            // Shutting down: keep the lease's row and the staging file; whoever claims it next resumes with Range.
            await renewal;
        }
        catch (OperationCanceledException) when (overdue.IsCancellationRequested)
        {
            await FailForGoodAsync(db, downloadId, staging, work, renewal, PipelineReasonClass.DownloadDeadline,
                $"The download of CivitAI file {file.FileId} did not finish within Pipeline:DownloadDeadline ({deadline}); {Math.Max(progress.Value, startBytes)} of about {file.ListedSizeBytes} bytes had arrived. The file host is too slow right now: start the deploy again later, or raise Pipeline:DownloadDeadline.");
        }
        catch (DownloadFailedException e)
        {
            await FailForGoodAsync(db, downloadId, staging, work, renewal, e.ReasonClass, e.FailReason);
        }
        catch (OutboundRequestRefusedException e)
        {
            await FailForGoodAsync(db, downloadId, staging, work, renewal, Sources.ReasonClass.Refused, e.Message);
        }
        catch (IOException e) when (IsDiskFull(e))
        {
            await FailForGoodAsync(db, downloadId, staging, work, renewal, PipelineReasonClass.DiskFull,
                $"The disk of the blob store ({blobs.Location}) is full ({e.Message}) after {progress.Value} bytes of CivitAI file {file.FileId}; the partial file was deleted. Free space there (or point Storage:Path at a bigger disk), then start the deploy again.");
        }
        finally
        {
            // Whatever ends the worker, even an exception nobody expected, the lease stops being renewed, so the
            // row is not held forever by a worker that is gone (it lapses and another worker takes over).
            await work.CancelAsync();
            await renewal.ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
        }
    }

    private static readonly HashSet<string> ResumableClasses =
        [Sources.ReasonClass.Network, Sources.ReasonClass.Upstream, Sources.ReasonClass.RateLimited, PipelineReasonClass.DownloadDeadline];

    /// <summary>ENOSPC (28) or EDQUOT (122): .NET on Linux puts the errno into the IOException's HResult.</summary>
    internal static bool IsDiskFull(IOException e) => OperatingSystem.IsLinux()
        ? e.HResult is 28 or 122
        : e.HResult is unchecked((int)0x80070070) or unchecked((int)0x80070027); // ERROR_DISK_FULL, ERROR_HANDLE_DISK_FULL

    /// <summary>
    /// Ends a download that will not be retried by itself. Its staging file goes at once (even an empty one), unless
    /// it holds bytes and the cause may pass (network, the host, a rate limit, the deadline): then it stays for
    /// Pipeline:BlobGracePeriod, so that starting the deploy again resumes with Range instead of starting over.
    /// </summary>
    private async Task FailForGoodAsync(LoraDeployDbContext db, long downloadId, string staging, CancellationTokenSource work, Task renewal, string failClass, string failReason)
    {
        await work.CancelAsync();
        await renewal;
        if (!(ResumableClasses.Contains(failClass) && blobs.StagingLength(staging) > 0))
        {
            TryDelete(staging);
        }
        await EndAsync(db, downloadId, DownloadStatus.Failed, failClass, failReason, null, CancellationToken.None);
    }

    private async Task VerifyAndStoreAsync(LoraDeployDbContext db, long downloadId, ResolvedCivitaiFile file, string staging, DownloadResult result, CancellationToken ct)
    {
        if (file.ListedSha256 is { } expected && !string.Equals(expected, result.Sha256, StringComparison.OrdinalIgnoreCase))
        {
            TryDelete(staging);
            await EndAsync(db, downloadId, DownloadStatus.Failed, PipelineReasonClass.HashMismatch,
                $"The downloaded bytes have SHA-256 {result.Sha256}, but CivitAI lists {expected} for file {file.FileId}; the file was not stored. It may have been replaced or corrupted on CivitAI's side: try again later or report it to the model's author.",
                null, ct);
            return;
        }
        try
        {
            // Validation only: the header's pooled tables go straight back.
            await using var staged = blobs.OpenStaging(staging);
            SafetensorsReader.Read(staged).Dispose();
        }
        catch (SafetensorsFormatException e)
        {
            TryDelete(staging);
            await EndAsync(db, downloadId, DownloadStatus.Failed, PipelineReasonClass.InvalidFile,
                $"CivitAI served file {file.FileId} but it is not a valid safetensors file ({e.Message}); it was not stored.", null, ct);
            return;
        }

        // Bytes first: the blob is complete, verified and durable before any row names it.
        if (await blobs.CommitStagingAsync(staging, result.Sha256, ct) == BlobPutResult.HashMismatch)
        {
            // The file changed under the download after it hashed it (another writer): nothing was stored.
            await EndAsync(db, downloadId, DownloadStatus.Failed, PipelineReasonClass.HashMismatch,
                $"The downloaded bytes of CivitAI file {file.FileId} changed on disk before they were stored (their SHA-256 is no longer {result.Sha256}); nothing was stored. Start the deploy again to fetch the file anew.",
                null, ct);
            return;
        }
        db.Blobs.Add(new Blob { Sha256 = result.Sha256, SizeBytes = result.Bytes, CreatedAt = Now });
        try
        {
            await db.SaveChangesAsync(ct);
        }
        catch (DbUpdateException e) when (db.IsUniqueViolation(e))
        {
            db.ChangeTracker.Clear(); // already recorded by an earlier import of the same bytes
        }
        await EndAsync(db, downloadId, DownloadStatus.Done, "", "", result.Sha256, ct, result.Bytes);
        LogStored(downloadId, result.Sha256, result.Bytes);
    }

    private async Task EndAsync(LoraDeployDbContext db, long downloadId, string status, string failClass, string failReason, string? blob, CancellationToken ct, long? bytes = null)
    {
        var now = Now;
        await db.Downloads.Where(d => d.Id == downloadId && d.LeaseOwner == owner && d.Status == DownloadStatus.Downloading)
            .ExecuteUpdateAsync(set => set
                .SetProperty(d => d.Status, status)
                .SetProperty(d => d.FailClass, failClass)
                .SetProperty(d => d.FailReason, failReason)
                .SetProperty(d => d.BlobSha256, blob)
                .SetProperty(d => d.BytesDone, d => bytes ?? d.BytesDone)
                .SetProperty(d => d.StalledSince, (DateTime?)null)
                .SetProperty(d => d.FetchedBy, d => status == DownloadStatus.Done ? owner : d.FetchedBy)
                .SetProperty(d => d.LeaseOwner, (string?)null)
                .SetProperty(d => d.LeaseExpiresAt, (DateTime?)null)
                .SetProperty(d => d.UpdatedAt, now), ct);
        if (status == DownloadStatus.Failed)
        {
            LogFailed(downloadId, failClass, failReason);
        }
    }

    /// <summary>
    /// Renews the lease and publishes progress (and since when no byte arrived, once that lasted
    /// Pipeline:StalledAfter); gives up the work when the lease is lost or nobody waits.
    /// </summary>
    private async Task RenewWhileRunningAsync(long downloadId, LatestProgress progress, Action abandon, CancellationToken ct)
    {
        var interval = TimeSpan.FromTicks(Math.Min(Lease.Ticks / 3, options.Value.ProgressInterval.Ticks));
        using var timer = new PeriodicTimer(interval, time);
        var lastBytes = progress.Value;
        var lastByteAt = Now;
        try
        {
            while (await timer.WaitForNextTickAsync(ct))
            {
                await using var db = await contexts.CreateDbContextAsync(ct);
                var now = Now;
                var bytes = progress.Value;
                if (bytes != lastBytes)
                {
                    lastBytes = bytes;
                    lastByteAt = now;
                }
                DateTime? stalledSince = now - lastByteAt >= options.Value.StalledAfter ? lastByteAt : null;
                var renewed = await db.Downloads.Where(d => d.Id == downloadId && d.LeaseOwner == owner)
                    .ExecuteUpdateAsync(set => set
                        .SetProperty(d => d.LeaseExpiresAt, now + Lease)
                        .SetProperty(d => d.BytesDone, d => bytes > d.BytesDone ? bytes : d.BytesDone)
                        .SetProperty(d => d.StalledSince, stalledSince)
                        .SetProperty(d => d.UpdatedAt, now), ct);
                var waiting = await db.ImportJobs.AnyAsync(j => j.DownloadId == downloadId && j.Status == ImportJobStatus.Importing, ct);
                if (renewed == 0 || !waiting)
                {
                    abandon();
                    return;
                }
            }
        }
        catch (OperationCanceledException)
        {
        }
    }

    private void TryDelete(string staging)
    {
        try
        {
            blobs.DeleteStaging(staging);
        }
        catch (IOException)
        {
        }
    }

    /// <summary>Keeps only the latest byte count; the renewal loop reads it (no callbacks on the hot path).</summary>
    private sealed class LatestProgress : IProgress<long>
    {
        private long _value;
        public long Value => Interlocked.Read(ref _value);
        public void Report(long value) => Interlocked.Exchange(ref _value, value);
    }

    [LoggerMessage(Level = LogLevel.Information, Message = "Download {DownloadId}: fetching CivitAI file {FileId} of version {VersionId} (resuming at byte {Offset})")]
    private partial void LogStarting(long downloadId, int fileId, int versionId, long offset);

    [LoggerMessage(Level = LogLevel.Information, Message = "Download {DownloadId}: stored blob {Sha256} ({Bytes} bytes)")]
    private partial void LogStored(long downloadId, string sha256, long bytes);

    [LoggerMessage(Level = LogLevel.Information, Message = "Download {DownloadId}: no deploy waits for it any more; cancelled and staging removed")]
    private partial void LogAbandoned(long downloadId);

    [LoggerMessage(Level = LogLevel.Warning, Message = "Download {DownloadId} failed ({ReasonClass}): {Reason}")]
    private partial void LogFailed(long downloadId, string reasonClass, string reason);
}
