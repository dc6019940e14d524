using System.Text.Json;
using LoraDeploy.Audit;
using LoraDeploy.Auth;
using LoraDeploy.BaseModels;
using LoraDeploy.Data;
using LoraDeploy.OpenApi;
using LoraDeploy.Validation;
using Microsoft.AspNetCore.Http.HttpResults;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;
using Microsoft.Net.Http.Headers;

namespace LoraDeploy.Exports;

/// <summary>
/// Exports of the caller's own LoRA: its adapter merged into the pool's base weights on this host, as a job with
/// progress whose result downloads with Range. Another user's LoRA or export is 404, as for <c>/v1/lora/{lora_name}</c>.
/// </summary>
public static class ExportEndpoints
{
    private static readonly string[] Dtypes = ["f16", "bf16", "f32"];
    private const double MaxStrength = 10;

    public static IServiceCollection AddExports(this IServiceCollection services)
    {
        services.AddOptions<ExportOptions>().BindConfiguration(ExportOptions.Section).ValidateDataAnnotations().ValidateOnStart();
        services.AddSingleton(sp =>
        {
            var configured = sp.GetRequiredService<IOptions<ExportOptions>>().Value.Path;
            var configuration = sp.GetRequiredService<IConfiguration>();
            return new ExportFiles(string.IsNullOrWhiteSpace(configured) ? Path.Combine(DataDirectory.Get(configuration), "exports") : configured);
        });
        services.AddSingleton<ExportSignal>();
        services.AddHostedService<ExportRunner>();
        return services;
    }

    public static IEndpointRouteBuilder MapExports(this IEndpointRouteBuilder app)
    {
        var exports = app.MapGroup("/v1/lora/{lora_name}").WithTags("Export").RequireAuthorization();

        exports.MapPost("/export", CreateExport)
            .WithName("ExportLora")
            .WithSummary("Merge your LoRA into its base model's weights (a job; download the file when done)")
            .WithRequestBody<ExportLoraRequest>()
            .Produces<ExportOut>(StatusCodes.Status202Accepted)
            .Produces<DeepError>(StatusCodes.Status404NotFound)
            .Produces<DeepError>(StatusCodes.Status409Conflict)
            .Produces<HTTPValidationError>(StatusCodes.Status422UnprocessableEntity);
        exports.MapGet("/exports", ListExports).WithSummary("Your LoRA's exports, newest first");
        exports.MapGet("/export/{export_id}", GetExport).WithSummary("An export: status, progress, and its download URL once done");
        exports.MapGet("/export/{export_id}/download", DownloadExport)
            .WithSummary("The merged model (Range requests supported)")
            .Produces(StatusCodes.Status200OK, contentType: "application/octet-stream")
            .Produces(StatusCodes.Status206PartialContent, contentType: "application/octet-stream")
            .Produces<DeepError>(StatusCodes.Status404NotFound)
            .Produces<DeepError>(StatusCodes.Status409Conflict);
        exports.MapDelete("/export/{export_id}", DeleteExport).WithSummary("Delete an export and its file")
            .Audited(AuditLog.Actions.ExportDelete, "export", "export_id");
        return app;
    }

