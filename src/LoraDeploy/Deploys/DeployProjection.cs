using System.Linq.Expressions;
using LoraDeploy.Data;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Deploys;

public static class DeployProjection
{
    /// <summary>Projects straight to the wire type, so a read costs one query and no tracking.</summary>
    public static IQueryable<DeploymentOut> ToOut(this IQueryable<Deploy> deploys) => deploys.Select(Projection);

    /// <summary>The projection as an expression, so compiled queries can inline it (they cannot expand <see cref="ToOut"/>).</summary>
    private static readonly Expression<Func<Deploy, DeploymentOut>> Projection = d => new DeploymentOut(
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
        d.Type);

    /// <summary>
    /// The two hottest reads, compiled once: EF otherwise rebuilds, hashes and looks up the expression tree on every
    /// request, which a wrk profile showed to be a large share of a cache-hit request. Both are one index range scan:
    /// the primary key for one deploy, <c>IX_deploys_UserId_CreatedAt_Id</c> (already in list order) for a user's list.
    /// </summary>
    public static Task<DeploymentOut?> ByIdAsync(LoraDeployDbContext db, string id, long userId, CancellationToken ct) => db switch
    {
        SqliteLoraDeployContext sqlite => Compiled<SqliteLoraDeployContext>.ById(sqlite, id, userId, ct),
        PostgresLoraDeployContext postgres => Compiled<PostgresLoraDeployContext>.ById(postgres, id, userId, ct),
        _ => db.Deploys.Where(d => d.Id == id && d.UserId == userId).ToOut().FirstOrDefaultAsync(ct),
    };

    /// <summary>The caller's deploys that are not deleted, newest first.</summary>
    public static IAsyncEnumerable<DeploymentOut> NotDeletedOf(LoraDeployDbContext db, long userId) => db switch
    {
        SqliteLoraDeployContext sqlite => Compiled<SqliteLoraDeployContext>.NotDeletedOf(sqlite, userId),
        PostgresLoraDeployContext postgres => Compiled<PostgresLoraDeployContext>.NotDeletedOf(postgres, userId),
        _ => db.Deploys.Where(d => d.UserId == userId && d.Status != DeployStatus.Deleted)
            .OrderByDescending(d => d.CreatedAt).ThenByDescending(d => d.Id).ToOut().AsAsyncEnumerable(),
    };

    /// <summary>
    /// One compiled query per provider context: EF binds a compiled query to the first model it runs against, and
    /// one process may hold both providers (the tests do).
    /// </summary>
    private static class Compiled<TContext> where TContext : LoraDeployDbContext
    {
        public static readonly Func<TContext, string, long, CancellationToken, Task<DeploymentOut?>> ById =
            EF.CompileAsyncQuery((TContext db, string id, long userId, CancellationToken ct) =>
                db.Deploys.Where(d => d.Id == id && d.UserId == userId).Select(Projection).FirstOrDefault());

        public static readonly Func<TContext, long, IAsyncEnumerable<DeploymentOut>> NotDeletedOf =
            EF.CompileAsyncQuery((TContext db, long userId) =>
                db.Deploys.Where(d => d.UserId == userId && d.Status != DeployStatus.Deleted)
                    .OrderByDescending(d => d.CreatedAt).ThenByDescending(d => d.Id).Select(Projection));
    }
}
