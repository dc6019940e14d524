using System.Linq.Expressions;
using System.Text.Json;
using LoraDeploy.Data;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Deploys;

/// <summary>
/// The deploy reads as plain EF queries (<c>Deploy:Reads=ef</c>), kept beside <see cref="SqliteDeployReads"/> and
/// <see cref="PostgresDeployReads"/> only to measure what the special path is worth while workers' heartbeats and
/// imports write (docs/benchmarks.md § "Deploy reads under heartbeats").
/// </summary>
public sealed class EfDeployReads(IDbContextFactory<LoraDeployDbContext> contexts) : DeployReads("IN (@statuses)")
{
    public override async ValueTask<DeployJson?> ByIdAsync(string id, long userId, CancellationToken ct)
    {
        await using var db = await contexts.CreateDbContextAsync(ct);
        var row = await db.Deploys.Where(d => d.Id == id && d.UserId == userId).Select(Projection).FirstOrDefaultAsync(ct);
        return row is null ? null : new DeployJson(JsonSerializer.SerializeToUtf8Bytes(row, ApiJson.Context.DeploymentOut));
    }

    public override async Task WriteListAsync(long userId, IReadOnlyCollection<string>? statuses, DeployListOutput output, CancellationToken ct)
    {
        List<DeploymentOut> rows;
        await using (var db = await contexts.CreateDbContextAsync(ct))
        {
            var query = db.Deploys.Where(d => d.UserId == userId);
            query = statuses is null ? query.Where(d => d.Status != DeployStatus.Deleted) : query.Where(d => statuses.Contains(d.Status));
            rows = await query.OrderByDescending(d => d.CreatedAt).ThenByDescending(d => d.Id).Select(Projection).ToListAsync(ct);
        }
        await using var json = new Utf8JsonWriter(output, DeployJsonWriter.Options);
        JsonSerializer.Serialize(json, rows, ApiJson.Context.ListDeploymentOut);
        await output.CompleteAsync(json, ct);
    }

    // The timestamps are formatted client-side in the final projection; EF reads only the columns used here.
    private static readonly Expression<Func<Deploy, DeploymentOut>> Projection = d => new DeploymentOut(d.Id, d.ModelName, d.Version, d.Task, d.Status, d.FailReason,
        Timestamps.Format(d.CreatedAt), Timestamps.Format(d.UpdatedAt), new DeployInstances(d.RunningInstances, d.PendingInstances),
        null, new ScaleSettings(d.MinInstances, d.MaxInstances), d.Type);
}
