using LoraDeploy.Data;

namespace LoraDeploy.Deploys;

public static class DeployProjection
{
    /// <summary>Projects straight to the wire type, so a read costs one query and no tracking.</summary>
    public static IQueryable<DeploymentOut> ToOut(this IQueryable<Deploy> deploys) =>
        deploys.Select(d => new DeploymentOut(
            d.Id,
            d.ModelName,
            d.Version,
            d.Task,
            d.Status,
            d.FailReason,
            Timestamps.Format(d.CreatedAt),
            Timestamps.Format(d.UpdatedAt),
            new DeployInstances(d.RunningInstances, d.PendingInstances),
            null,
            new ScaleSettings(d.MinInstances, d.MaxInstances),
            d.Type));
}