    internal static async Task<IResult> CreateExport(
        string lora_name, HttpContext http, LoraDeployDbContext db, BaseModelRegistry baseModels, ExportSignal signal,
        IOptions<ExportOptions> options, TimeProvider time, AuditLog audit, CancellationToken ct)
    {
        var user = CurrentUser.From(http.User);
        var dtype = "base";
        var strength = 1.0;
        if (HasBody(http.Request))
        {
            var (body, error) = await RequestBody.ReadObjectAsync(http.Request, ct);
            if (body is not { } json)
            {
                return error!;
            }
            var errors = new ValidationErrors();
            if (errors.String(json, "dtype", ["body", "dtype"], required: false, nullable: true) is { } requested)
            {
                if (Dtypes.Contains(requested, StringComparer.Ordinal))
                {
                    dtype = requested;
                }
                else
                {
                    errors.Add(["body", "dtype"], "Input should be 'f16', 'bf16' or 'f32'", "enum");
                }
            }
            if (json.TryGetProperty("strength", out var value) && value.ValueKind != JsonValueKind.Null)
            {
                if (value.ValueKind == JsonValueKind.Number && value.TryGetDouble(out var number) && double.IsFinite(number) && Math.Abs(number) <= MaxStrength)
                {
                    strength = number;
                }
                else
                {
                    errors.Add(["body", "strength"], $"Input should be a number from -{MaxStrength} to {MaxStrength}", "float_type");
                }
            }
            if (errors.Any)
            {
                return errors.ToResult();
            }
        }

        var lora = await db.Loras
            .Where(l => l.UserId == user.Id && l.Name == lora_name && !l.Deleted)
            .Select(l => new
            {
                l.Id,
                l.BaseModel,
                l.AdapterSha256,
                Deploy = db.Deploys.Where(d => d.LoraId == l.Id).Select(d => new
                {
                    d.Id,
                    d.Status,
                    Imported = db.ImportJobs.Any(j => j.DeployId == d.Id && j.Status == ImportJobStatus.Done),
                }).FirstOrDefault(),
            })
            .FirstOrDefaultAsync(ct);
        if (lora?.Deploy is null)
        {
            return LoraNotFound(lora_name);
        }
        // Imported = stored, verified and let through by the gate; a LoRA failed at the gate has bytes but is not one.
        if (lora.AdapterSha256 is null || !lora.Deploy.Imported)
        {
            return ApiErrors.Conflict(
                $"LoRA '{lora_name}' is {lora.Deploy.Status}: its adapter is not imported, so there is nothing to merge yet. Export it once its status is deploying or running.");
        }
        if (ExportBase.Of(baseModels.Find(lora.BaseModel)) is not { } exportBase)
        {
            return ApiErrors.Error(StatusCodes.Status422UnprocessableEntity, ExportBase.Missing(lora.BaseModel));
        }
        if (exportBase.Format == ExportBase.Gguf && dtype != "base")
        {
            // A GGUF merge writes each tensor in the base GGUF's own type (quantize the result for another).
            var errors = new ValidationErrors();
            errors.Add(["body", "dtype"], $"Value error, base model '{lora.BaseModel}' exports a GGUF, which keeps each tensor's type from its base GGUF; leave dtype out", "value_error");
            return errors.ToResult();
        }

        var job = new ExportJob
        {
            Id = ApiTokens.RandomId(12),
            UserId = user.Id,
            LoraId = lora.Id,
            DeployId = lora.Deploy.Id,
            AdapterSha256 = lora.AdapterSha256,
            BaseModel = lora.BaseModel,
            Format = exportBase.Format,
            Dtype = dtype,
            Strength = strength,
            CreatedAt = time.GetUtcNow().UtcDateTime,
        };
        db.ExportJobs.Add(job);
        await db.SaveChangesAsync(ct);
        signal.Wake();
        await audit.RecordAsync(http, AuditLog.Actions.ExportCreate, "export", job.Id, $"lora {lora_name}, {job.Format}, dtype {dtype}");
        var url = $"/v1/lora/{lora_name}/export/{job.Id}";
        return TypedResults.Accepted(url, ToOut(job, lora_name, options.Value));
    }

    internal static async Task<Results<Ok<List<ExportOut>>, NotFound<DeepError>>> ListExports(
        string lora_name, HttpContext http, LoraDeployDbContext db, IOptions<ExportOptions> options, CancellationToken ct)
    {
        var user = CurrentUser.From(http.User);
        var loraId = await db.Loras
            .Where(l => l.UserId == user.Id && l.Name == lora_name && !l.Deleted)
            .Select(l => (long?)l.Id)
            .FirstOrDefaultAsync(ct);
        if (loraId is null)
        {
            return LoraNotFound(lora_name);
        }
        var jobs = await db.ExportJobs
            .Where(j => j.LoraId == loraId && j.UserId == user.Id)
            .OrderByDescending(j => j.CreatedAt).ThenByDescending(j => j.Id)
            .ToListAsync(ct);
        return TypedResults.Ok(jobs.Select(j => ToOut(j, lora_name, options.Value)).ToList());
    }

    internal static async Task<Results<Ok<ExportOut>, NotFound<DeepError>>> GetExport(
        string lora_name, string export_id, HttpContext http, LoraDeployDbContext db, IOptions<ExportOptions> options, CancellationToken ct)
    {
        var job = await Own(db, CurrentUser.From(http.User), lora_name, export_id).FirstOrDefaultAsync(ct);
        return job is null ? ExportNotFound(export_id) : TypedResults.Ok(ToOut(job, lora_name, options.Value));
    }

    internal static async Task<IResult> DownloadExport(
        string lora_name, string export_id, HttpContext http, LoraDeployDbContext db, ExportFiles files, CancellationToken ct)
    {
        var job = await Own(db, CurrentUser.From(http.User), lora_name, export_id).FirstOrDefaultAsync(ct);
        if (job is null)
        {
            return ExportNotFound(export_id);
        }
        if (job.Status != ExportJobStatus.Done)
        {
            return ApiErrors.Conflict(job.Status == ExportJobStatus.Failed
                ? $"Export '{export_id}' failed, so there is no file: {job.FailReason}"
                : $"Export '{export_id}' is {job.Status} ({Percent(job):0.#}% done); download it once its status is done.");
        }
        var path = files.OutputPath(job.Id, job.Attempts, job.Format);
        if (!File.Exists(path))
        {
            return ApiErrors.NotFound($"Export '{export_id}' has no file any more (it expired); ask for a new export.");
        }
        // The SHA-256 as the entity tag lets a client resume with If-Range and know it gets the same bytes.
        return TypedResults.PhysicalFile(path, "application/octet-stream", $"{lora_name}-{job.Id}.{job.Format}",
            lastModified: job.FinishedAt, entityTag: new EntityTagHeaderValue($"\"{job.OutputSha256}\""), enableRangeProcessing: true);
    }

