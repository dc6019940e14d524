using System.ComponentModel.DataAnnotations;
using System.Security.Claims;
using System.Text.Json;
using System.Text.RegularExpressions;
using LoraDeploy.BaseModels;
using LoraDeploy.Data;
using LoraDeploy.Storage;
using LoraDeploy.Validation;
using Microsoft.AspNetCore.Authentication;
using Microsoft.AspNetCore.Http.HttpResults;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Workers;

/// <summary>Settings section <c>Workers</c>: how the server treats workers (and whether <c>serve</c> runs one itself).</summary>
public sealed class WorkersOptions
{
    public const string Section = "Workers";

    /// <summary><c>serve</c> runs an in-process worker for the pools configured on its host.</summary>
    public bool Embedded { get; set; } = true;

    /// <summary>How often workers heartbeat.</summary>
    [Range(1, 60)]
    public int HeartbeatSeconds { get; set; } = 1;

    /// <summary>A worker silent this long is out of routing and its instances are placed elsewhere.</summary>
    [Range(2, 600)]
    public int TimeoutSeconds { get; set; } = 6;

    /// <summary>Outstanding inference requests per pool (per server replica) before 429.</summary>
    [Range(1, 100_000)]
    public int MaxOutstandingPerPool { get; set; } = 200;

    /// <summary>The <c>Retry-After</c> (seconds) of a 429.</summary>
    [Range(1, 3600)]
    public int RetryAfterSeconds { get; set; } = 2;

    /// <summary>An inference request that takes longer is answered 504 and cancelled on its worker.</summary>
    [Range(1, 86_400)]
    public int RequestTimeoutSeconds { get; set; } = 300;

    /// <summary>How long a request waits for a busy worker that already holds its adapter before going elsewhere.</summary>
    [Range(0, 60_000)]
    public int HolderWaitMilliseconds { get; set; } = 1000;

    /// <summary>
    /// <c>affinity</c> (default): prefer workers that hold the request's adapters. <c>random</c>: any live worker of the
    /// pool — only for measuring what affinity saves (docs/benchmarks.md).
    /// </summary>
    [RegularExpression("^(affinity|random)$")]
    public string Routing { get; set; } = "affinity";

    /// <summary>
    /// How long the router reuses one read of the workers table (0: a read per request). Heartbeats change it about once
    /// a second, so a read shared for a fraction of that costs routing nothing it would notice.
    /// </summary>
    [Range(0, 2_000)]
    public int RouterSnapshotMilliseconds { get; set; } = 250;

    /// <summary>Largest inference request body (bytes); larger ones are answered 413.</summary>
    [Range(1024, 64 * 1024 * 1024)]
    public int MaxRequestBytes { get; set; } = 1024 * 1024;
}

/// <summary>The routes workers call (their own credential kind; see <see cref="WorkerProtocol"/>).</summary>
public static partial class WorkerEndpoints
{
    public static IServiceCollection AddWorkerApi(this IServiceCollection services)
    {
        services.AddOptions<WorkersOptions>().BindConfiguration(WorkersOptions.Section).ValidateDataAnnotations().ValidateOnStart();
        services.AddAuthentication()
            .AddScheme<AuthenticationSchemeOptions, WorkerAuthenticationHandler>(WorkerAuthenticationHandler.SchemeName, null);
        services.AddAuthorizationBuilder().AddPolicy(WorkerAuthenticationHandler.PolicyName, policy => policy
            .AddAuthenticationSchemes(WorkerAuthenticationHandler.SchemeName)
            .RequireAuthenticatedUser()
            .RequireRole(WorkerAuthenticationHandler.Role));
        services.AddSingleton<EmbeddedWorker>();
        services.AddHostedService(sp => sp.GetRequiredService<EmbeddedWorker>());
        services.AddSingleton<WorkerWaker>();
        services.AddSingleton<Placement>();
        services.AddHostedService(sp => sp.GetRequiredService<Placement>());
        return services;
    }

