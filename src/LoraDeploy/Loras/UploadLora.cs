using System.Buffers;
using System.Security.Cryptography;
using LoraDeploy.Audit;
using LoraDeploy.Auth;
using LoraDeploy.BaseModels;
using LoraDeploy.Data;
using LoraDeploy.Deploys;
using LoraDeploy.Lora;
using LoraDeploy.Lora.Safetensors;
using LoraDeploy.Pipeline;
using LoraDeploy.Sources;
using LoraDeploy.Storage;
using LoraDeploy.Validation;
using Microsoft.AspNetCore.Http.Features;
using Microsoft.AspNetCore.WebUtilities;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;
using Microsoft.Net.Http.Headers;

namespace LoraDeploy.Loras;

/// <summary>
/// <c>POST /v1/lora/create</c> as <c>multipart/form-data</c>: a <c>json</c> part (the create body with
/// <c>"source": {"type": "upload"}</c>), checked before any file byte is read, then a <c>file</c> part streamed into a
/// staging file while it is hashed and counted. The upload stands in for the pipeline's download stage: past
/// Import:MaxFileBytes it stops reading at once (413); a file that is not a safetensors LoRA for the chosen base model
/// is refused (422) and nothing is stored; otherwise the blob is stored (bytes first), then the LoRA, deploy and import
/// job, and the pipeline carries on as for a CivitAI import whose file is already stored.
/// </summary>
internal static class UploadLora
{
    public const string JsonPart = "json";
    public const string FilePart = "file";

    /// <summary>Room for the json part, part headers and boundaries on top of the file's own cap.</summary>
    private const long FormOverheadBytes = RequestBody.MaxBytes + 64 * 1024;
    private const int CopyBufferSize = 1024 * 1024;
    private const int MaxFileNameLength = 255;

    private sealed record Received(string Sha256, long Bytes);

