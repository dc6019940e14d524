using System.Data.Common;
using LoraDeploy.BaseModels;
using LoraDeploy.Data;
using LoraDeploy.Lora.Merge;
using LoraDeploy.Pipeline;
using LoraDeploy.Storage;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Exports;

/// <summary>
/// Runs export jobs: claims queued (or abandoned) rows with a lease, copies the adapter out of the blob store next to
/// the output, merges it into the base weights while writing progress to the row and renewing the lease, then records
/// the file's size and SHA-256. The database is the queue, as for imports: any replica with the base weights can run
/// it, and a crash leaves a running row whose lease lapses, so the job is claimed again (its file only ever appears
/// complete). Finished exports are deleted after the retention: file first, then row.
/// </summary>
public sealed partial class ExportRunner(
    IDbContextFactory<LoraDeployDbContext> contexts,
    IBlobStore blobs,
    ExportFiles files,
    BaseModelRegistry baseModels,
    ExportSignal signal,
    IOptions<ExportOptions> options,
    TimeProvider time,
    ILogger<ExportRunner> logger) : BackgroundService
{
    private readonly string _owner = $"{Environment.MachineName}:{Environment.ProcessId}:{Guid.NewGuid().ToString("N")[..6]}";
    private readonly RunningTasks<string> _running = new();
    private ExportOptions Options => options.Value;
    private DateTime Now => time.GetUtcNow().UtcDateTime;

    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        if (!Options.Enabled)
        {
            logger.LogInformation("Export runner disabled (Exports:Enabled=false)");
            return;
        }
        await Task.Yield();
        var nextCollection = Now;
        while (!stoppingToken.IsCancellationRequested)
        {
            try
            {
                var started = await StartJobsAsync(stoppingToken);
                if (Now >= nextCollection)
                {
                    nextCollection = Now + CollectInterval;
                    await CollectExpiredAsync(stoppingToken);
                    await CollectOrphansAsync(stoppingToken);
                }
                if (!started)
                {
                    await signal.WaitAsync(Options.PollInterval, time, stoppingToken);
                }
            }
            catch (OperationCanceledException) when (stoppingToken.IsCancellationRequested)
            {
                break;
            }
            catch (Exception e)
            {
                logger.LogError(e, "Export runner pass failed; retrying after the poll interval");
                await signal.WaitAsync(Options.PollInterval, time, stoppingToken);
            }
        }
        // Merges stop with the host; their rows keep their leases, so a restart (or another replica) runs them again.
        await _running.WhenAll().ContinueWith(_ => { }, CancellationToken.None, TaskContinuationOptions.None, TaskScheduler.Default);
    }

    private TimeSpan CollectInterval => TimeSpan.FromTicks(Math.Min(Options.Retention.Ticks / 4, TimeSpan.FromMinutes(5).Ticks));

    private async Task<bool> StartJobsAsync(CancellationToken ct)
    {
        var free = Options.MaxConcurrentJobs - _running.Count;
        if (free <= 0)
        {
            return false;
        }
        var claimed = await ClaimAsync(free, ct);
        foreach (var id in claimed)
        {
            _running.TryStart(id, async () =>
            {
                try
                {
                    await RunAsync(id, ct);
                }
                catch (Exception e) when (!ct.IsCancellationRequested)
                {
                    logger.LogError(e, "Export {ExportId} crashed; its lease will expire and it will be run again", id);
                }
            }, signal.Wake);
        }
        return claimed.Count > 0;
    }

    /// <summary>
    /// Claims queued jobs and running ones whose lease lapsed. PostgreSQL claims in one statement with
    /// <c>FOR UPDATE SKIP LOCKED</c>, so replicas split the queue; SQLite (one writer) claims row by row with a
    /// conditional update. Either way a job is claimed once.
    /// </summary>
    private async Task<List<string>> ClaimAsync(int limit, CancellationToken ct)
    {
        await using var db = await contexts.CreateDbContextAsync(ct);
        var now = Now;
        var until = now + Options.LeaseDuration;
        if (db is PostgresLoraDeployContext)
        {
            return await db.Database.SqlQuery<string>($"""
                UPDATE export_jobs
                SET "Status" = {ExportJobStatus.Running}, "LeaseOwner" = {_owner}, "LeaseExpiresAt" = {until},
                    "Attempts" = "Attempts" + 1, "StartedAt" = COALESCE("StartedAt", {now})
                WHERE "Id" IN (
                    SELECT "Id" FROM export_jobs
                    WHERE "Status" IN ({ExportJobStatus.Queued}, {ExportJobStatus.Running})
                      AND ("Status" = {ExportJobStatus.Queued} OR "LeaseExpiresAt" < {now})
                    ORDER BY "CreatedAt"
                    LIMIT {limit}
                    FOR UPDATE SKIP LOCKED)
                RETURNING "Id" AS "Value"
                """).ToListAsync(ct);
        }
        var candidates = await db.ExportJobs
            .Where(j => (j.Status == ExportJobStatus.Queued || j.Status == ExportJobStatus.Running)
                && (j.Status == ExportJobStatus.Queued || j.LeaseExpiresAt < now))
            .OrderBy(j => j.CreatedAt)
            .Select(j => j.Id)
            .Take(limit)
            .ToListAsync(ct);
        var claimed = new List<string>(candidates.Count);
        foreach (var id in candidates)
        {
            var won = await db.ExportJobs
                .Where(j => j.Id == id && (j.Status == ExportJobStatus.Queued || (j.Status == ExportJobStatus.Running && j.LeaseExpiresAt < now)))
                .ExecuteUpdateAsync(set => set
                    .SetProperty(j => j.Status, ExportJobStatus.Running)
                    .SetProperty(j => j.LeaseOwner, _owner)
                    .SetProperty(j => j.LeaseExpiresAt, until)
                    .SetProperty(j => j.Attempts, j => j.Attempts + 1)
                    .SetProperty(j => j.StartedAt, j => j.StartedAt ?? now), ct);
            if (won == 1)
            {
                claimed.Add(id);
            }
        }
        return claimed;
    }

    /// <summary>This runner's claim on a job: gone when the job was deleted or another runner took it over.</summary>
    private IQueryable<ExportJob> Owned(LoraDeployDbContext db, string id) =>
        db.ExportJobs.Where(j => j.Id == id && j.Status == ExportJobStatus.Running && j.LeaseOwner == _owner);

    private async Task RunAsync(string id, CancellationToken stoppingToken)
    {
        using var scope = logger.BeginScope("Export {ExportId}", id);
        ExportJob job;
        string? fileName;
        await using (var db = await contexts.CreateDbContextAsync(stoppingToken))
        {
            var row = await db.ExportJobs.Where(j => j.Id == id).Select(j => new { Job = j, j.Lora!.FileName }).FirstOrDefaultAsync(stoppingToken);
            if (row is null)
            {
                return;
            }
            (job, fileName) = (row.Job, row.FileName);
        }
        if (job.Attempts > Options.MaxStarts)
        {
            await FailAsync(id, $"The export was started {job.Attempts - 1} times and its runner stopped each time before finishing (see the server log); ask for a new export to try again.", CancellationToken.None);
            return;
        }
        var exportBase = ExportBase.Of(baseModels.Find(job.BaseModel));
        if (exportBase is null || exportBase.Format != job.Format)
        {
            await FailAsync(id, exportBase is null
                ? ExportBase.Missing(job.BaseModel)
                : $"Base model '{job.BaseModel}' changed on this server since the export was asked for (its base is now {exportBase.Format}, not {job.Format}); ask for a new export.",
                CancellationToken.None);
            return;
        }

        using var work = CancellationTokenSource.CreateLinkedTokenSource(stoppingToken);
        var progress = new LatestProgress();
        var reporting = ReportProgressAsync(id, progress, work);
        // This start's own files; whatever dead starts left goes (a start still running without its lease fails its rename).
        var attempt = job.Attempts;
        files.DeleteOtherAttempts(id, attempt);
        var output = files.OutputPath(id, attempt, job.Format);
        try
        {
            LogStarted(id, job.BaseModel, job.Attempts);
            var adapterPath = files.AdapterPath(id, attempt, fileName, job.Format);
            if (!await CopyAdapterAsync(job.AdapterSha256, adapterPath, work.Token))
            {
                await FailAsync(id, $"The adapter {job.AdapterSha256} is no longer stored on this server (its LoRA was deleted?); nothing was merged.", CancellationToken.None);
                return;
            }
            var mergeOptions = new MergeOptions { OutputDtype = DtypeOf(job.Dtype), Progress = progress, TimeProvider = time };
            var merged = await Task.Run(() => exportBase.Merge(new MergeAdapter(adapterPath, job.Strength), output, mergeOptions, work.Token), work.Token);
            files.DeleteAdapter(id, attempt);
            var sha256 = await ExportFiles.Sha256Async(output, work.Token);
            await work.CancelAsync();
            await reporting;
            var last = progress.Latest;
            await using var db = await contexts.CreateDbContextAsync(CancellationToken.None);
            var now = Now;
            var done = await Owned(db, id).ExecuteUpdateAsync(set => set
                .SetProperty(j => j.Status, ExportJobStatus.Done)
                .SetProperty(j => j.TensorsDone, last?.TensorsDone ?? 0)
                .SetProperty(j => j.TensorsTotal, last?.TensorCount ?? 0)
                .SetProperty(j => j.BytesDone, merged.BytesWritten)
                .SetProperty(j => j.BytesTotal, merged.BytesWritten)
                .SetProperty(j => j.OutputBytes, merged.BytesWritten)
                .SetProperty(j => j.OutputSha256, sha256)
                .SetProperty(j => j.LeaseOwner, (string?)null)
                .SetProperty(j => j.LeaseExpiresAt, (DateTime?)null)
                .SetProperty(j => j.FinishedAt, now), CancellationToken.None);
            if (done == 0)
            {
                // Deleted (or taken over) while it ran: the file belongs to no row.
                files.DeleteAttempt(id, attempt);
                return;
            }
            LogDone(id, merged.BytesWritten, merged.TensorsMerged, merged.Elapsed.TotalSeconds);
        }
        catch (LoraMergeException e)
        {
            files.DeleteAttempt(id, attempt);
            await FailAsync(id, $"The merge was refused: {e.Message}", CancellationToken.None);
        }
        catch (OperationCanceledException) when (work.IsCancellationRequested)
        {
            // The job was deleted or taken over (nothing of it to keep), or the host is stopping: then it goes back to
            // the queue at once, not counted as a start, for this host after its restart or for another replica.
            files.DeleteAttempt(id, attempt);
            if (stoppingToken.IsCancellationRequested)
            {
                await RequeueAsync(id);
            }
        }
        catch (IOException e)
        {
            files.DeleteAttempt(id, attempt);
            await FailAsync(id, $"Writing to the exports folder failed: {e.Message}; nothing was kept. Ask for a new export once there is room.", CancellationToken.None);
        }
        catch (Exception e)
        {
            logger.LogError(e, "Export {ExportId} failed", id);
            files.DeleteAttempt(id, attempt);
            await FailAsync(id, "LoraDeploy hit an internal error while merging; the server log has the details (search for the export id). Ask for a new export to try again.", CancellationToken.None);
        }
        finally
        {
            await work.CancelAsync();
            await reporting;
        }
    }

    private async Task<bool> CopyAdapterAsync(string sha256, string path, CancellationToken ct)
    {
        await using var source = await blobs.OpenReadAsync(sha256, ct: ct);
        if (source is null)
        {
            return false;
        }
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        await using var target = new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.None, bufferSize: 0, FileOptions.Asynchronous);
        await source.CopyToAsync(target, 1 << 20, ct);
        return true;
    }

    /// <summary>
    /// Writes the merge's latest progress to the row every progress interval, renewing the lease with it. A job that
    /// is no longer this runner's (deleted, or taken over after a stall) cancels the merge.
    /// </summary>
    private async Task ReportProgressAsync(string id, LatestProgress progress, CancellationTokenSource work)
    {
        try
        {
            using var timer = new PeriodicTimer(Options.ProgressInterval, time);
            while (await timer.WaitForNextTickAsync(work.Token))
            {
                await using var db = await contexts.CreateDbContextAsync(work.Token);
                var now = Now;
                var until = now + Options.LeaseDuration;
                var renewed = progress.Latest is { } latest
                    ? await Owned(db, id).ExecuteUpdateAsync(set => set
                        .SetProperty(j => j.LeaseExpiresAt, until)
                        .SetProperty(j => j.TensorsDone, latest.TensorsDone)
                        .SetProperty(j => j.TensorsTotal, latest.TensorCount)
                        .SetProperty(j => j.BytesDone, latest.BytesDone)
                        .SetProperty(j => j.BytesTotal, latest.BytesTotal), work.Token)
                    : await Owned(db, id).ExecuteUpdateAsync(set => set.SetProperty(j => j.LeaseExpiresAt, until), work.Token);
                if (renewed == 0)
                {
                    await work.CancelAsync();
                    return;
                }
            }
        }
        catch (OperationCanceledException)
        {
        }
        catch (Exception e)
        {
            logger.LogWarning(e, "Could not write the progress of export {ExportId}; the merge goes on", id);
        }
    }

    private async Task RequeueAsync(string id)
    {
        try
        {
            using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(5));
            await using var db = await contexts.CreateDbContextAsync(timeout.Token);
            await Owned(db, id).ExecuteUpdateAsync(set => set
                .SetProperty(j => j.Status, ExportJobStatus.Queued)
                .SetProperty(j => j.LeaseOwner, (string?)null)
                .SetProperty(j => j.LeaseExpiresAt, (DateTime?)null)
                .SetProperty(j => j.Attempts, j => j.Attempts - 1), timeout.Token);
        }
        catch (Exception e) when (e is OperationCanceledException or DbException)
        {
            logger.LogWarning(e, "Could not put export {ExportId} back in the queue; it runs again when its lease lapses", id);
        }
    }

    private async Task FailAsync(string id, string reason, CancellationToken ct)
    {
        await using var db = await contexts.CreateDbContextAsync(ct);
        var now = Now;
        var failed = await Owned(db, id).ExecuteUpdateAsync(set => set
            .SetProperty(j => j.Status, ExportJobStatus.Failed)
            .SetProperty(j => j.FailReason, reason.Length > 2000 ? reason[..1997] + "..." : reason)
            .SetProperty(j => j.LeaseOwner, (string?)null)
            .SetProperty(j => j.LeaseExpiresAt, (DateTime?)null)
            .SetProperty(j => j.FinishedAt, now), ct);
        if (failed == 1)
        {
            LogFailed(id, reason);
        }
    }

    internal static MergeDtype DtypeOf(string dtype) => dtype switch
    {
        "f16" => MergeDtype.F16,
        "bf16" => MergeDtype.BF16,
        "f32" => MergeDtype.F32,
        _ => MergeDtype.Base,
    };

    /// <summary>Deletes finished exports past the retention: the file first, then the row, so no row points at a missing file for long.</summary>
    private async Task CollectExpiredAsync(CancellationToken ct)
    {
        await using var db = await contexts.CreateDbContextAsync(ct);
        var cutoff = Now - Options.Retention;
        var expired = await db.ExportJobs
            .Where(j => (j.Status == ExportJobStatus.Done || j.Status == ExportJobStatus.Failed) && j.FinishedAt < cutoff)
            .OrderBy(j => j.FinishedAt) // oldest first, and a stable batch
            .Select(j => j.Id)
            .Take(100)
            .ToListAsync(ct);
        foreach (var id in expired)
        {
            files.Delete(id);
            await db.ExportJobs.Where(j => j.Id == id).ExecuteDeleteAsync(ct);
            LogExpired(id);
        }
    }

    /// <summary>Deletes what a deleted export left in the folder (a runner that died mid-merge, a delete racing a finish).</summary>
    private async Task CollectOrphansAsync(CancellationToken ct)
    {
        // Real file times, so the wall clock; generous, so a job just claimed elsewhere is never touched.
        var cutoff = DateTime.UtcNow - 2 * Options.LeaseDuration;
        var stale = files.Entries().Where(e => e.LastWriteUtc < cutoff).Select(e => e.Id).ToList();
        if (stale.Count == 0)
        {
            return;
        }
        await using var db = await contexts.CreateDbContextAsync(ct);
        var live = await db.ExportJobs.Where(j => stale.Contains(j.Id)).Select(j => j.Id).ToListAsync(ct);
        foreach (var id in stale.Except(live))
        {
            files.Delete(id);
        }
    }

    /// <summary>Keeps only the newest report: the merge reports after every tensor, the row is written once per interval.</summary>
    private sealed class LatestProgress : IProgress<MergeProgress>
    {
        private MergeProgress? _latest;

        public MergeProgress? Latest => Volatile.Read(ref _latest);

        public void Report(MergeProgress value) => Volatile.Write(ref _latest, value);
    }

    [LoggerMessage(Level = LogLevel.Information, Message = "Export {ExportId}: merging into {BaseModel} (start {Attempt})")]
    private partial void LogStarted(string exportId, string baseModel, int attempt);

    [LoggerMessage(Level = LogLevel.Information, Message = "Export {ExportId}: done, {Bytes} bytes, {Tensors} tensors merged in {Seconds:F1} s")]
    private partial void LogDone(string exportId, long bytes, int tensors, double seconds);

    [LoggerMessage(Level = LogLevel.Warning, Message = "Export {ExportId} failed: {Reason}")]
    private partial void LogFailed(string exportId, string reason);

    [LoggerMessage(Level = LogLevel.Information, Message = "Export {ExportId} expired; file and row deleted")]
    private partial void LogExpired(string exportId);
}
