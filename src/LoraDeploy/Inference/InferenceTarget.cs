using System.Globalization;
using System.Text.Json;
using LoraDeploy.BaseModels;
using LoraDeploy.Data;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Inference;

/// <summary>One adapter to apply, with its strength.</summary>
public sealed record AppliedAdapter(string Sha256, float Scale, string ModelName);

/// <summary>What a request resolved to: the pool that serves it and the adapters to apply there.</summary>
public sealed record InferenceTarget(BaseModelEntry Pool, IReadOnlyList<AppliedAdapter> Adapters)
{
    /// <summary>The <see cref="Workers.WorkerProtocol.AdaptersHeader"/> value.</summary>
    public string AdaptersHeader => string.Join(',', Adapters.Select(a => $"{a.Sha256}:{a.Scale.ToString("R", CultureInfo.InvariantCulture)}"));
}

/// <summary>Why a model could not be served, as the status the gateway answers with.</summary>
public sealed record TargetProblem(int Status, string Message, string Param);

/// <summary>
/// Resolves what a request names — <c>owner/lora_name</c>, a deploy id, or a base model (no adapter) — to a pool and
/// adapters, with the visibility every route has: a private LoRA serves its owner only (404 to anyone else, as if it
/// did not exist), a public one everybody; a deploy that is not running answers 423 naming its status.
/// </summary>
public static class InferenceTargets
{
    public const float MaxScale = 8f;

    /// <summary>A base model comes from the registry; only an adapter's name asks the database (a context just for that query).</summary>
    public static async Task<(InferenceTarget? Target, TargetProblem? Problem)> ResolveModelAsync(
        IDbContextFactory<LoraDeployDbContext> contexts, BaseModelRegistry registry, long callerId, string model, float scale, CancellationToken ct)
    {
        if (registry.Find(model) is { } baseModel)
        {
            return baseModel.IsPool
                ? (new InferenceTarget(baseModel, []), null)
                : (null, new TargetProblem(StatusCodes.Status404NotFound, $"Base model '{model}' is not served here (no engine is configured for it).", "model"));
        }
        var slash = model.IndexOf('/');
        if (slash <= 0 || slash == model.Length - 1 || model.IndexOf('/', slash + 1) >= 0)
        {
            return (null, new TargetProblem(StatusCodes.Status404NotFound, $"Model '{model}' not found: use owner/lora_name or a base model name.", "model"));
        }
        var (owner, name) = (model[..slash], model[(slash + 1)..]);
        await using var db = await contexts.CreateDbContextAsync(ct);
        var row = await db.Deploys
            .Where(d => d.Lora!.Name == name && d.Lora.User!.Name == owner && !d.Lora.Deleted && d.Status != DeployStatus.Deleted)
            .Select(d => new Row(d.Id, d.Status, d.UserId, d.Lora!.Private, d.Lora.BaseModel, d.Lora.AdapterSha256, d.ModelName))
            .FirstOrDefaultAsync(ct);
        return Check(row, registry, callerId, $"Model '{model}' not found.", scale);
    }

    public static async Task<(InferenceTarget? Target, TargetProblem? Problem)> ResolveDeployAsync(
        IDbContextFactory<LoraDeployDbContext> contexts, BaseModelRegistry registry, long callerId, string deployId, float scale, CancellationToken ct)
    {
        await using var db = await contexts.CreateDbContextAsync(ct);
        var row = await db.Deploys
            .Where(d => d.Id == deployId && d.Status != DeployStatus.Deleted && !d.Lora!.Deleted)
            .Select(d => new Row(d.Id, d.Status, d.UserId, d.Lora!.Private, d.Lora.BaseModel, d.Lora.AdapterSha256, d.ModelName))
            .FirstOrDefaultAsync(ct);
        return Check(row, registry, callerId, $"Deploy '{deployId}' not found.", scale);
    }

    /// <summary>Several adapters in one request (our extension): <c>loras: [{"model": "owner/name", "scale": 0.8}]</c>, all on one pool.</summary>
    public static async Task<(InferenceTarget? Target, TargetProblem? Problem)> AddAdaptersAsync(
        IDbContextFactory<LoraDeployDbContext> contexts, BaseModelRegistry registry, long callerId, InferenceTarget target, JsonElement loras, CancellationToken ct)
    {
        if (loras.ValueKind != JsonValueKind.Array || loras.GetArrayLength() is 0 or > 8)
        {
            return (null, new TargetProblem(StatusCodes.Status422UnprocessableEntity, "loras must be a list of 1 to 8 {\"model\", \"scale\"} objects.", "loras"));
        }
        var adapters = target.Adapters.ToList();
        var index = 0;
        foreach (var item in loras.EnumerateArray())
        {
            var param = $"loras[{index++}]";
            if (item.ValueKind != JsonValueKind.Object || !item.TryGetProperty("model", out var m) || m.ValueKind != JsonValueKind.String)
            {
                return (null, new TargetProblem(StatusCodes.Status422UnprocessableEntity, $"{param}.model must be a string (owner/lora_name).", param));
            }
            var scale = 1f;
            if (item.TryGetProperty("scale", out var s) && (s.ValueKind != JsonValueKind.Number || !s.TryGetSingle(out scale) || !ValidScale(scale)))
            {
                return (null, new TargetProblem(StatusCodes.Status422UnprocessableEntity, $"{param}.scale must be a number from -{MaxScale} to {MaxScale}.", param));
            }
            var (resolved, problem) = await ResolveModelAsync(contexts, registry, callerId, m.GetString()!, scale, ct);
            if (problem is not null)
            {
                return (null, problem with { Param = param });
            }
            if (resolved!.Pool.Name != target.Pool.Name)
            {
                return (null, new TargetProblem(StatusCodes.Status422UnprocessableEntity,
                    $"{param}: '{m.GetString()}' is a LoRA of {resolved.Pool.Name}, not of {target.Pool.Name}; adapters of one request share one base model.", param));
            }
            adapters.AddRange(resolved.Adapters);
        }
        return (target with { Adapters = adapters.DistinctBy(a => a.Sha256).ToList() }, null);
    }

    public static bool ValidScale(float scale) => float.IsFinite(scale) && Math.Abs(scale) <= MaxScale;

    private sealed record Row(string Id, string Status, long UserId, bool Private, string BaseModel, string? Sha256, string ModelName);

    private static (InferenceTarget?, TargetProblem?) Check(Row? row, BaseModelRegistry registry, long callerId, string notFound, float scale)
    {
        if (row is null || (row.Private && row.UserId != callerId))
        {
            return (null, new TargetProblem(StatusCodes.Status404NotFound, notFound, "model"));
        }
        if (row.Status != DeployStatus.Running || row.Sha256 is null)
        {
            return (null, new TargetProblem(StatusCodes.Status423Locked,
                $"Deploy {row.Id} ({row.ModelName}) is {row.Status}, not running; inference needs a running deploy.", "model"));
        }
        if (registry.Find(row.BaseModel) is not { IsPool: true } pool)
        {
            return (null, new TargetProblem(StatusCodes.Status423Locked, $"Base model {row.BaseModel} of {row.ModelName} is not served here (no engine is configured for it).", "model"));
        }
        return (new InferenceTarget(pool, [new AppliedAdapter(row.Sha256, scale, row.ModelName)]), null);
    }
}