    public static IEndpointRouteBuilder MapWorkerApi(this IEndpointRouteBuilder app)
    {
        var workers = app.MapGroup("/internal/v1/workers")
            .RequireAuthorization(WorkerAuthenticationHandler.PolicyName)
            .ExcludeFromDescription();
        workers.MapPost("/register", Register);
        workers.MapPost("/{id}/heartbeat", Heartbeat);
        workers.MapPost("/{id}/leave", Leave);
        workers.MapGet("/blobs/{sha256}", GetBlob);

        app.MapGet("/v1/workers", ListWorkers)
            .WithTags("Workers")
            .WithSummary("Workers with their pools, slots, resident adapters and last heartbeat (admins)")
            .RequireAuthorization(policy => policy.RequireRole("admin"))
            .RequireRateLimiting(RateLimits.ManagementRateLimitPolicy.Name);
        return app;
    }

    [GeneratedRegex("^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    private static partial Regex WorkerId();

    [GeneratedRegex("^[0-9a-f]{64}$")]
    internal static partial Regex Sha256Hex();

    internal static async Task<Results<Ok<WorkerRegistered>, JsonHttpResult<HTTPValidationError>, JsonHttpResult<DeepError>>> Register(
        HttpContext http, LoraDeployDbContext db, BaseModelRegistry registry, IOptions<WorkersOptions> options, Placement placement, Inference.InferenceRouter router,
        TimeProvider time, CancellationToken ct)
    {
        var (registration, invalid, tooLarge) = await ReadAsync(http, WorkerJsonContext.Default.WorkerRegistration, ct);
        if (registration is null)
        {
            return invalid is null ? tooLarge! : invalid;
        }
        var errors = new ValidationErrors();
        if (registration.Id is null || !WorkerId().IsMatch(registration.Id))
        {
            errors.Add(["body", "id"], "Value error, 1-64 of letters, digits, '.', '_', '-', starting alphanumeric", "value_error");
        }
        if (registration.Engine is not (Engines.LlamaCpp or Engines.ComfyUi))
        {
            errors.Add(["body", "engine"], $"Value error, engine must be {Engines.LlamaCpp} or {Engines.ComfyUi}", "value_error");
        }
        if (registration.Pools is null || registration.Pools.Count is 0 or > WorkerProtocol.MaxPools)
        {
            errors.Add(["body", "pools"], $"Value error, 1 to {WorkerProtocol.MaxPools} pools", "value_error");
        }
        else
        {
            for (var i = 0; i < registration.Pools.Count; i++)
            {
                var pool = registry.Find(registration.Pools[i] ?? "");
                if (pool?.Engine != registration.Engine)
                {
                    errors.Add(["body", "pools", i], $"Value error, '{registration.Pools[i]}' is not a {registration.Engine} pool on this server (BaseModels:{{name}}:Engine)", "value_error");
                }
            }
        }
        if (registration.Slots is < 1 or > WorkerProtocol.MaxSlots)
        {
            errors.Add(["body", "slots"], $"Value error, 1 to {WorkerProtocol.MaxSlots}", "value_error");
        }
        if (!Uri.TryCreate(registration.Url, UriKind.Absolute, out var url) || url.Scheme is not ("http" or "https") || registration.Url.Length > 2048)
        {
            errors.Add(["body", "url"], "Value error, an absolute http(s) URL", "value_error");
        }
        if (string.IsNullOrWhiteSpace(registration.Version) || registration.Version.Length > 64)
        {
            errors.Add(["body", "version"], "Value error, 1 to 64 characters", "value_error");
        }
        if (registration.CallKey is null || registration.CallKey.Length is < 32 or > 256)
        {
            errors.Add(["body", "call_key"], "Value error, 32 to 256 characters", "value_error");
        }
        if (errors.Any)
        {
            return errors.ToResult();
        }

        var name = http.User.FindFirstValue(ClaimTypes.Name)!;
        var now = time.GetUtcNow().UtcDateTime;
        var poolsJson = JsonSerializer.Serialize(registration.Pools!.ToList(), ApiJson.Context.ListString);
        // A worker id belongs to the worker token that first registered it; another token cannot take it over.
        var existing = await db.Workers.AsTracking().FirstOrDefaultAsync(w => w.Id == registration.Id, ct);
        if (existing is not null && existing.Name != name)
        {
            return ApiErrors.Error(StatusCodes.Status409Conflict, $"Worker id '{registration.Id}' is registered by another worker token.");
        }
        if (existing is null)
        {
            existing = new Worker
            {
                Id = registration.Id!, Name = name, Engine = registration.Engine!, PoolsJson = poolsJson, Url = registration.Url,
                Version = registration.Version, CallKey = registration.CallKey!, RegisteredAt = now,
            };
            db.Workers.Add(existing);
        }
        else
        {
            // A restarted worker lost everything it held: its instances start over.
            await db.Instances.Where(i => i.WorkerId == existing.Id).ExecuteDeleteAsync(ct);
        }
        existing.Engine = registration.Engine!;
        existing.PoolsJson = poolsJson;
        existing.Slots = registration.Slots;
        existing.Url = registration.Url.TrimEnd('/');
        existing.Version = registration.Version;
        existing.CallKey = registration.CallKey!;
        existing.QueueDepth = 0;
        existing.BusySlots = 0;
        existing.ResidentJson = "[]";
        existing.LastHeartbeatAt = now;
        await db.SaveChangesAsync(ct);
        router.Forget();
        placement.Wake(); // deploys waiting for a worker of these pools can be placed now
        return TypedResults.Ok(new WorkerRegistered(existing.Id, options.Value.HeartbeatSeconds));
    }

    internal static async Task<Results<Ok<WorkerAssignments>, NotFound<DeepError>, JsonHttpResult<HTTPValidationError>, JsonHttpResult<DeepError>>> Heartbeat(
        string id, HttpContext http, LoraDeployDbContext db, Inference.InferenceMetrics metrics, Placement placement,
        Inference.InferenceRouter router, TimeProvider time, CancellationToken ct)
    {
        var (heartbeat, invalid, tooLarge) = await ReadAsync(http, WorkerJsonContext.Default.WorkerHeartbeat, ct);
        if (heartbeat is null)
        {
            return invalid is null ? tooLarge! : invalid;
        }
        var errors = new ValidationErrors();
        if (heartbeat.QueueDepth < 0)
        {
            errors.Add(["body", "queue_depth"], "Value error, not negative", "value_error");
        }
        if (heartbeat.BusySlots < 0)
        {
            errors.Add(["body", "busy_slots"], "Value error, not negative", "value_error");
        }
        var reported = heartbeat.Adapters ?? [];
        if (reported.Count > WorkerProtocol.MaxReportedAdapters)
        {
            errors.Add(["body", "adapters"], $"Value error, at most {WorkerProtocol.MaxReportedAdapters}", "value_error");
        }
        for (var i = 0; i < Math.Min(reported.Count, WorkerProtocol.MaxReportedAdapters); i++)
        {
            var adapter = reported[i];
            if (adapter?.Sha256 is null || !Sha256Hex().IsMatch(adapter.Sha256))
            {
                errors.Add(["body", "adapters", i, "sha256"], "Value error, 64 lowercase hex characters", "value_error");
            }
            if (adapter?.State is not (InstanceState.Loading or InstanceState.Ready or InstanceState.Failed))
            {
                errors.Add(["body", "adapters", i, "state"], "Value error, loading, ready or failed", "value_error");
            }
            if (adapter?.Pool is null || adapter.Pool.Length > 200)
            {
                errors.Add(["body", "adapters", i, "pool"], "Value error, a pool name", "value_error");
            }
        }
        if (errors.Any)
        {
            return errors.ToResult();
        }

        var name = http.User.FindFirstValue(ClaimTypes.Name)!;
        var now = time.GetUtcNow().UtcDateTime;
        var ready = reported.Where(a => a.State == InstanceState.Ready).Select(a => $"{a.Pool}|{a.Sha256}").Distinct().ToList();
        // Adapters ready at the last heartbeat and gone now were unloaded (the worker's LRU, or a drop): counted per pool.
        var before = await db.Workers.Where(w => w.Id == id && w.Name == name).Select(w => w.ResidentJson).FirstOrDefaultAsync(ct);
        foreach (var gone in (before is null ? [] : JsonSerializer.Deserialize(before, ApiJson.Context.ListString) ?? []).Except(ready))
        {
            metrics.AdapterUnloaded(gone[..Math.Max(0, gone.LastIndexOf('|'))]);
        }
        var readyJson = JsonSerializer.Serialize(ready, ApiJson.Context.ListString);
        var updated = await db.Workers.Where(w => w.Id == id && w.Name == name)
            .ExecuteUpdateAsync(set => set
                .SetProperty(w => w.LastHeartbeatAt, now)
                .SetProperty(w => w.QueueDepth, heartbeat.QueueDepth)
                .SetProperty(w => w.BusySlots, heartbeat.BusySlots)
                .SetProperty(w => w.ResidentJson, readyJson), ct);
        if (before != readyJson)
        {
            router.Forget(); // what it holds changed: requests for those adapters should find it at once
        }
        if (updated == 0)
        {
            // Forgotten (it missed heartbeats) or never registered: the worker registers again.
            return TypedResults.NotFound(new DeepError($"Worker '{id}' is not registered."));
        }

        // What the worker reports becomes the instances' observed state. An adapter it reports without an instance is
        // only a cache entry (useful for routing, counted nowhere); an instance it no longer reports is loading again.
        // An adapter counts for an instance only on the instance's own pool (the deploy's base model).
        var byAdapter = reported.GroupBy(a => (a.Pool, a.Sha256)).ToDictionary(g => g.Key, g => g.First());
        var instances = await db.Instances.AsTracking().Where(i => i.WorkerId == id).ToListAsync(ct);
        var instanceDeploys = instances.Select(i => i.DeployId).ToList();
        var poolOf = await db.Deploys.Where(d => instanceDeploys.Contains(d.Id))
            .Select(d => new { d.Id, Pool = d.Lora!.BaseModel })
            .ToDictionaryAsync(d => d.Id, d => d.Pool, ct);
        var changed = false;
        foreach (var instance in instances)
        {
            var (state, reason) = byAdapter.TryGetValue((poolOf.GetValueOrDefault(instance.DeployId) ?? "", instance.AdapterSha256), out var seen)
                ? (seen.State, seen.State == InstanceState.Failed ? Truncate(seen.Reason ?? "the engine refused it without a reason", 2000) : "")
                : (InstanceState.Loading, "");
            if (instance.State != state || instance.FailReason != reason)
            {
                instance.State = state;
                instance.FailReason = reason;
                instance.Since = now;
                changed = true;
            }
        }
        await db.SaveChangesAsync(ct);
        if (changed)
        {
            placement.Wake(); // a deploy may be running (or failed) now, not at the next pass
        }

        var hold = await (
            from instance in db.Instances
            where instance.WorkerId == id && instance.State != InstanceState.Failed
            join blob in db.Blobs on instance.AdapterSha256 equals blob.Sha256
            join deploy in db.Deploys on instance.DeployId equals deploy.Id
            // A stopped or deleted deploy's instance is gone at the next placement pass; never hold and drop at once.
            where deploy.Status == DeployStatus.Deploying || deploy.Status == DeployStatus.Running
            select new AdapterAssignment(instance.AdapterSha256, deploy.Lora!.BaseModel, blob.SizeBytes))
            .Distinct()
            .ToListAsync(ct);
        // Whatever the worker holds that no live deploy of that pool uses any more goes now (stop, delete).
        var reportedShas = byAdapter.Keys.Select(k => k.Sha256).Distinct().ToList();
        var wanted = await db.Deploys
            .Where(d => (d.Status == DeployStatus.Deploying || d.Status == DeployStatus.Running)
                && d.Lora!.AdapterSha256 != null && reportedShas.Contains(d.Lora.AdapterSha256))
            .Select(d => new { Sha = d.Lora!.AdapterSha256!, Pool = d.Lora.BaseModel })
            .ToListAsync(ct);
        var drop = reported.Where(a => !wanted.Any(w => w.Sha == a.Sha256 && w.Pool == a.Pool)).Select(a => a.Sha256).Distinct().ToList();
        return TypedResults.Ok(new WorkerAssignments(hold, drop));
    }

    /// <summary>A worker stopping on purpose: forgotten now (its instances with it), so placement moves its deploys at once.</summary>
    internal static async Task<Results<NoContent, NotFound<DeepError>>> Leave(string id, HttpContext http, LoraDeployDbContext db, Placement placement,
        Inference.InferenceRouter router, CancellationToken ct)
    {
        var name = http.User.FindFirstValue(ClaimTypes.Name)!;
        var removed = await db.Workers.Where(w => w.Id == id && w.Name == name).ExecuteDeleteAsync(ct);
        if (removed == 0)
        {
            return TypedResults.NotFound(new DeepError($"Worker '{id}' is not registered."));
        }
        router.Forget();
        placement.Wake();
        return TypedResults.NoContent();
    }

    internal static async Task<JsonHttpResult<List<WorkerOut>>> ListWorkers(LoraDeployDbContext db, CancellationToken ct)
    {
        var rows = await db.Workers.OrderBy(w => w.Id)
            .Select(w => new { Worker = w, Instances = db.Instances.Count(i => i.WorkerId == w.Id) })
            .ToListAsync(ct);
        return TypedResults.Json(rows.Select(r => new WorkerOut(
            r.Worker.Id, r.Worker.Name, r.Worker.Engine,
            JsonSerializer.Deserialize(r.Worker.PoolsJson, ApiJson.Context.ListString) ?? [],
            r.Worker.Slots, r.Worker.BusySlots, r.Worker.QueueDepth,
            JsonSerializer.Deserialize(r.Worker.ResidentJson, ApiJson.Context.ListString) ?? [],
            r.Instances, r.Worker.Url, r.Worker.Version,
            Timestamps.Format(r.Worker.LastHeartbeatAt), Timestamps.Format(r.Worker.RegisteredAt))).ToList(),
            WorkerJsonContext.Default.ListWorkerOut);
    }

    /// <summary>An adapter's bytes for a worker (Range supported, so an interrupted fetch resumes).</summary>
    internal static async Task<Results<FileStreamHttpResult, NotFound<DeepError>>> GetBlob(string sha256, IBlobStore blobs, CancellationToken ct)
    {
        if (!Sha256Hex().IsMatch(sha256))
        {
            return TypedResults.NotFound(new DeepError("No such blob."));
        }
        var stream = await blobs.OpenReadAsync(sha256, ct: ct);
        return stream is null
            ? TypedResults.NotFound(new DeepError("No such blob."))
            : TypedResults.Stream(stream, "application/octet-stream", enableRangeProcessing: true);
    }

    /// <summary>The body as <typeparamref name="T"/>, or the 422 (malformed, wrong shape) or 413 to answer instead.</summary>
    private static async Task<(T? Value, JsonHttpResult<HTTPValidationError>? Invalid, JsonHttpResult<DeepError>? TooLarge)> ReadAsync<T>(
        HttpContext http, System.Text.Json.Serialization.Metadata.JsonTypeInfo<T> type, CancellationToken ct) where T : class
    {
        var (body, error) = await RequestBody.ReadObjectAsync(http.Request, ct);
        if (body is null)
        {
            return (null, error as JsonHttpResult<HTTPValidationError>, error as JsonHttpResult<DeepError>);
        }
        try
        {
            return (body.Value.Deserialize(type) ?? throw new JsonException("null"), null, null);
        }
        catch (JsonException e)
        {
            return (null, Invalid(e.Path is { Length: > 2 } path ? path[2..] : "body", $"Input does not match the worker protocol: {e.Message.Split('.')[0]}"), null);
        }
    }

    private static JsonHttpResult<HTTPValidationError> Invalid(string field, string message)
    {
        var errors = new ValidationErrors();
        errors.Add(["body", field], message, "value_error");
        return errors.ToResult();
    }

    private static string Truncate(string text, int max) => text.Length <= max ? text : text[..max];
}
