using LoraDeploy.Audit;
using LoraDeploy.Auth;
using LoraDeploy.Data;
using LoraDeploy.OpenApi;
using LoraDeploy.Validation;
using Microsoft.AspNetCore.Http.HttpResults;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Deploys;

/// <summary>Settings section <c>Deploy</c>.</summary>
public sealed class DeployOptions
{
    public const string Section = "Deploy";

    /// <summary>Upper bound for <c>max_instances</c>.</summary>
    [System.ComponentModel.DataAnnotations.Range(1, 1024)]
    public int MaxInstances { get; set; } = 4;

    /// <summary>
    /// SQLite only: bytes of rendered <c>GET /deploy/{id}</c> and <c>GET /deploy/list</c> bodies kept to answer polls
    /// until the next commit; 0 turns it off.
    /// </summary>
    [System.ComponentModel.DataAnnotations.Range(typeof(long), "0", "1099511627776")]
    public long ReadCacheBytes { get; set; } = 64L * 1024 * 1024;

    public const string EfReads = "ef";

    /// <summary>
    /// <c>sql</c> (default): <see cref="DeployReads"/>' own SQL. <c>ef</c>: plain EF queries, only to measure what the
    /// special path is worth (docs/benchmarks.md).
    /// </summary>
    [System.ComponentModel.DataAnnotations.RegularExpression("^(sql|ef)$")]
    public string Reads { get; set; } = "sql";
}

public static class DeployEndpoints
{
    public static IServiceCollection AddDeployApi(this IServiceCollection services)
    {
        services.AddOptions<DeployOptions>().BindConfiguration(DeployOptions.Section).ValidateDataAnnotations().ValidateOnStart();
        services.AddSingleton(DeployReads.Create);
        return services;
    }

    public static IEndpointRouteBuilder MapDeploys(this IEndpointRouteBuilder app)
    {
        var deploy = app.MapGroup("/deploy").WithTags("Deploy").RequireAuthorization();

        deploy.MapGet("/list", ListDeploys).WithName("ListDeploys").WithSummary("Your deployments")
            .Produces<HTTPValidationError>(StatusCodes.Status422UnprocessableEntity);
        deploy.MapGet("/{deploy_id}", GetDeploy).WithName("GetDeploy").WithSummary("Deploy status");
        deploy.MapPut("/{deploy_id}", UpdateDeploy)
            .WithRequestBody<DeployLLMUpdateIn>()
            .Produces<HTTPValidationError>(StatusCodes.Status422UnprocessableEntity)
            .WithSummary("Change scale settings")
            .Audited(AuditLog.Actions.Settings, "deploy", "deploy_id", bodyFields: true)
            .AddEndpointFilter(WakePlacement);
        deploy.MapDelete("/{deploy_id}", DeleteDeploy).WithSummary("Delete a deployment (idempotent)")
            .Audited(AuditLog.Actions.Delete, "deploy", "deploy_id").AddEndpointFilter(WakePlacement);
        deploy.MapPost("/{deploy_id}/stop", StopDeploy).WithSummary("Stop a deploying or running deployment")
            .Audited(AuditLog.Actions.Stop, "deploy", "deploy_id").AddEndpointFilter(WakePlacement);
        deploy.MapPost("/{deploy_id}/start", StartDeploy).WithSummary("Start a stopped deployment")
            .Audited(AuditLog.Actions.Start, "deploy", "deploy_id").AddEndpointFilter(WakePlacement);
        return app;
    }

    /// <summary>After a change of what a deploy wants (scale, stop, start, delete), placement acts on it now, not at its next pass.</summary>
    private static async ValueTask<object?> WakePlacement(EndpointFilterInvocationContext context, EndpointFilterDelegate next)
    {
        var result = await next(context);
        context.HttpContext.RequestServices.GetRequiredService<Workers.Placement>().Wake();
        return result;
    }

