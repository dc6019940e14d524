using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using LoraDeploy.Auth;
using LoraDeploy.BaseModels;
using LoraDeploy.Data;
using LoraDeploy.Deploys;
using LoraDeploy.Pipeline;
using LoraDeploy.Quotas;
using LoraDeploy.Validation;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Loras;

/// <summary><c>POST /v1/lora/create</c>: validate, then write the LoRA and its deploy (the pipeline's job) in one transaction.</summary>
internal static class CreateLora
{
    private const int MaxDescriptionLength = 4000;
    private const int MaxIdempotencyKeyLength = 255;

    private sealed record ValidRequest(string LoraName, string BaseModel, string CivitUrl, bool Private, string Description);

    public static async Task<IResult> HandleAsync(
        HttpContext http,
        LoraDeployDbContext db,
        DeployReads reads,
        BaseModelRegistry baseModels,
        PipelineSignal pipeline,
        QuotaGate quotas,
        TimeProvider time,
        CancellationToken ct)
    {
        var user = CurrentUser.From(http.User);
        var (body, error) = await RequestBody.ReadObjectAsync(http.Request, ct);
        if (body is not { } json)
        {
            return error!;
        }
        var errors = new ValidationErrors();
        var request = Validate(json, baseModels, errors);

        var idempotencyKey = http.Request.Headers["Idempotency-Key"].ToString();
        if (idempotencyKey.Length > MaxIdempotencyKeyLength)
        {
            errors.Add(["header", "Idempotency-Key"], $"String should have at most {MaxIdempotencyKeyLength} characters", "string_too_long");
        }
        if (errors.Any || request is null)
        {
            return errors.ToResult();
        }

        var requestHash = idempotencyKey.Length > 0 ? Hash(request) : "";
        if (idempotencyKey.Length > 0)
        {
            var replay = await ReplayAsync(db, reads, user, idempotencyKey, requestHash, ct);
            if (replay is not null)
            {
                return replay;
            }
        }

        if (await db.Loras.AnyAsync(l => l.UserId == user.Id && l.Name == request.LoraName && !l.Deleted, ct))
        {
            return Conflict(request.LoraName);
        }

        var now = time.GetUtcNow().UtcDateTime;
        var deployId = ApiTokens.RandomId(12);
        var lora = new Data.Lora
        {
            UserId = user.Id,
            Name = request.LoraName,
            BaseModel = request.BaseModel,
            SourceType = "civitai",
            SourceUrl = request.CivitUrl,
            Private = request.Private,
            Description = request.Description,
            CreatedAt = now,
            UpdatedAt = now,
        };
        var deploy = new Deploy
        {
            Id = deployId,
            UserId = user.Id,
            Lora = lora,
            ModelName = $"{user.Name}/{request.LoraName}",
            CreatedAt = now,
            UpdatedAt = now,
        };
        db.Deploys.Add(deploy);
        db.ImportJobs.Add(new ImportJob { DeployId = deployId, Deploy = deploy, CreatedAt = now, UpdatedAt = now });
        if (idempotencyKey.Length > 0)
        {
            db.IdempotencyRecords.Add(new IdempotencyRecord
            {
                UserId = user.Id,
                Key = idempotencyKey,
                RequestHash = requestHash,
                DeployId = deployId,
                CreatedAt = now,
            });
        }
        var lostRace = false;
        // The quota count and the insert in one transaction, serialised per user: parallel creates cannot overshoot.
        await using (var transaction = await db.Database.BeginTransactionAsync(ct))
        {
            if (await quotas.RefuseCreateAsync(db, user.Id, user.Name, knownBytes: null, ct) is { } refusal)
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
                lostRace = true; // rolled back below: PostgreSQL refuses further statements in a failed transaction
            }
        }
        if (lostRace)
        {
            // Lost a race: either the same idempotent request, or the same name.
            db.ChangeTracker.Clear();
            if (idempotencyKey.Length > 0 && await ReplayAsync(db, reads, user, idempotencyKey, requestHash, ct) is { } replay)
            {
                return replay;
            }
            return Conflict(request.LoraName);
        }

