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

    /// <summary>A validated create; <paramref name="SourceUrl"/> is the canonical CivitAI link, or <c>upload:&lt;sha256&gt;</c> once an upload's bytes are stored.</summary>
    internal sealed record ValidRequest(string LoraName, string BaseModel, string SourceUrl, bool Private, string Description);

    /// <summary>What an upload adds to its LoRA row: the stored blob and the name the client gave the file.</summary>
    internal sealed record UploadedFile(string Sha256, long SizeBytes, string FileName);

    public static async Task<IResult> HandleAsync(
        HttpContext http,
        LoraDeployDbContext db,
        DeployReads reads,
        BaseModelRegistry baseModels,
        PipelineSignal pipeline,
        Storage.IBlobStore blobs,
        Microsoft.Extensions.Options.IOptions<Sources.ImportOptions> import,
        Microsoft.Extensions.Options.IOptionsMonitor<PolicyOptions> policy,
        Audit.AuditLog audit,
        QuotaGate quotas,
        TimeProvider time,
        CancellationToken ct)
    {
        if (http.Request.HasFormContentType)
        {
            return await UploadLora.HandleAsync(http, db, reads, baseModels, pipeline, quotas, blobs, import, policy, audit, time, ct);
        }
        var user = CurrentUser.From(http.User);
        var (body, error) = await RequestBody.ReadObjectAsync(http.Request, ct);
        if (body is not { } json)
        {
            return error!;
        }
        var errors = new ValidationErrors();
        var request = Validate(json, baseModels, errors, upload: false);
        var idempotencyKey = IdempotencyKey(http, errors);
        if (errors.Any || request is null)
        {
            return errors.ToResult();
        }
        return await InsertAsync(db, reads, pipeline, quotas, time, user, request, idempotencyKey, upload: null, ct);
    }

    /// <summary>The Idempotency-Key header ("" when absent); an over-long one is a validation error.</summary>
    internal static string IdempotencyKey(HttpContext http, ValidationErrors errors)
    {
        var idempotencyKey = http.Request.Headers["Idempotency-Key"].ToString();
        if (idempotencyKey.Length > MaxIdempotencyKeyLength)
        {
            errors.Add(["header", "Idempotency-Key"], $"String should have at most {MaxIdempotencyKeyLength} characters", "string_too_long");
        }
        return idempotencyKey;
    }

    /// <summary>Writes the LoRA, its deploy and its import job in one transaction (an upload's blob is already stored), then wakes the pipeline.</summary>
    internal static async Task<IResult> InsertAsync(
        LoraDeployDbContext db, DeployReads reads, PipelineSignal pipeline, QuotaGate quotas, TimeProvider time, CurrentUser user,
        ValidRequest request, string idempotencyKey, UploadedFile? upload, CancellationToken ct)
    {
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
            SourceType = upload is null ? "civitai" : "upload",
            SourceUrl = request.SourceUrl,
            // An upload's LoRA names its blob from the start: the pipeline checks these bytes and no others, and the
            // blob collector sees the reference.
            ExpectedSha256 = upload?.Sha256,
            SizeBytes = upload?.SizeBytes,
            FileName = upload?.FileName,
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
            if (await quotas.RefuseCreateAsync(db, user.Id, user.Name, upload is null ? null : (upload.Sha256, upload.SizeBytes), ct) is { } refusal)
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

    /// <summary>Checks a create's JSON; <paramref name="upload"/> is the multipart form's <c>json</c> part, whose source is <c>{"type": "upload"}</c>.</summary>
    internal static ValidRequest? Validate(JsonElement body, BaseModelRegistry baseModels, ValidationErrors errors, bool upload)
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

        string? sourceUrl = null;
        var source = errors.Object(body, "source", ["body", "source"], required: true);
        if (source is { } sourceObject)
        {
            var type = errors.String(sourceObject, "type", ["body", "source", "type"], required: true);
            if (upload)
            {
                if (type is not null && type != "upload")
                {
                    errors.Add(["body", "source", "type"], "Input should be 'upload' (the json part of a multipart create goes with a file part)", "enum");
                }
                sourceUrl = ""; // upload:<sha256> once the bytes are stored
            }
            else if (type is not null && type != "civitai")
            {
                errors.Add(["body", "source", "type"],
                    type == "upload" ? "Value error, source type 'upload' is sent as multipart/form-data with a json part and a file part" : "Input should be 'civitai'",
                    type == "upload" ? "value_error" : "enum");
            }
            if (!upload)
            {
                sourceUrl = ValidateCivitUrl(sourceObject, errors);
            }
        }

        var isPrivate = errors.Bool(body, "private", ["body", "private"], required: true);
        var description = errors.String(body, "description", ["body", "description"], required: false, nullable: true) ?? "";
        if (description.Length > MaxDescriptionLength)
        {
            errors.Add(["body", "description"], $"String should have at most {MaxDescriptionLength} characters", "string_too_long");
        }

        return errors.Any || loraName is null || baseModel is null || sourceUrl is null || isPrivate is null
            ? null
            : new ValidRequest(loraName, baseModel, sourceUrl, isPrivate.Value, description);
    }

    private static string? ValidateCivitUrl(JsonElement source, ValidationErrors errors)
    {
        var url = errors.String(source, "civit_url", ["body", "source", "civit_url"], required: false, nullable: true);
        if (url is null)
        {
            if (!source.TryGetProperty("civit_url", out var present) || present.ValueKind == JsonValueKind.Null)
            {
                errors.Add(["body", "source", "civit_url"], "Value error, civit_url is required for source type 'civitai'", "value_error");
            }
            return null;
        }
        if (!CivitaiUrlCheck.TryNormalize(url, out var canonical, out var urlError))
        {
            errors.Add(["body", "source", "civit_url"], urlError, "value_error");
            return null;
        }
        return canonical;
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

    internal static IResult Conflict(string name) =>
        ApiErrors.Conflict($"A LoRA named '{name}' already exists; delete it or choose another lora_name.");

    /// <summary>A hash of the validated request, so formatting differences in the JSON don't count as a different body.</summary>
    private static string Hash(ValidRequest request) =>
        Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(
            string.Join('\n', request.LoraName, request.BaseModel, request.SourceUrl, request.Private ? "1" : "0", request.Description))));
}
