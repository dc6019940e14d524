using LoraDeploy.Data;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Pipeline;

/// <summary>Failure classes the pipeline adds to the sources' (<see cref="Sources.ReasonClass"/>).</summary>
public static class PipelineReasonClass
{
    public const string HashMismatch = "hash_mismatch";
    public const string InvalidFile = "invalid_file";
    public const string NotAdapter = "not_adapter";
    public const string NotApplicable = "not_applicable";
    public const string UnknownArchitecture = "unknown_architecture";
    public const string ArchitectureMismatch = "architecture_mismatch";
    public const string Internal = "internal";
    public const string DownloadDeadline = "download_deadline";
    public const string DiskFull = "disk_full";
    /// <summary>The operator's license and content policy (<see cref="PolicyOptions"/>) refuses this model.</summary>
    public const string Policy = "policy";
    /// <summary>An uploaded file's blob is gone (collected after its LoRA was deleted, or removed by hand): only a new upload brings it back.</summary>
    public const string UploadMissing = "upload_missing";
    /// <summary>The user's stored-bytes quota (<see cref="Quotas.QuotaOptions"/>) has no room for this file.</summary>
    public const string Quota = "quota";
}

internal static class DeployFailure
{
    /// <summary>
    /// Ends a deploy's import and fails the deploy if it is still importing; a deploy the user deleted meanwhile stays
    /// deleted. Returns 1 when the deploy was failed.
    /// </summary>
    public static async Task<int> FailAsync(LoraDeployDbContext db, string deployId, string reasonClass, string reason, DateTime now, CancellationToken ct)
    {
        await using var transaction = await db.Database.BeginTransactionAsync(ct);
        var failed = await FailWithinTransactionAsync(db, deployId, reasonClass, reason, now, ct);
        await transaction.CommitAsync(ct);
        return failed;
    }

    /// <summary><see cref="FailAsync"/> for a caller that already holds a transaction.</summary>
    public static async Task<int> FailWithinTransactionAsync(LoraDeployDbContext db, string deployId, string reasonClass, string reason, DateTime now, CancellationToken ct)
    {
        await EndImportAsync(db, deployId, now, ct);
        return await db.Deploys
            .Where(d => d.Id == deployId && (d.Status == DeployStatus.Initializing || d.Status == DeployStatus.Downloading))
            .ExecuteUpdateAsync(set => set
                .SetProperty(d => d.Status, DeployStatus.Failed)
                .SetProperty(d => d.FailReason, reason)
                .SetProperty(d => d.FailClass, reasonClass)
                .SetProperty(d => d.UpdatedAt, now), ct);
    }

    /// <summary>Stops a deploy's import wherever it is (its lease holder notices and lets go).</summary>
    public static Task<int> EndImportAsync(LoraDeployDbContext db, string deployId, DateTime now, CancellationToken ct) =>
        db.ImportJobs
            .Where(j => j.DeployId == deployId && (j.Status == ImportJobStatus.Queued || j.Status == ImportJobStatus.Importing))
            .ExecuteUpdateAsync(set => set
                .SetProperty(j => j.Status, ImportJobStatus.Ended)
                .SetProperty(j => j.LeaseOwner, (string?)null)
                .SetProperty(j => j.LeaseExpiresAt, (DateTime?)null)
                .SetProperty(j => j.UpdatedAt, now), ct);
}
