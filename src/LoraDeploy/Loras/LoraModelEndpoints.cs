using LoraDeploy.Audit;
using LoraDeploy.Auth;
using LoraDeploy.BaseModels;
using LoraDeploy.Data;
using LoraDeploy.Deploys;
using LoraDeploy.Pipeline;
using LoraDeploy.Sources;
using LoraDeploy.Validation;
using Microsoft.AspNetCore.Http.HttpResults;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Loras;

/// <summary>
/// DeepInfra's LLM adapters: <c>POST /lora-model</c> imports a PEFT adapter from a Hugging Face repo onto a llamacpp
/// pool (tracked on <c>/deploy/{id}</c> like any deploy), <c>DELETE /lora-model/{name}</c> removes it. The token is
/// used for that import only: kept in this process's memory while the import runs, never stored or logged.
/// </summary>
public static class LoraModelEndpoints
{
    private const int MaxTokenLength = 1024;

    public static IEndpointRouteBuilder MapLoraModels(this IEndpointRouteBuilder app)
    {
        var group = app.MapGroup("/lora-model").WithTags("LoRA").RequireAuthorization();
        group.MapPost("", CreateAsync).WithSummary("Deploy a PEFT LoRA adapter from Hugging Face on an LLM base model")
            .Audited(AuditLog.Actions.Create, "lora", bodyKey: "lora_model_name");
        group.MapDelete("/{lora_model_name}", DeleteAsync).WithSummary("Delete an LLM LoRA and its deploy")
            .Audited(AuditLog.Actions.Delete, "lora", "lora_model_name");
        return app;
    }

    internal static async Task<Results<DeployJson, JsonHttpResult<HTTPValidationError>, JsonHttpResult<DeepError>, Conflict<DeepError>>> CreateAsync(
        HttpContext http, LoraDeployDbContext db, DeployReads reads, BaseModelRegistry registry, ImportPipeline pipeline,
        HuggingFaceTokens tokens, IOptions<HuggingFaceOptions> hub, IOptions<PipelineOptions> pipelineOptions, Quotas.QuotaGate quotas, TimeProvider time,
        CancellationToken ct)
    {
        var user = CurrentUser.From(http.User);
        var (body, error) = await RequestBody.ReadObjectAsync(http.Request, ct);
        if (body is not { } json)
        {
            return error switch
            {
                JsonHttpResult<HTTPValidationError> invalid => invalid,
                _ => (JsonHttpResult<DeepError>)error!,
            };
        }
        var errors = new ValidationErrors();
        var repoText = errors.String(json, "hf_model_name", ["body", "hf_model_name"], required: true);
        HuggingFaceRepoRef? repo = null;
        if (repoText is not null)
        {
            if (HuggingFaceRepoRef.TryParse(repoText, hub.Value.GetBaseUri(), out var parsed, out var repoError))
            {
                repo = parsed;
            }
            else
            {
                errors.Add(["body", "hf_model_name"], $"Value error, {repoError}", "value_error");
            }
        }
        var name = errors.String(json, "lora_model_name", ["body", "lora_model_name"], required: true);
        if (name is not null && !LoraNames.IsValid(name))
        {
            errors.Add(["body", "lora_model_name"],
                "Value error, lora_model_name must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit", "value_error");
        }
        var token = errors.String(json, "hf_token", ["body", "hf_token"], required: false, nullable: true);
        if (token is { Length: > MaxTokenLength })
        {
            errors.Add(["body", "hf_token"], $"String should have at most {MaxTokenLength} characters", "string_too_long");
        }
        var pools = registry.Pools.Where(p => p.Engine == Engines.LlamaCpp).ToList();
        var baseModel = errors.String(json, "base_model_name", ["body", "base_model_name"], required: false, nullable: true);
        if (baseModel is null && pools.Count == 1)
        {
            baseModel = pools[0].Name; // the only LLM pool: nothing to choose
        }
        else if (baseModel is null)
        {
            errors.Add(["body", "base_model_name"],
                $"Value error, base_model_name is required: one of {(pools.Count == 0 ? "(none: configure a BaseModels:{name}:Engine=llamacpp pool)" : string.Join(", ", pools.Select(p => p.Name)))}",
                "value_error");
        }
        else if (pools.All(p => p.Name != baseModel))
        {
            errors.Add(["body", "base_model_name"],
                $"Value error, '{baseModel}' is not an LLM base model here; expected one of: {(pools.Count == 0 ? "(none configured)" : string.Join(", ", pools.Select(p => p.Name)))}",
                "value_error");
        }
        if (errors.Any || repo is null || name is null || baseModel is null)
        {
            return errors.ToResult();
        }

        if (await db.Loras.AnyAsync(l => l.UserId == user.Id && l.Name == name && !l.Deleted, ct))
        {
            return Conflict(name);
        }
        var now = time.GetUtcNow().UtcDateTime;
        var deployId = ApiTokens.RandomId(12);
        var lora = new Data.Lora
        {
            UserId = user.Id, Name = name, BaseModel = baseModel, SourceType = "huggingface", SourceUrl = repo.ToString(),
            Private = true, CreatedAt = now, UpdatedAt = now,
        };
        db.Deploys.Add(new Deploy
        {
            Id = deployId, UserId = user.Id, Lora = lora, ModelName = $"{user.Name}/{name}", Task = "text-generation",
            Status = DeployStatus.Downloading, CreatedAt = now, UpdatedAt = now,
        });
        // Claimed at birth by this replica, where the token lives; a lapsed lease lets any replica carry on without it.
        db.ImportJobs.Add(new ImportJob
        {
            DeployId = deployId, Status = ImportJobStatus.Importing, LeaseOwner = pipeline.Owner,
            LeaseExpiresAt = now + pipelineOptions.Value.LeaseDuration, Attempts = 1, CreatedAt = now, UpdatedAt = now,
        });
        // The quota count and the insert in one transaction, serialised per user: parallel creates cannot overshoot.
        await using (var transaction = await db.Database.BeginTransactionAsync(ct))
        {
            if (await quotas.RefuseCreateAsync(db, user.Id, user.Name, knownFile: null, ct) is { } refusal)
            {
                return ApiErrors.Error(StatusCodes.Status403Forbidden, refusal);
            }
            try
            {
                await db.SaveChangesAsync(ct);
                await transaction.CommitAsync(ct);
            }
            catch (DbUpdateException e) when (db.IsUniqueViolation(e))
            {
                return Conflict(name);
            }
        }
        if (!string.IsNullOrEmpty(token))
        {
            tokens.Set(deployId, token);
        }
        pipeline.Adopt(deployId);
        var created = await reads.ByIdAsync(deployId, user.Id, ct) ?? throw new InvalidOperationException($"Deploy {deployId} vanished after it was committed.");
        return created;
    }

    internal static async Task<Results<Ok<LoraDeleteOut>, NotFound<DeepError>>> DeleteAsync(
        string lora_model_name, HttpContext http, LoraDeployDbContext db, TimeProvider time, CancellationToken ct) =>
        await LoraEndpoints.DeleteLora(lora_model_name, http, db, time, ct);

    private static Conflict<DeepError> Conflict(string name) =>
        ApiErrors.Conflict($"A LoRA named '{name}' already exists; delete it or choose another lora_model_name.");
}
