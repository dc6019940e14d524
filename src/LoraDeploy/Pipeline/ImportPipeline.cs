using System.Text.Json;
using System.Text.Json.Serialization;
using LoraDeploy.BaseModels;
using LoraDeploy.Data;
using LoraDeploy.Lora;
using LoraDeploy.Lora.Safetensors;
using LoraDeploy.Sources;
using LoraDeploy.Storage;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Pipeline;

/// <summary>
/// Runs import jobs, moving their deploys from <c>initializing</c> through <c>downloading</c> to <c>deploying</c>
/// (or <c>failed</c>). The database is the queue: every step claims its job with a conditional update and a lease,
/// so any number of replicas can run this and a crash loses nothing (the lease expires and someone else carries on).
/// Steps: resolve a new deploy at CivitAI → link it to the one shared download of that file (or straight to
/// the stored blob) → when that download is done, probe the blob and gate on the base model's family.
/// </summary>
public sealed partial class ImportPipeline(
    IDbContextFactory<LoraDeployDbContext> contexts,
    IServiceScopeFactory scopes,
    IBlobStore blobs,
    BaseModelRegistry baseModels,
    PipelineSignal signal,
    PipelineMetrics metrics,
    HuggingFaceTokens hfTokens,
    Workers.Placement placement,
    IOptions<PipelineOptions> options,
    IOptionsMonitor<PolicyOptions> policy,
    Audit.AuditLog audit,
    Quotas.QuotaGate quotas,
    TimeProvider time,
    ILogger<ImportPipeline> logger) : BackgroundService
{
    private readonly string _owner = $"{Environment.MachineName}:{Environment.ProcessId}:{Guid.NewGuid().ToString("N")[..6]}";
    private readonly RunningTasks<long> _downloads = new();
    private readonly RunningTasks<string> _resolutions = new();
    private CancellationToken _stopping = CancellationToken.None;
    private PipelineOptions Options => options.Value;
    private DateTime Now => time.GetUtcNow().UtcDateTime;

    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        _stopping = stoppingToken;
        if (!Options.Enabled)
        {
            logger.LogInformation("Import pipeline disabled (Pipeline:Enabled=false)");
            return;
        }
        await Task.Yield();
        var nextCollection = Now + Options.CollectInterval;
        while (!stoppingToken.IsCancellationRequested)
        {
            try
            {
                var worked = await ResolveNewDeploysAsync(stoppingToken);
                worked |= await FinishWaitingDeploysAsync(stoppingToken);
                worked |= await StartDownloadsAsync(stoppingToken);
                if (Now >= nextCollection)
                {
                    nextCollection = Now + Options.CollectInterval;
                    await CollectBlobsAsync(stoppingToken);
                    await CollectStagingAsync(stoppingToken);
                }
                if (!worked)
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
                logger.LogError(e, "Import pipeline pass failed; retrying after the poll interval");
                await signal.WaitAsync(Options.PollInterval, time, stoppingToken);
            }
        }
        // Downloads stop with the host; their rows keep their leases and staging files, so a restart resumes them.
        await Task.WhenAll(_downloads.WhenAll(), _resolutions.WhenAll()).ContinueWith(_ => { }, CancellationToken.None, TaskContinuationOptions.None, TaskScheduler.Default);
    }

    // ---- step 1: resolve new deploys ----

    /// <summary>
    /// Starts resolutions as tasks of their own and does not wait for them: a CivitAI answer that trickles holds
    /// only its own deploy, never the others (nor the downloads and finishing steps of this loop).
    /// </summary>
    private async Task<bool> ResolveNewDeploysAsync(CancellationToken ct)
    {
        var free = ResolveParallelism - _resolutions.Count;
        if (free <= 0)
        {
            return false;
        }
        var claimed = await ClaimNewDeploysAsync(free, ct);
        foreach (var deployId in claimed)
        {
            _resolutions.TryStart(deployId, () => RunResolutionAsync(deployId, ct), signal.Wake);
        }
        return claimed.Count > 0;
    }

    private const int ResolveParallelism = 8;

    /// <summary>
    /// Resolves one claimed deploy while renewing its lease (so nobody takes it over however slow CivitAI is);
    /// a lost lease — the deploy was deleted — cancels the resolution and its request to CivitAI.
    /// </summary>
    private async Task RunResolutionAsync(string deployId, CancellationToken stoppingToken)
    {
        using var scope = logger.BeginScope("Deploy {DeployId}", deployId);
        using var work = CancellationTokenSource.CreateLinkedTokenSource(stoppingToken);
        var renewal = RenewResolutionLeaseAsync(deployId, work);
        try
        {
            await GuardAsync(deployId, () => ResolveDeployAsync(deployId, work.Token), work.Token);
        }
        catch (OperationCanceledException) when (work.IsCancellationRequested)
        {
            // Deleted meanwhile, or shutting down (the lease then lapses and a replica resolves it again).
        }
        catch (Exception e)
        {
            logger.LogError(e, "Resolution of deploy {DeployId} failed; it will be retried when its lease expires", deployId);
        }
        finally
        {
            await work.CancelAsync();
            await renewal;
        }
    }

    private async Task RenewResolutionLeaseAsync(string deployId, CancellationTokenSource work)
    {
        try
        {
            using var timer = new PeriodicTimer(Options.LeaseDuration / 3, time);
            while (await timer.WaitForNextTickAsync(work.Token))
            {
                await using var db = await contexts.CreateDbContextAsync(work.Token);
                var now = Now;
                var renewed = await OwnJob(db, deployId).Where(j => j.DownloadId == null)
                    .ExecuteUpdateAsync(set => set.SetProperty(j => j.LeaseExpiresAt, now + Options.LeaseDuration), work.Token);
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
            logger.LogWarning(e, "Could not renew the lease of deploy {DeployId}; will try again", deployId);
        }
    }

    /// <summary>
    /// Claims new (or abandoned) import jobs for this replica and returns their deploys. PostgreSQL claims a batch in
    /// one statement with <c>FOR UPDATE SKIP LOCKED</c>, so replicas split the queue instead of racing for the same
    /// rows; SQLite has one writer anyway and claims row by row with a conditional update. Either way a job is claimed
    /// once. Batches are no larger than what is resolved at once, so no claimed job waits long enough for its lease to lapse.
    /// </summary>
    private async Task<List<string>> ClaimNewDeploysAsync(int free, CancellationToken ct)
    {
        await using var db = await contexts.CreateDbContextAsync(ct);
        var now = Now;
        var until = now + Options.LeaseDuration;
        var limit = Math.Min(Options.BatchSize, free);
        List<string> claimed;
        if (db is PostgresLoraDeployContext)
        {
            claimed = await db.Database.SqlQuery<string>($"""
                UPDATE import_jobs
                SET "Status" = {ImportJobStatus.Importing}, "LeaseOwner" = {_owner}, "LeaseExpiresAt" = {until},
                    "Attempts" = "Attempts" + 1, "UpdatedAt" = {now}
                WHERE "Id" IN (
                    SELECT "Id" FROM import_jobs
                    WHERE "Status" IN ({ImportJobStatus.Queued}, {ImportJobStatus.Importing})
                      AND ("Status" = {ImportJobStatus.Queued} OR ("DownloadId" IS NULL AND "LeaseExpiresAt" < {now}))
                    ORDER BY "CreatedAt"
                    LIMIT {limit}
                    FOR UPDATE SKIP LOCKED)
                RETURNING "DeployId" AS "Value"
                """).ToListAsync(ct);
        }
        else
        {
            // Status IN (…) first: with only the OR, SQLite scans the whole table (a second per pass at 1M jobs).
            var candidates = await db.ImportJobs
                .Where(j => (j.Status == ImportJobStatus.Queued || j.Status == ImportJobStatus.Importing)
                    && (j.Status == ImportJobStatus.Queued || (j.DownloadId == null && j.LeaseExpiresAt < now)))
                .OrderBy(j => j.CreatedAt)
                .Select(j => j.DeployId)
                .Take(limit)
                .ToListAsync(ct);
            claimed = new List<string>(candidates.Count);
            foreach (var deployId in candidates)
            {
                var won = await db.ImportJobs
                    .Where(j => j.DeployId == deployId && (j.Status == ImportJobStatus.Queued
                        || (j.Status == ImportJobStatus.Importing && j.DownloadId == null && j.LeaseExpiresAt < now)))
                    .ExecuteUpdateAsync(set => set
                        .SetProperty(j => j.Status, ImportJobStatus.Importing)
                        .SetProperty(j => j.LeaseOwner, _owner)
                        .SetProperty(j => j.LeaseExpiresAt, until)
                        .SetProperty(j => j.Attempts, j => j.Attempts + 1)
                        .SetProperty(j => j.UpdatedAt, now), ct);
                if (won == 1)
                {
                    claimed.Add(deployId);
                }
            }
        }
        if (claimed.Count > 0)
        {
            // The deploy shows what its job does.
            await db.Deploys.Where(d => claimed.Contains(d.Id) && d.Status == DeployStatus.Initializing)
                .ExecuteUpdateAsync(set => set.SetProperty(d => d.Status, DeployStatus.Downloading).SetProperty(d => d.UpdatedAt, now), ct);
        }
        return claimed;
    }

    private async Task ResolveDeployAsync(string deployId, CancellationToken ct)
    {
        await using var scope = scopes.CreateAsyncScope();
        var civitai = scope.ServiceProvider.GetRequiredService<CivitaiClient>();
        await using var db = await contexts.CreateDbContextAsync(ct);
        var lora = await LoraOf(db, deployId).AsTracking().FirstAsync(ct);
        metrics.ImportStarted();
        LogResolving(deployId, lora.SourceUrl);
        if (lora.SourceType == "huggingface")
        {
            await ImportHuggingFaceAsync(deployId, lora, db, scope.ServiceProvider, ct);
            return;
        }
        if (lora.SourceType == "upload")
        {
            await ImportUploadAsync(deployId, lora, db, ct);
            return;
        }

        if (!CivitaiUrl.TryParse(lora.SourceUrl, out var reference, out var parseError))
        {
            await FailAsync(deployId, Sources.ReasonClass.InvalidUrl, $"The CivitAI link cannot be read: {parseError}", ct);
            return;
        }
        // No access check here: CivitAI counts every hit on its download endpoint against the account's quota, so
        // only the one download that moves the bytes asks it (a stored or in-flight file never does).
        var resolved = await civitai.ResolveAsync(reference, ct, checkDownloadAccess: false);
        if (!resolved.Succeeded)
        {
            await FailAsync(deployId, resolved.ReasonClass, resolved.FailReason, ct);
            return;
        }
        var file = resolved.File;
        var now = Now;
        lora.CivitaiModelId = file.ModelId;
        lora.CivitaiVersionId = file.VersionId;
        lora.CivitaiFileId = file.FileId;
        lora.FileName = file.FileName;
        lora.CivitaiBaseModel = file.BaseModel;
        lora.TrainedWordsJson = JsonSerializer.Serialize(file.TrainedWords.ToList(), PipelineJsonContext.Default.ListString);
        lora.ExpectedSha256 = file.ListedSha256;
        lora.SizeBytes = file.ListedSizeBytes;
        lora.AllowCommercialUseJson = file.License?.AllowCommercialUse is { } commercial
            ? JsonSerializer.Serialize(commercial.ToList(), PipelineJsonContext.Default.ListString)
            : null;
        lora.AllowDerivatives = file.License?.AllowDerivatives;
        lora.AllowDifferentLicense = file.License?.AllowDifferentLicense;
        lora.AllowNoCredit = file.License?.AllowNoCredit;
        lora.NsfwLevel = file.License?.NsfwLevel;
        lora.CivitaiCreator = file.License?.Creator;
        lora.UpdatedAt = now;
        // The listed size is recorded and counted before any byte moves: a file that does not fit fails here.
        if (await SaveWithinStoredBytesQuotaAsync(db, lora, deployId, ct))
        {
            return;
        }
        // The terms are recorded first, so a refused LoRA shows why; nothing is fetched for it.
        if (PolicyGate.Check(policy.CurrentValue, file.ModelId, file.License) is { } refusal)
        {
            if (await FailAsync(deployId, PipelineReasonClass.Policy, refusal, ct))
            {
                // Refused on the owner's behalf, away from any request: the owner is the actor, with no token or IP.
                await audit.RecordForUserAsync(lora.UserId, Audit.AuditLog.Actions.PolicyRefused, "deploy", deployId, refusal, ct);
            }
            return;
        }
        await OwnJob(db, deployId).ExecuteUpdateAsync(set => set.SetProperty(j => j.LeaseExpiresAt, now + Options.LeaseDuration), ct);
        // version shows CivitAI's listed hash as soon as it is known; the bytes confirm it later.
        await db.Deploys.Where(d => d.Id == deployId && d.Status == DeployStatus.Downloading).ExecuteUpdateAsync(set => set
            .SetProperty(d => d.Version, file.ListedSha256 ?? "")
            .SetProperty(d => d.UpdatedAt, now), ct);

        if (file.ListedSha256 is { } listed && await db.Blobs.AnyAsync(b => b.Sha256 == listed, ct) && blobs.Exists(listed))
        {
            metrics.DedupHit("stored");
            LogStoredAlready(deployId, listed);
            await FinishAsync(db, deployId, listed, ct);
            return;
        }

        var downloadId = await GetOrCreateDownloadAsync(db, file, ct);
        await OwnJob(db, deployId).ExecuteUpdateAsync(set => set
            .SetProperty(j => j.DownloadId, downloadId)
            .SetProperty(j => j.LeaseOwner, (string?)null)
            .SetProperty(j => j.LeaseExpiresAt, (DateTime?)null)
            .SetProperty(j => j.UpdatedAt, Now), ct);
        signal.Wake();
    }

    /// <summary>
    /// An upload's bytes were stored by the request that created it (which checked them already): the import goes
    /// straight to the probe and the gate, as for a CivitAI file that is already stored. The policy was applied then too.
    /// </summary>
    private async Task ImportUploadAsync(string deployId, Data.Lora lora, LoraDeployDbContext db, CancellationToken ct)
    {
        var sha256 = lora.ExpectedSha256;
        if (sha256 is null || !await db.Blobs.AnyAsync(b => b.Sha256 == sha256, ct) || !blobs.Exists(sha256))
        {
            await FailAsync(deployId, PipelineReasonClass.UploadMissing,
                $"The uploaded file {lora.FileName} (SHA-256 {sha256}) is no longer stored; upload it again to deploy it.", ct);
            return;
        }
        metrics.DedupHit("stored");
        LogStoredAlready(deployId, sha256);
        await FinishAsync(db, deployId, sha256, ct);
    }

    /// <summary>
    /// Single flight: one download row per file, whoever asks and however many replicas run. A file is its listed
    /// SHA-256, not CivitAI's file id (an id can be re-listed with other bytes). A file with no listed hash is keyed by
    /// its id and shared only while in flight: what it turns out to be once fetched is not known in advance.
    /// </summary>
    private async Task<long> GetOrCreateDownloadAsync(LoraDeployDbContext db, ResolvedCivitaiFile file, CancellationToken ct)
    {
        var key = file.ListedSha256 is { } listed ? $"sha256:{listed}" : $"civitai:file:{file.FileId}";
        var resolvedJson = JsonSerializer.Serialize(file, PipelineJsonContext.Default.ResolvedCivitaiFile);
        for (var attempt = 0; attempt < 3; attempt++)
        {
            var existing = await db.Downloads.Where(d => d.SourceKey == key)
                .Select(d => new { d.Id, d.Status, d.BlobSha256 })
                .FirstOrDefaultAsync(ct);
            if (existing is null)
            {
                var now = Now;
                db.Downloads.Add(new Download
                {
                    SourceKey = key,
                    CivitaiVersionId = file.VersionId,
                    CivitaiFileId = file.FileId,
                    ExpectedSha256 = file.ListedSha256,
                    SizeBytes = file.ListedSizeBytes,
                    ResolvedJson = resolvedJson,
                    CreatedAt = now,
                    UpdatedAt = now,
                });
                try
                {
                    await db.SaveChangesAsync(ct);
                    return db.Downloads.Local.Single(d => d.SourceKey == key).Id;
                }
                catch (DbUpdateException e) when (db.IsUniqueViolation(e))
                {
                    db.ChangeTracker.Clear(); // another deploy created it first: join that one
                    continue;
                }
            }

            var stale = existing.Status is DownloadStatus.Failed or DownloadStatus.Cancelled
                || (existing.Status == DownloadStatus.Done && (file.ListedSha256 is null || existing.BlobSha256 is null || !blobs.Exists(existing.BlobSha256)));
            if (!stale)
            {
                metrics.DedupHit("in_flight");
                return existing.Id;
            }
            // A failed or collected fetch: a later create tries again.
            var status = existing.Status;
            await db.Downloads.Where(d => d.Id == existing.Id && d.Status == status)
                .ExecuteUpdateAsync(set => set
                    .SetProperty(d => d.Status, DownloadStatus.Pending)
                    .SetProperty(d => d.FailReason, "")
                    .SetProperty(d => d.FailClass, "")
                    .SetProperty(d => d.BlobSha256, (string?)null)
                    .SetProperty(d => d.ResolvedJson, resolvedJson)
                    .SetProperty(d => d.ExpectedSha256, file.ListedSha256)
                    .SetProperty(d => d.SizeBytes, file.ListedSizeBytes)
                    .SetProperty(d => d.CivitaiVersionId, file.VersionId)
                    .SetProperty(d => d.CivitaiFileId, file.FileId)
                    .SetProperty(d => d.BytesDone, 0)
                    .SetProperty(d => d.StartedAt, (DateTime?)null)
                    .SetProperty(d => d.StalledSince, (DateTime?)null)
                    .SetProperty(d => d.FetchedBy, (string?)null)
                    .SetProperty(d => d.LeaseOwner, (string?)null)
                    .SetProperty(d => d.LeaseExpiresAt, (DateTime?)null)
                    .SetProperty(d => d.UpdatedAt, Now), ct);
            return existing.Id;
        }
        throw new InvalidOperationException($"Could not create or join the download of CivitAI file {file.FileId}.");
    }

    // ---- step 3: finish jobs whose download ended ----

    private async Task<bool> FinishWaitingDeploysAsync(CancellationToken ct)
    {
        List<(string DeployId, long DownloadId)> candidates;
        await using (var db = await contexts.CreateDbContextAsync(ct))
        {
            var now = Now;
            candidates = (await db.ImportJobs
                .Where(j => j.Status == ImportJobStatus.Importing && j.DownloadId != null
                    && (j.LeaseOwner == null || j.LeaseExpiresAt < now)
                    && (j.Download!.Status == DownloadStatus.Done || j.Download.Status == DownloadStatus.Failed || j.Download.Status == DownloadStatus.Cancelled))
                .OrderBy(j => j.CreatedAt)
                .Select(j => new { Id = j.DeployId, DownloadId = j.DownloadId!.Value })
                .Take(Options.BatchSize)
                .ToListAsync(ct))
                .Select(d => (d.Id, d.DownloadId))
                .ToList();
        }
        if (candidates.Count == 0)
        {
            return false;
        }
        var claimed = 0;
        await Parallel.ForEachAsync(candidates, new ParallelOptions { MaxDegreeOfParallelism = 8, CancellationToken = ct }, async (candidate, token) =>
        {
            await using var db = await contexts.CreateDbContextAsync(token);
            var now = Now;
            var won = await db.ImportJobs
                .Where(j => j.DeployId == candidate.DeployId && j.Status == ImportJobStatus.Importing && j.DownloadId == candidate.DownloadId
                    && (j.LeaseOwner == null || j.LeaseExpiresAt < now))
                .ExecuteUpdateAsync(set => set
                    .SetProperty(j => j.LeaseOwner, _owner)
                    .SetProperty(j => j.LeaseExpiresAt, now + Options.LeaseDuration), token);
            if (won != 1)
            {
                return;
            }
            Interlocked.Increment(ref claimed);
            using var scope = logger.BeginScope("Deploy {DeployId}", candidate.DeployId);
            await GuardAsync(candidate.DeployId, async () =>
            {
                var download = await db.Downloads.FirstAsync(d => d.Id == candidate.DownloadId, token);
                switch (download.Status)
                {
                    case DownloadStatus.Done:
                        await FinishAsync(db, candidate.DeployId, download.BlobSha256!, token);
                        break;
                    case DownloadStatus.Failed:
                        await FailAsync(candidate.DeployId, download.FailClass, download.FailReason, token);
                        break;
                    default:
                        // Cancelled because nobody waited, yet this deploy now does: resolve it again.
                        await RequeueAsync(db, candidate.DeployId, token);
                        break;
                }
            }, token);
        });
        return claimed > 0;
    }

    /// <summary>Probes the stored blob and lets the deploy through only when it fits the base model's family.</summary>
    private async Task FinishAsync(LoraDeployDbContext db, string deployId, string sha256, CancellationToken ct)
    {
        await using var blob = await blobs.OpenReadAsync(sha256, ct: ct);
        if (blob is null)
        {
            await RequeueAsync(db, deployId, ct); // collected between the check and now: fetch it again
            return;
        }
        var lora = await LoraOf(db, deployId).AsTracking().FirstAsync(ct);
        if (lora.ExpectedSha256 is { } expected && !string.Equals(expected, sha256, StringComparison.Ordinal))
        {
            // The deploy's version is the listed hash: it may never go live with other bytes.
            await FailAsync(deployId, PipelineReasonClass.HashMismatch,
                $"The stored file has SHA-256 {sha256}, but CivitAI lists {expected} for file {lora.CivitaiFileId}; LoraDeploy does not deploy bytes other than the listed ones. Start the deploy again to fetch the file anew.",
                ct);
            return;
        }
        ProbeReport report;
        try
        {
            using var header = SafetensorsReader.Read(blob);
            report = LoraProber.Probe(header, blob);
        }
        catch (SafetensorsFormatException e)
        {
            await FailAsync(deployId, PipelineReasonClass.InvalidFile, $"The stored file is not a valid safetensors file: {e.Message}", ct);
            return;
        }

        var (failClass, failReason, warnings) = AdapterGate.Check(report, lora.BaseModel, lora.CivitaiBaseModel, baseModels);
        var now = Now;
        await EnsureAdapterAsync(db, sha256, blob.Length, report, lora, ct);
        lora.AdapterSha256 = sha256;
        lora.SizeBytes = blob.Length;
        lora.WarningsJson = JsonSerializer.Serialize(warnings, PipelineJsonContext.Default.ListString);
        lora.UpdatedAt = now;
        await db.SaveChangesAsync(ct);

        if (failReason is not null)
        {
            await FailAsync(deployId, failClass!, failReason, ct);
            return;
        }
        // version: equal to the listed hash when there is one (checked above)
        await AdvanceToDeployingAsync(db, deployId, sha256, ct);
        LogDeploying(deployId, report.Architecture, report.Network);
    }

    /// <summary>
    /// Saves the LoRA with its (new) size and counts it against the owner's stored-bytes quota under the owner's lock,
    /// so of two imports at once the second sees the first's size. True when it does not fit: the deploy has failed
    /// (<see cref="PipelineReasonClass.Quota"/>) and the import stops.
    /// </summary>
    private async Task<bool> SaveWithinStoredBytesQuotaAsync(LoraDeployDbContext db, Data.Lora lora, string deployId, CancellationToken ct)
    {
        string? overQuota;
        var failed = 0;
        await using (var transaction = await db.Database.BeginTransactionAsync(ct))
        {
            await Quotas.QuotaGate.LockUserAsync(db, lora.UserId, ct);
            await db.SaveChangesAsync(ct);
            overQuota = await quotas.RefuseStoredBytesAsync(db, lora.UserId, ct);
            if (overQuota is not null)
            {
                failed = await DeployFailure.FailWithinTransactionAsync(db, deployId, PipelineReasonClass.Quota, overQuota, Now, ct);
            }
            await transaction.CommitAsync(ct);
        }
        if (overQuota is null)
        {
            return false;
        }
        if (failed == 1)
        {
            metrics.ImportFailed(PipelineReasonClass.Quota);
            LogFailed(deployId, PipelineReasonClass.Quota, overQuota);
        }
        return true;
    }

    /// <summary>The import is done: the job ends, the deploy moves on to deploying (placement takes it from there).</summary>
    private async Task AdvanceToDeployingAsync(LoraDeployDbContext db, string deployId, string version, CancellationToken ct)
    {
        var now = Now;
        await using var transaction = await db.Database.BeginTransactionAsync(ct);
        var advanced = await OwnJob(db, deployId).ExecuteUpdateAsync(set => set
            .SetProperty(j => j.Status, ImportJobStatus.Done)
            .SetProperty(j => j.LeaseOwner, (string?)null)
            .SetProperty(j => j.LeaseExpiresAt, (DateTime?)null)
            .SetProperty(j => j.UpdatedAt, now), ct);
        if (advanced == 1)
        {
            advanced = await db.Deploys.Where(d => d.Id == deployId && d.Status == DeployStatus.Downloading).ExecuteUpdateAsync(set => set
                .SetProperty(d => d.Status, DeployStatus.Deploying)
                .SetProperty(d => d.Version, version)
                .SetProperty(d => d.UpdatedAt, now), ct);
        }
        await transaction.CommitAsync(ct);
        if (advanced == 1)
        {
            signal.Wake();
            placement.Wake();
            metrics.ImportSucceeded();
        }
    }

    private async Task RequeueAsync(LoraDeployDbContext db, string deployId, CancellationToken ct)
    {
        var requeued = await OwnJob(db, deployId).ExecuteUpdateAsync(set => set
            .SetProperty(j => j.Status, ImportJobStatus.Queued)
            .SetProperty(j => j.DownloadId, (long?)null)
            .SetProperty(j => j.LeaseOwner, (string?)null)
            .SetProperty(j => j.LeaseExpiresAt, (DateTime?)null)
            .SetProperty(j => j.UpdatedAt, Now), ct);
        if (requeued == 1)
        {
            await db.Deploys.Where(d => d.Id == deployId && d.Status == DeployStatus.Downloading)
                .ExecuteUpdateAsync(set => set.SetProperty(d => d.Status, DeployStatus.Initializing), ct);
        }
    }

    /// <summary>This replica's claim on a deploy's running import: every write of a step goes through it.</summary>
    private IQueryable<ImportJob> OwnJob(LoraDeployDbContext db, string deployId) =>
        db.ImportJobs.Where(j => j.DeployId == deployId && j.Status == ImportJobStatus.Importing && j.LeaseOwner == _owner);

    private static IQueryable<Data.Lora> LoraOf(LoraDeployDbContext db, string deployId) =>
        db.Deploys.Where(d => d.Id == deployId).Select(d => d.Lora!);

    /// <summary>
    /// Records what the prober learned about these bytes, once: the first import of a file creates the adapter, every
    /// later one (any user, any LoRA) shares it. The probe is a pure function of the bytes, so a race loses nothing.
    /// </summary>
    private async Task EnsureAdapterAsync(LoraDeployDbContext db, string sha256, long size, ProbeReport report, Data.Lora lora, CancellationToken ct)
    {
        if (await db.Adapters.AnyAsync(a => a.Sha256 == sha256, ct))
        {
            return;
        }
        await using var insert = await contexts.CreateDbContextAsync(ct);
        insert.Adapters.Add(new Adapter
        {
            Sha256 = sha256,
            SizeBytes = size,
            Format = report.Format,
            Network = report.Network,
            Architecture = report.Architecture,
            RankMin = report.RankMin,
            RankMax = report.RankMax,
            Alpha = report.Alpha,
            ProbeJson = JsonSerializer.Serialize(report, ProbeJsonContext.Default.ProbeReport),
            SourceType = lora.SourceType,
            SourceRef = lora.CivitaiFileId is { } fileId ? $"civitai:file:{fileId}" : lora.SourceUrl,
            CreatedAt = Now,
        });
        try
        {
            await insert.SaveChangesAsync(ct);
        }
        catch (DbUpdateException e) when (insert.IsUniqueViolation(e))
        {
            // Another import of the same bytes recorded it first.
        }
    }

    /// <summary>Fails the deploy; false when it had already ended (failed, stopped or deleted meanwhile).</summary>
    private async Task<bool> FailAsync(string deployId, string reasonClass, string reason, CancellationToken ct)
    {
        await using var db = await contexts.CreateDbContextAsync(ct);
        if (await DeployFailure.FailAsync(db, deployId, reasonClass, reason, Now, ct) != 1)
        {
            return false;
        }
        metrics.ImportFailed(reasonClass);
        LogFailed(deployId, reasonClass, reason);
        return true;
    }

    /// <summary>An unexpected error fails the deploy with a sentence instead of leaving it stuck.</summary>
    private async Task GuardAsync(string deployId, Func<Task> step, CancellationToken ct)
    {
        try
        {
            await step();
        }
        catch (OperationCanceledException) when (ct.IsCancellationRequested)
        {
            throw;
        }
        catch (Exception e)
        {
            logger.LogError(e, "Import step failed for deploy {DeployId}", deployId);
            await FailAsync(deployId, PipelineReasonClass.Internal,
                "LoraDeploy hit an internal error while importing this LoRA; the server log has the details (search for the deploy id). Start the deploy again (POST /deploy/{id}/start) to retry.",
                CancellationToken.None);
        }
    }

    // ---- step 2: downloads ----

    private async Task<bool> StartDownloadsAsync(CancellationToken ct)
    {
        var free = Options.MaxConcurrentDownloads - _downloads.Count;
        if (free <= 0)
        {
            return false;
        }
        List<long> candidates;
        await using (var db = await contexts.CreateDbContextAsync(ct))
        {
            var now = Now;
            candidates = await db.Downloads
                .Where(d => d.Status == DownloadStatus.Pending || (d.Status == DownloadStatus.Downloading && d.LeaseExpiresAt < now))
                .OrderBy(d => d.CreatedAt)
                .Select(d => d.Id)
                .Take(free)
                .ToListAsync(ct);
        }
        var started = false;
        foreach (var downloadId in candidates)
        {
            if (_downloads.Contains(downloadId))
            {
                continue;
            }
            await using var scope = scopes.CreateAsyncScope();
            var worker = ActivatorUtilities.CreateInstance<DownloadWorker>(scope.ServiceProvider, _owner);
            if (!await worker.ClaimAsync(downloadId, ct))
            {
                continue;
            }
            started = true;
            _downloads.TryStart(downloadId, async () =>
            {
                try
                {
                    await using var workerScope = scopes.CreateAsyncScope();
                    await ActivatorUtilities.CreateInstance<DownloadWorker>(workerScope.ServiceProvider, _owner).RunAsync(downloadId, ct);
                }
                catch (Exception e) when (!ct.IsCancellationRequested)
                {
                    logger.LogError(e, "Download {DownloadId} crashed; its lease will expire and it will be retried", downloadId);
                }
            }, signal.Wake);
        }
        return started;
    }

    // ---- housekeeping ----

    /// <summary>
    /// Deletes staging files no live download owns (their row is gone, or a worker died before it could clean up),
    /// once older than the grace period. A download that fails for good deletes its own file at once.
    /// </summary>
    private async Task CollectStagingAsync(CancellationToken ct)
    {
        var cutoff = Now - Options.BlobGracePeriod;
        var stale = blobs.StagingFiles()
            .Where(f => f.LastWriteUtc < cutoff)
            .Select(f => (f.Name, Id: StagingDownloadId(f.Name)))
            .ToList();
        if (stale.Count == 0)
        {
            return;
        }
        await using var db = await contexts.CreateDbContextAsync(ct);
        var ids = stale.Where(f => f.Id is not null).Select(f => f.Id!.Value).ToList();
        var live = await db.Downloads
            .Where(d => ids.Contains(d.Id) && (d.Status == DownloadStatus.Pending || d.Status == DownloadStatus.Downloading))
            .Select(d => d.Id)
            .ToListAsync(ct);
        foreach (var (name, id) in stale.Where(f => f.Id is null || !live.Contains(f.Id.Value)))
        {
            try
            {
                blobs.DeleteStaging(name);
                LogCollected($"staging file {name}");
            }
            catch (IOException)
            {
            }
        }
    }

    private static long? StagingDownloadId(string name) =>
        name.StartsWith("download-", StringComparison.Ordinal) && name.EndsWith(".part", StringComparison.Ordinal)
        && long.TryParse(name.AsSpan(9, name.Length - 14), out var id) ? id : null;

    /// <summary>Deletes blobs no live LoRA references once they are older than the grace period: row first, then bytes.</summary>
    private async Task CollectBlobsAsync(CancellationToken ct)
    {
        await using var db = await contexts.CreateDbContextAsync(ct);
        var cutoff = Now - Options.BlobGracePeriod;
        var orphans = await db.Blobs
            .Where(b => b.CreatedAt < cutoff && !db.Loras.Any(l => !l.Deleted && (l.AdapterSha256 == b.Sha256 || l.ExpectedSha256 == b.Sha256)))
            .OrderBy(b => b.CreatedAt) // oldest first, and a stable batch
            .Select(b => b.Sha256)
            .Take(100)
            .ToListAsync(ct);
        foreach (var sha in orphans)
        {
            await using var transaction = await db.Database.BeginTransactionAsync(ct);
            var removed = await db.Blobs
                .Where(b => b.Sha256 == sha && !db.Loras.Any(l => !l.Deleted && (l.AdapterSha256 == b.Sha256 || l.ExpectedSha256 == b.Sha256)))
                .ExecuteDeleteAsync(ct);
            if (removed == 1)
            {
                // Deleted LoRAs that pointed at it keep their rows; their adapter link goes with the bytes.
                await db.Loras.Where(l => l.AdapterSha256 == sha).ExecuteUpdateAsync(set => set.SetProperty(l => l.AdapterSha256, (string?)null), ct);
                await db.Adapters.Where(a => a.Sha256 == sha).ExecuteDeleteAsync(ct);
            }
            await transaction.CommitAsync(ct);
            if (removed == 1)
            {
                blobs.Delete(sha);
                LogCollected($"blob {sha}");
            }
        }
    }

    [LoggerMessage(Level = LogLevel.Information, Message = "Deploy {DeployId}: resolving {SourceUrl}")]
    private partial void LogResolving(string deployId, string sourceUrl);

    [LoggerMessage(Level = LogLevel.Information, Message = "Deploy {DeployId}: file {Sha256} is already stored; skipping the download")]
    private partial void LogStoredAlready(string deployId, string sha256);

    [LoggerMessage(Level = LogLevel.Information, Message = "Deploy {DeployId}: verified {Architecture} {Network} adapter; now deploying")]
    private partial void LogDeploying(string deployId, string architecture, string network);

    [LoggerMessage(Level = LogLevel.Warning, Message = "Deploy {DeployId} failed ({ReasonClass}): {Reason}")]
    private partial void LogFailed(string deployId, string reasonClass, string reason);

    [LoggerMessage(Level = LogLevel.Information, Message = "Collected unreferenced {Item}")]
    private partial void LogCollected(string item);
}

[JsonSerializable(typeof(ResolvedCivitaiFile))]
[JsonSerializable(typeof(List<string>))]
internal sealed partial class PipelineJsonContext : JsonSerializerContext;
