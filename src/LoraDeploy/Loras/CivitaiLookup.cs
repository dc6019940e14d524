using LoraDeploy.Pipeline;
using LoraDeploy.Sources;
using LoraDeploy.Validation;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Loras;

/// <summary>
/// <c>GET /v1/lora/civitai/by-hash/{sha256}</c>: for a user with the file in hand, the CivitAI version it belongs to (by
/// CivitAI's by-hash API) and a <c>civit_url</c> pinned to that exact file for <c>POST /v1/lora/create</c>.
/// </summary>
public static class CivitaiLookup
{
    public static async Task<IResult> HandleAsync(string sha256, CivitaiClient civitai, IOptionsMonitor<PolicyOptions> policy, CancellationToken ct)
    {
        var hash = sha256.Trim();
        if (hash.Length != 64 || !hash.All(char.IsAsciiHexDigit))
        {
            var errors = new ValidationErrors();
            errors.Add(["path", "sha256"], $"sha256 must be 64 hexadecimal digits (the SHA-256 of the whole file); got {hash.Length} characters", "value_error");
            return errors.ToResult();
        }
        hash = hash.ToLowerInvariant();
        var result = await civitai.LookupByHashAsync(hash, ct);
        if (!result.Succeeded)
        {
            return result.ReasonClass switch
            {
                ReasonClass.NotFound => ApiErrors.NotFound(result.FailReason),
                ReasonClass.Network or ReasonClass.Upstream or ReasonClass.RateLimited or ReasonClass.Refused => ApiErrors.Error(StatusCodes.Status502BadGateway, result.FailReason),
                // Found, but not something this server deploys (not a LoRA, pickle only, flagged, …).
                _ => ApiErrors.Error(StatusCodes.Status422UnprocessableEntity, result.FailReason),
            };
        }
        var file = result.File;
        return TypedResults.Json(new CivitaiLookupOut(
            hash,
            file.ModelId,
            file.ModelName,
            file.VersionId,
            file.VersionName,
            file.FileId,
            file.FileName,
            file.ModelType,
            file.BaseModel,
            file.TrainedWords,
            // civitai.com whatever Civitai:BaseUrl is: the create route accepts CivitAI's own hosts only.
            $"https://civitai.com/api/download/models/{file.VersionId}?fileId={file.FileId}",
            LicenseOut.From(file.License),
            file.License?.NsfwLevel,
            PolicyGate.Check(policy.CurrentValue, file.ModelId, file.License)), ApiJson.Context.CivitaiLookupOut);
    }
}