    internal static async Task<Results<Ok<ExportDeleteOut>, NotFound<DeepError>>> DeleteExport(
        string lora_name, string export_id, HttpContext http, LoraDeployDbContext db, ExportFiles files, CancellationToken ct)
    {
        var id = await Own(db, CurrentUser.From(http.User), lora_name, export_id).Select(j => j.Id).FirstOrDefaultAsync(ct);
        if (id is null)
        {
            return ExportNotFound(export_id);
        }
        // File first, then row: a row never points at a missing file for long. A merge still running notices at its
        // next progress write that the row is gone, stops, and removes what it had written.
        files.Delete(id);
        await db.ExportJobs.Where(j => j.Id == id).ExecuteDeleteAsync(ct);
        return TypedResults.Ok(new ExportDeleteOut(export_id, Deleted: true));
    }

    private static IQueryable<ExportJob> Own(LoraDeployDbContext db, CurrentUser user, string loraName, string exportId) =>
        db.ExportJobs.Where(j => j.Id == exportId && j.UserId == user.Id && j.Lora!.Name == loraName && !j.Lora.Deleted);

    /// <summary>A body is optional: none at all (no length, not chunked, or length 0) means the defaults.</summary>
    private static bool HasBody(HttpRequest request) =>
        request.ContentLength > 0 || (request.ContentLength is null && request.Headers.TransferEncoding.Count > 0);

    private static double Percent(ExportJob job) => job.Status == ExportJobStatus.Done
        ? 100
        : job.BytesTotal > 0 ? Math.Round(100.0 * job.BytesDone / job.BytesTotal, 1) : 0;

    internal static ExportOut ToOut(ExportJob job, string loraName, ExportOptions options) => new(
        job.Id,
        loraName,
        job.DeployId,
        job.BaseModel,
        job.AdapterSha256,
        job.Format,
        job.Dtype,
        job.Strength,
        job.Status,
        Percent(job),
        job.TensorsDone,
        job.TensorsTotal,
        job.BytesDone,
        job.BytesTotal,
        job.FailReason,
        job.OutputBytes,
        job.OutputSha256,
        job.Status == ExportJobStatus.Done ? $"/v1/lora/{loraName}/export/{job.Id}/download" : null,
        Timestamps.Format(job.CreatedAt),
        job.StartedAt is { } started ? Timestamps.Format(started) : null,
        job.FinishedAt is { } finished ? Timestamps.Format(finished) : null,
        job.FinishedAt is { } end ? Timestamps.Format(end + options.Retention) : null);

    private static NotFound<DeepError> LoraNotFound(string name) => ApiErrors.NotFound($"LoRA '{name}' not found.");

    private static NotFound<DeepError> ExportNotFound(string id) => ApiErrors.NotFound($"Export '{id}' not found.");
}

/// <summary>Body of <c>POST /v1/lora/{lora_name}/export</c>; optional, as are both fields.</summary>
/// <param name="Dtype"><c>f16</c>, <c>bf16</c> or <c>f32</c>; absent = each tensor keeps the base's dtype.</param>
/// <param name="Strength">How strongly the adapter is merged (1 = as trained), from -10 to 10.</param>
public sealed record ExportLoraRequest(string? Dtype, double? Strength);

/// <summary>
/// An export job. <c>progress_percent</c> counts bytes written; <c>size_bytes</c> and <c>sha256</c> describe the file once
/// <c>done</c>, when <c>download_url</c> (relative to the server) is set; <c>expires_at</c> is when file and job are deleted.
/// </summary>
public sealed record ExportOut(
    string ExportId,
    string LoraName,
    string DeployId,
    string BaseModel,
    string AdapterSha256,
    string Format,
    string Dtype,
    double Strength,
    string Status,
    double ProgressPercent,
    int TensorsDone,
    int TensorsTotal,
    long BytesDone,
    long BytesTotal,
    string FailReason,
    long? SizeBytes,
    string? Sha256,
    string? DownloadUrl,
    string CreatedAt,
    string? StartedAt,
    string? FinishedAt,
    string? ExpiresAt);

public sealed record ExportDeleteOut(string ExportId, bool Deleted);