    public static async Task<IResult> HandleAsync(
        HttpContext http,
        LoraDeployDbContext db,
        DeployReads reads,
        BaseModelRegistry baseModels,
        PipelineSignal pipeline,
        Quotas.QuotaGate quotas,
        IBlobStore blobs,
        IOptions<ImportOptions> import,
        IOptionsMonitor<PolicyOptions> policy,
        AuditLog audit,
        TimeProvider time,
        CancellationToken ct)
    {
        var cap = import.Value.MaxFileBytes;
        var limit = cap > long.MaxValue - FormOverheadBytes ? long.MaxValue : cap + FormOverheadBytes;
        if (http.Request.ContentLength > limit)
        {
            return TooLarge(http, cap);
        }
        // This request's own limit (the server-wide one is 1 MiB); Kestrel also stops any draining after our answer here.
        if (http.Features.Get<IHttpMaxRequestBodySizeFeature>() is { IsReadOnly: false } size)
        {
            size.MaxRequestBodySize = limit;
        }
        if (!MediaTypeHeaderValue.TryParse(http.Request.ContentType, out var mediaType)
            || !mediaType.MediaType.Equals("multipart/form-data", StringComparison.OrdinalIgnoreCase)
            || HeaderUtilities.RemoveQuotes(mediaType.Boundary).Value is not { Length: > 0 and <= 200 } boundary)
        {
            return Invalid(["header", "Content-Type"],
                "Value error, a create is either JSON or multipart/form-data (with a boundary) holding a json part and then a file part");
        }

        var reader = new MultipartReader(boundary, http.Request.Body) { HeadersLengthLimit = 16 * 1024, BodyLengthLimit = null };
        try
        {
            // ---- the json part, checked before any file byte is read ----
            var section = await reader.ReadNextSectionAsync(ct);
            var first = section is null ? null : PartName(section);
            if (section is null || first != JsonPart)
            {
                return Invalid(["body", JsonPart], first switch
                {
                    null when section is null => "Field required: the form's first part must be json (the create body)",
                    FilePart => "Value error, the json part must come before the file part, so the request is checked before the file is read",
                    _ => $"Value error, the form's first part must be named json, not '{first}'",
                }, section is null ? "missing" : "value_error");
            }
            var (body, error) = await RequestBody.ReadObjectAsync(section.Body, null, ct);
            if (body is not { } json)
            {
                return error!;
            }
            var errors = new ValidationErrors();
            var request = CreateLora.Validate(json, baseModels, errors, upload: true);
            var idempotencyKey = CreateLora.IdempotencyKey(http, errors);
            if (errors.Any || request is null)
            {
                return errors.ToResult();
            }
            http.Items[AuditEndpoints.ObjectIdItem] = request.LoraName;

            // An uploaded file carries no CivitAI terms: like a CivitAI model whose terms were not reported, it is
            // refused by a rule that needs them (commercial use, NSFW level); the block lists have nothing to match.
            if (PolicyGate.Check(policy.CurrentValue, null, null) is { } refusal)
            {
                var reason = $"{refusal} (an uploaded file carries no CivitAI license or rating)";
                await audit.RecordAsync(http, AuditLog.Actions.PolicyRefused, "lora", request.LoraName, reason);
                return ApiErrors.Error(StatusCodes.Status422UnprocessableEntity, reason);
            }
            var user = CurrentUser.From(http.User);
            // A name in use is refused before the file is read, unless this is a retry of an idempotent upload
            // (its replay is decided once the file's hash is known).
            var retry = idempotencyKey.Length > 0 && await db.IdempotencyRecords.AnyAsync(r => r.UserId == user.Id && r.Key == idempotencyKey, ct);
            if (!retry && await db.Loras.AnyAsync(l => l.UserId == user.Id && l.Name == request.LoraName && !l.Deleted, ct))
            {
                return CreateLora.Conflict(request.LoraName);
            }

            // ---- the file part ----
            section = await reader.ReadNextSectionAsync(ct);
            if (section is null || PartName(section) is not FilePart)
            {
                return Invalid(["body", FilePart], section is null
                    ? "Field required: the form's second part must be file (the .safetensors)"
                    : $"Value error, the part after json must be named file, not '{PartName(section)}'",
                    section is null ? "missing" : "value_error");
            }
            var fileName = FileNameOf(section);
            var staging = $"upload-{Guid.NewGuid():N}.part";
            try
            {
                var (received, refused) = await ReceiveAsync(http, section.Body, blobs, staging, fileName, cap, ct);
                if (received is null)
                {
                    return refused!;
                }
                if (await reader.ReadNextSectionAsync(ct) is { } extra)
                {
                    return Invalid(["body", PartName(extra) ?? ""], "Value error, the form holds only a json part and a file part");
                }
                if (Check(blobs, staging, fileName, request.BaseModel, baseModels) is { } rejected)
                {
                    return ApiErrors.Error(StatusCodes.Status422UnprocessableEntity, rejected);
                }
                await StoreAsync(db, blobs, staging, received, time, ct);
                return await CreateLora.InsertAsync(db, reads, pipeline, quotas, time, user,
                    request with { SourceUrl = $"upload:{received.Sha256}" }, idempotencyKey,
                    new CreateLora.UploadedFile(received.Sha256, received.Bytes, fileName), ct);
            }
            finally
            {
                try
                {
                    blobs.DeleteStaging(staging); // gone already when it became the blob
                }
                catch (IOException)
                {
                    // The collector removes it after Pipeline:BlobGracePeriod.
                }
            }
        }
        catch (BadHttpRequestException e) when (e.StatusCode == StatusCodes.Status413PayloadTooLarge)
        {
            return TooLarge(http, cap);
        }
        catch (InvalidDataException e)
        {
            return Invalid(["body"], $"Value error, the multipart form cannot be read: {e.Message}");
        }
    }