        pipeline.Wake();
        return await ReadBackAsync(reads, deployId, user, ct);
    }

    private static ValidRequest? Validate(JsonElement body, BaseModelRegistry baseModels, ValidationErrors errors)
    {
        var loraName = errors.String(body, "lora_name", ["body", "lora_name"], required: true);
        if (loraName is not null && !LoraNames.IsValid(loraName))
        {
            errors.Add(["body", "lora_name"],
                "Value error, lora_name must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit",
                "value_error");
        }

        var baseModel = errors.String(body, "base_model", ["body", "base_model"], required: true);
        if (baseModel is not null && !baseModels.TryGetFamily(baseModel, out _))
        {
            errors.Add(["body", "base_model"],
                $"Value error, unknown base_model '{baseModel}'; expected one of: {string.Join(", ", baseModels.Names)}",
                "value_error");
        }

        string? civitUrl = null;
        var source = errors.Object(body, "source", ["body", "source"], required: true);
        if (source is { } sourceObject)
        {
            var type = errors.String(sourceObject, "type", ["body", "source", "type"], required: true);
            if (type is not null && type != "civitai")
            {
                errors.Add(["body", "source", "type"], "Input should be 'civitai'", "enum");
            }
            var url = errors.String(sourceObject, "civit_url", ["body", "source", "civit_url"], required: false, nullable: true);
            if (url is null)
            {
                if (!sourceObject.TryGetProperty("civit_url", out var present) || present.ValueKind == JsonValueKind.Null)
                {
                    errors.Add(["body", "source", "civit_url"], "Value error, civit_url is required for source type 'civitai'", "value_error");
                }
            }
            else if (!CivitaiUrlCheck.TryNormalize(url, out var canonical, out var urlError))
            {
                errors.Add(["body", "source", "civit_url"], urlError, "value_error");
            }
            else
            {
                civitUrl = canonical;
            }
        }

        var isPrivate = errors.Bool(body, "private", ["body", "private"], required: true);
        var description = errors.String(body, "description", ["body", "description"], required: false, nullable: true) ?? "";
        if (description.Length > MaxDescriptionLength)
        {
            errors.Add(["body", "description"], $"String should have at most {MaxDescriptionLength} characters", "string_too_long");
        }

        return errors.Any || loraName is null || baseModel is null || civitUrl is null || isPrivate is null
            ? null
            : new ValidRequest(loraName, baseModel, civitUrl, isPrivate.Value, description);
    }

    private static async Task<IResult?> ReplayAsync(LoraDeployDbContext db, DeployReads reads, CurrentUser user, string key, string requestHash, CancellationToken ct)
    {
        var record = await db.IdempotencyRecords.FirstOrDefaultAsync(r => r.UserId == user.Id && r.Key == key, ct);
        if (record is null)
        {
            return null;
        }
        if (record.RequestHash != requestHash)
        {
            var errors = new ValidationErrors();
            errors.Add(["header", "Idempotency-Key"],
                "Value error, this Idempotency-Key was already used with a different request body", "value_error");
            return errors.ToResult();
        }
        return await ReadBackAsync(reads, record.DeployId, user, ct);
    }

    /// <summary>A committed deploy of the caller's; deploys are never removed, only marked deleted.</summary>
    private static async Task<DeployJson> ReadBackAsync(DeployReads reads, string deployId, CurrentUser user, CancellationToken ct) =>
        await reads.ByIdAsync(deployId, user.Id, ct) ?? throw new InvalidOperationException($"Deploy {deployId} vanished after it was committed.");

    private static IResult Conflict(string name) =>
        ApiErrors.Conflict($"A LoRA named '{name}' already exists; delete it or choose another lora_name.");

    /// <summary>A hash of the validated request, so formatting differences in the JSON don't count as a different body.</summary>
    private static string Hash(ValidRequest request) =>
        Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(
            string.Join('\n', request.LoraName, request.BaseModel, request.CivitUrl, request.Private ? "1" : "0", request.Description))));
}
