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
}

internal static class DeployFailure
{
    /// <summary>Fails a deploy that is still importing; a deploy the user deleted meanwhile stays deleted.</summary>
    public static Task<int> FailAsync(LoraDeployDbContext db, string deployId, string reasonClass, string reason, DateTime now, CancellationToken ct) =>
        db.Deploys
            .Where(d => d.Id == deployId && (d.Status == DeployStatus.Initializing || d.Status == DeployStatus.Downloading))
            .ExecuteUpdateAsync(set => set
                .SetProperty(d => d.Status, DeployStatus.Failed)
                .SetProperty(d => d.FailReason, reason)
                .SetProperty(d => d.FailClass, reasonClass)
                .SetProperty(d => d.LeaseOwner, (string?)null)
                .SetProperty(d => d.LeaseExpiresAt, (DateTime?)null)
                .SetProperty(d => d.UpdatedAt, now), ct);
}