    /// <summary>
    /// Copies the file part into the staging file, hashing as it writes. Stops reading the moment the count passes the
    /// cap, or once the first bytes show a pickle, archive or other non-safetensors file.
    /// </summary>
    private static async Task<(Received? File, IResult? Refused)> ReceiveAsync(
        HttpContext http, Stream part, IBlobStore blobs, string staging, string fileName, long cap, CancellationToken ct)
    {
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        var buffer = ArrayPool<byte>.Shared.Rent(CopyBufferSize);
        var head = new byte[AdapterFileKind.HeadLength];
        var headLength = 0;
        long total = 0;
        try
        {
            await using var output = blobs.OpenStaging(staging);
            while (true)
            {
                // Fill the buffer before writing: the part arrives in small reads, the staging file is unbuffered.
                var filled = 0;
                int read;
                while (filled < CopyBufferSize && (read = await part.ReadAsync(buffer.AsMemory(filled, CopyBufferSize - filled), ct)) > 0)
                {
                    filled += read;
                    total += read;
                    if (total > cap)
                    {
                        return (null, TooLarge(http, cap));
                    }
                }
                if (headLength < head.Length)
                {
                    var take = Math.Min(filled, head.Length - headLength);
                    buffer.AsSpan(0, take).CopyTo(head.AsSpan(headLength));
                    headLength += take;
                    if ((headLength == head.Length || filled < CopyBufferSize)
                        && !AdapterFileKind.LooksLikeSafetensors(head.AsSpan(0, headLength))
                        && AdapterFileKind.Describe(head.AsSpan(0, headLength)) is { } kind)
                    {
                        return (null, ApiErrors.Error(StatusCodes.Status422UnprocessableEntity, $"The uploaded file {fileName} is {kind}; it was not stored."));
                    }
                }
                if (filled == 0)
                {
                    break;
                }
                hash.AppendData(buffer, 0, filled);
                await output.WriteAsync(buffer.AsMemory(0, filled), ct);
                if (filled < CopyBufferSize)
                {
                    break;
                }
            }
            await output.FlushAsync(ct);
            if (output is FileStream file)
            {
                file.Flush(flushToDisk: true);
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
        return (new Received(Convert.ToHexStringLower(hash.GetHashAndReset()), total), null);
    }

    /// <summary>The strict reader, the probe and the adapter gate, as the pipeline runs them on a stored blob; the refusal sentence, or null.</summary>
    private static string? Check(IBlobStore blobs, string staging, string fileName, string baseModel, BaseModelRegistry baseModels)
    {
        ProbeReport report;
        using (var staged = blobs.OpenStaging(staging))
        {
            try
            {
                using var header = SafetensorsReader.Read(staged);
                report = LoraProber.Probe(header, staged);
            }
            catch (SafetensorsFormatException e)
            {
                return $"The uploaded file {fileName} is not a valid safetensors file ({e.Message}); it was not stored.";
            }
        }
        var (_, failReason, _) = AdapterGate.Check(report, baseModel, civitaiBaseModel: null, baseModels);
        return failReason is null ? null : $"{failReason} The uploaded file {fileName} was not stored.";
    }

    /// <summary>Bytes first: the blob is complete and verified before its row (or any LoRA) names it. The same bytes twice are one blob.</summary>
    private static async Task StoreAsync(LoraDeployDbContext db, IBlobStore blobs, string staging, Received file, TimeProvider time, CancellationToken ct)
    {
        if (await blobs.CommitStagingAsync(staging, file.Sha256, ct) == BlobPutResult.HashMismatch)
        {
            throw new InvalidOperationException($"Staging file {staging} changed before it was stored (its SHA-256 is no longer {file.Sha256}).");
        }
        var now = time.GetUtcNow().UtcDateTime;
        // A blob stored before gets a fresh grace period, so the collector does not take it before the new LoRA names it.
        if (await db.Blobs.Where(b => b.Sha256 == file.Sha256).ExecuteUpdateAsync(set => set.SetProperty(b => b.CreatedAt, now), ct) == 1)
        {
            return;
        }
        db.Blobs.Add(new Blob { Sha256 = file.Sha256, SizeBytes = file.Bytes, CreatedAt = now });
        try
        {
            await db.SaveChangesAsync(ct);
        }
        catch (DbUpdateException e) when (db.IsUniqueViolation(e))
        {
            // The same bytes were uploaded at the same moment.
        }
        db.ChangeTracker.Clear();
    }

    private static string? PartName(MultipartSection section) =>
        ContentDispositionHeaderValue.TryParse(section.ContentDisposition, out var disposition)
            ? HeaderUtilities.RemoveQuotes(disposition.Name).Value
            : null;

    /// <summary>The client's name for the file, as a plain name (no folders) for messages and the LoRA's file_name.</summary>
    private static string FileNameOf(MultipartSection section)
    {
        var name = ContentDispositionHeaderValue.TryParse(section.ContentDisposition, out var disposition)
            ? HeaderUtilities.RemoveQuotes(disposition.FileNameStar.HasValue ? disposition.FileNameStar : disposition.FileName).Value
            : null;
        name = Path.GetFileName((name ?? "").Replace('\\', '/')).Trim();
        name = new string(name.Where(c => !char.IsControl(c)).ToArray());
        return name.Length == 0 ? "upload.safetensors" : name.Length > MaxFileNameLength ? name[..MaxFileNameLength] : name;
    }

    private static IResult Invalid(object[] loc, string message, string type = "value_error")
    {
        var errors = new ValidationErrors();
        errors.Add(loc, message, type);
        return errors.ToResult();
    }

    /// <summary>413, and the connection closes: whatever the client still sends is not read.</summary>
    private static IResult TooLarge(HttpContext http, long cap)
    {
        http.Response.Headers.Connection = "close";
        return ApiErrors.Error(StatusCodes.Status413PayloadTooLarge,
            $"The uploaded file is larger than Import:MaxFileBytes ({cap} bytes); it was not stored. Ask the operator to raise the limit to import it.");
    }
}