    internal static async Task<Results<DeployListJson, Ok<List<DeploymentOut>>, JsonHttpResult<HTTPValidationError>>> ListDeploys(
        string? status,
        [System.ComponentModel.Description(Paging.LimitDescription)] string? limit,
        [System.ComponentModel.Description(Paging.AfterDescription)] string? after,
        HttpContext http, DeployReads reads, LoraDeployDbContext db, CancellationToken ct)
    {
        var user = CurrentUser.From(http.User);
        var errors = new ValidationErrors();
        List<string>? wanted = null;
        if (!string.IsNullOrWhiteSpace(status))
        {
            wanted = status.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries).Distinct().ToList();
            var unknown = wanted.Where(s => !DeployStatus.All.Contains(s)).ToList();
            if (unknown.Count > 0)
            {
                errors.Add(["query", "status"],
                    $"Value error, unknown status {string.Join(", ", unknown.Select(u => $"'{u}'"))}; expected a comma-separated list of: {string.Join(", ", DeployStatus.All)}",
                    "value_error");
            }
        }
        var page = Paging.Read(limit, after, errors);
        if (errors.Any)
        {
            return errors.ToResult();
        }
        if (page is null)
        {
            return new DeployListJson(reads, user.Id, wanted);
        }
        return TypedResults.Ok(await PageAsync(db, user, wanted, page, http, ct));
    }

    /// <summary>One page of the list, newest first, through EF: paging is the rare path, the hot poll stays on <see cref="DeployReads"/>.</summary>
    private static async Task<List<DeploymentOut>> PageAsync(
        LoraDeployDbContext db, CurrentUser user, List<string>? statuses, Paging.Page page, HttpContext http, CancellationToken ct)
    {
        var query = db.Deploys.Where(d => d.UserId == user.Id);
        query = statuses is null ? query.Where(d => d.Status != DeployStatus.Deleted) : query.Where(d => statuses.Contains(d.Status));
        if (page.AfterCreatedAt is { } createdAt && page.AfterId is { } afterId)
        {
            query = query.Where(d => d.CreatedAt < createdAt || (d.CreatedAt == createdAt && d.Id.CompareTo(afterId) < 0));
        }
        var rows = await query.OrderByDescending(d => d.CreatedAt).ThenByDescending(d => d.Id).Take(page.Limit + 1).ToListAsync(ct);
        Paging.LinkNext(http, page, rows.Count, () => Paging.Cursor(rows[page.Limit - 1].CreatedAt, rows[page.Limit - 1].Id));
        return rows.Take(page.Limit).Select(d => new DeploymentOut(d.Id, d.ModelName, d.Version, d.Task, d.Status, d.FailReason,
            Timestamps.Format(d.CreatedAt), Timestamps.Format(d.UpdatedAt), new DeployInstances(d.RunningInstances, d.PendingInstances),
            null, new ScaleSettings(d.MinInstances, d.MaxInstances), d.Type)).ToList();
    }

    internal static async Task<Results<DeployJson, NotFound<DeepError>>> GetDeploy(
        string deploy_id, HttpContext http, DeployReads reads, CancellationToken ct)
    {
        var user = CurrentUser.From(http.User);
        var deploy = await reads.ByIdAsync(deploy_id, user.Id, ct);
        return deploy is null ? DeployNotFound(deploy_id) : deploy;
    }

    internal static async Task<IResult> UpdateDeploy(
        string deploy_id, HttpContext http, LoraDeployDbContext db, IOptions<DeployOptions> options, TimeProvider time, CancellationToken ct)
    {
        var user = CurrentUser.From(http.User);
        var (body, error) = await RequestBody.ReadObjectAsync(http.Request, ct);
        if (body is not { } json)
        {
            return error!;
        }
        var errors = new ValidationErrors();
        var settings = errors.Object(json, "settings", ["body", "settings"], required: true);
        var cap = options.Value.MaxInstances;
        int? min = null, max = null;
        if (settings is { } s)
        {
            min = errors.Int(s, "min_instances", ["body", "settings", "min_instances"], required: false) ?? (s.TryGetProperty("min_instances", out _) ? null : 1);
            max = errors.Int(s, "max_instances", ["body", "settings", "max_instances"], required: false) ?? (s.TryGetProperty("max_instances", out _) ? null : 1);
            if (min < 0)
            {
                errors.Add(["body", "settings", "min_instances"], "Input should be greater than or equal to 0", "greater_than_equal");
            }
            if (max < 0)
            {
                errors.Add(["body", "settings", "max_instances"], "Input should be greater than or equal to 0", "greater_than_equal");
            }
            if (max > cap)
            {
                errors.Add(["body", "settings", "max_instances"], $"Input should be less than or equal to {cap}", "less_than_equal");
            }
            if (min > cap)
            {
                errors.Add(["body", "settings", "min_instances"], $"Input should be less than or equal to {cap}", "less_than_equal");
            }
            if (!errors.Any && min > max)
            {
                errors.Add(["body", "settings"], "Value error, min_instances must not be greater than max_instances", "value_error");
            }
        }
        if (errors.Any || min is null || max is null)
        {
            return errors.ToResult();
        }

        var now = time.GetUtcNow().UtcDateTime;
        var updated = await db.Deploys
            .Where(d => d.Id == deploy_id && d.UserId == user.Id && d.Status != DeployStatus.Deleted && d.Status != DeployStatus.Failed)
            .ExecuteUpdateAsync(set => set
                .SetProperty(d => d.MinInstances, min.Value)
                .SetProperty(d => d.MaxInstances, max.Value)
                .SetProperty(d => d.UpdatedAt, now), ct);
        if (updated == 1)
        {
            return TypedResults.Ok(new DeployStatusOut(deploy_id));
        }
        var current = await StatusOf(db, user, deploy_id, ct);
        return current is null
            ? DeployNotFound(deploy_id)
            : ApiErrors.BadRequest($"Deploy {deploy_id} is {current}; its settings can no longer be changed.");
    }

    internal static async Task<Results<Ok<DeployStatusOut>, NotFound<DeepError>, BadRequest<DeepError>>> DeleteDeploy(
        string deploy_id, HttpContext http, LoraDeployDbContext db, TimeProvider time, CancellationToken ct)
    {
        var user = CurrentUser.From(http.User);
        if (await StatusOf(db, user, deploy_id, ct) is null)
        {
            return DeployNotFound(deploy_id);
        }
        await MarkDeletedAsync(db, deploy_id, time.GetUtcNow().UtcDateTime, ct);
        return TypedResults.Ok(new DeployStatusOut(deploy_id));
    }

    internal static Task<Results<Ok<DeployStatusOut>, NotFound<DeepError>, BadRequest<DeepError>>> StopDeploy(
        string deploy_id, HttpContext http, LoraDeployDbContext db, TimeProvider time, CancellationToken ct) =>
        TransitionAsync(db, CurrentUser.From(http.User), deploy_id, [DeployStatus.Deploying, DeployStatus.Running], DeployStatus.Stopped,
            "only a deploying or running deployment can be stopped", time, ct);

    /// <summary>
    /// Starts a stopped deployment, or retries a failed import: the same deploy (id and name) goes back to
    /// <c>initializing</c> and the pipeline resolves and fetches it again, now that its cause may be gone.
    /// </summary>
    internal static async Task<Results<Ok<DeployStatusOut>, NotFound<DeepError>, BadRequest<DeepError>>> StartDeploy(
        string deploy_id, HttpContext http, LoraDeployDbContext db, Pipeline.PipelineSignal pipeline, IOptionsMonitor<Pipeline.PolicyOptions> policy,
        Quotas.QuotaGate quotas, TimeProvider time, CancellationToken ct)
    {
        var user = CurrentUser.From(http.User);
        var now = time.GetUtcNow().UtcDateTime;
        await using (var transaction = await db.Database.BeginTransactionAsync(ct))
        {
            // Retrying a failed import starts an import again: it must fit the concurrent-imports quota like a create.
            if (await db.Deploys.AnyAsync(d => d.Id == deploy_id && d.UserId == user.Id && d.Status == DeployStatus.Failed, ct)
                && await quotas.RefuseRequeueAsync(db, user.Id, user.Name, ct) is { } overQuota)
            {
                return ApiErrors.BadRequest($"Deploy {deploy_id} cannot be started: {overQuota}");
            }
            var requeued = await db.Deploys
                .Where(d => d.Id == deploy_id && d.UserId == user.Id && d.Status == DeployStatus.Failed)
                .ExecuteUpdateAsync(set => set
                    .SetProperty(d => d.Status, DeployStatus.Initializing)
                    .SetProperty(d => d.FailReason, "")
                    .SetProperty(d => d.FailClass, "")
                    .SetProperty(d => d.UpdatedAt, now), ct);
            if (requeued == 1)
            {
                await db.ImportJobs.Where(j => j.DeployId == deploy_id)
                    .ExecuteUpdateAsync(set => set
                        .SetProperty(j => j.Status, ImportJobStatus.Queued)
                        .SetProperty(j => j.DownloadId, (long?)null)
                        .SetProperty(j => j.LeaseOwner, (string?)null)
                        .SetProperty(j => j.LeaseExpiresAt, (DateTime?)null)
                        .SetProperty(j => j.UpdatedAt, now), ct);
                // Progress counts from zero again until the new bytes are stored and probed.
                await db.Loras.Where(l => db.Deploys.Any(d => d.Id == deploy_id && d.LoraId == l.Id) && !l.Deleted)
                    .ExecuteUpdateAsync(set => set.SetProperty(l => l.AdapterSha256, (string?)null).SetProperty(l => l.UpdatedAt, now), ct);
                await transaction.CommitAsync(ct);
                pipeline.Wake();
                return TypedResults.Ok(new DeployStatusOut(deploy_id));
            }
        }
        // The operator may have tightened the policy since this LoRA was imported: a stopped deploy is checked again.
        // (A failed one is resolved anew above, and the pipeline checks it then.) 400 like the other start refusals.
        var stopped = await db.Deploys
            .Where(d => d.Id == deploy_id && d.UserId == user.Id && d.Status == DeployStatus.Stopped)
            .Select(d => d.Lora)
            .FirstOrDefaultAsync(ct);
        if (stopped is { SourceType: "civitai" or "upload" }
            && Pipeline.PolicyGate.Check(policy.CurrentValue, stopped.CivitaiModelId, Pipeline.PolicyGate.RecordedLicense(stopped)) is { } refusal)
        {
            return ApiErrors.BadRequest($"Deploy {deploy_id} cannot be started: {refusal}.");
        }
        return await TransitionAsync(db, user, deploy_id, [DeployStatus.Stopped], DeployStatus.Deploying,
            "only a stopped deployment, or one whose import failed, can be started", time, ct);
    }

    /// <summary>Marks a deploy and its LoRA deleted. Idempotent; the pipeline notices and cancels any fetch.</summary>
    internal static async Task MarkDeletedAsync(LoraDeployDbContext db, string deployId, DateTime now, CancellationToken ct)
    {
        await using var transaction = await db.Database.BeginTransactionAsync(ct);
        await db.Deploys
            .Where(d => d.Id == deployId && d.Status != DeployStatus.Deleted)
            .ExecuteUpdateAsync(set => set
                .SetProperty(d => d.Status, DeployStatus.Deleted)
                .SetProperty(d => d.RunningInstances, 0)
                .SetProperty(d => d.PendingInstances, 0)
                .SetProperty(d => d.UpdatedAt, now), ct);
        await Pipeline.DeployFailure.EndImportAsync(db, deployId, now, ct);
        await db.Loras
            .Where(l => db.Deploys.Any(d => d.Id == deployId && d.LoraId == l.Id) && !l.Deleted)
            .ExecuteUpdateAsync(set => set.SetProperty(l => l.Deleted, true).SetProperty(l => l.UpdatedAt, now), ct);
        await transaction.CommitAsync(ct);
    }

    /// <summary>A conditional update: the transition happens only from the allowed statuses, even under races.</summary>
    private static async Task<Results<Ok<DeployStatusOut>, NotFound<DeepError>, BadRequest<DeepError>>> TransitionAsync(
        LoraDeployDbContext db, CurrentUser user, string deployId, string[] from, string to, string rule, TimeProvider time, CancellationToken ct)
    {
        var now = time.GetUtcNow().UtcDateTime;
        var updated = await db.Deploys
            .Where(d => d.Id == deployId && d.UserId == user.Id && from.Contains(d.Status))
            .ExecuteUpdateAsync(set => set
                .SetProperty(d => d.Status, to)
                .SetProperty(d => d.RunningInstances, 0)
                .SetProperty(d => d.PendingInstances, 0)
                .SetProperty(d => d.UpdatedAt, now), ct);
        if (updated == 1)
        {
            return TypedResults.Ok(new DeployStatusOut(deployId));
        }
        var current = await StatusOf(db, user, deployId, ct);
        return current is null
            ? DeployNotFound(deployId)
            : ApiErrors.BadRequest($"Deploy {deployId} is {current}; {rule}.");
    }

    private static Task<string?> StatusOf(LoraDeployDbContext db, CurrentUser user, string deployId, CancellationToken ct) =>
        db.Deploys.Where(d => d.Id == deployId && d.UserId == user.Id).Select(d => d.Status).FirstOrDefaultAsync(ct);

    private static NotFound<DeepError> DeployNotFound(string id) => ApiErrors.NotFound($"Deploy '{id}' not found.");
}
