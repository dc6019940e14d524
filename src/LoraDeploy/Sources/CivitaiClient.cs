using System.Globalization;
using System.Net;
using System.Net.Http.Headers;
using System.Text.Json;
using System.Text.Json.Serialization.Metadata;
using Microsoft.Extensions.Options;
using Polly.Timeout;

namespace LoraDeploy.Sources;

/// <summary>Turns a <see cref="CivitaiReference"/> into exactly one downloadable adapter file, or says why not.</summary>
public sealed class CivitaiClient(
    HttpClient http,
    IOptionsMonitor<CivitaiOptions> options,
    IOptionsMonitor<ImportOptions> importOptions,
    TimeProvider time,
    ILogger<CivitaiClient> logger)
{
    private static readonly string[] LoraTypes = ["LORA", "LoCon", "DoRA"];
    private static readonly string[] PrimaryCapableFileTypes = ["Model", "Pruned Model"];

    /// <summary>
    /// With <c>checkDownloadAccess</c>, also asks the download endpoint whether this account may fetch the file.
    /// CivitAI counts every hit there against the account's download quota, so the import pipeline passes false and
    /// lets the one download that moves the bytes find out instead.
    /// </summary>
    public async Task<CivitaiResolveResult> ResolveAsync(CivitaiReference reference, CancellationToken cancellationToken, bool checkDownloadAccess = true)
    {
        var result = await GuardAsync(civitai => ResolveCoreAsync(reference, civitai, checkDownloadAccess, cancellationToken)).ConfigureAwait(false);
        if (result.Succeeded)
        {
            logger.LogInformation("Resolved {Reference} to file {FileId} ({FileName}) of version {VersionId}", reference, result.File.FileId, result.File.FileName, result.File.VersionId);
        }
        else
        {
            logger.LogInformation("Could not resolve {Reference}: {ReasonClass} {FailReason}", reference, result.ReasonClass, result.FailReason);
        }
        return result;
    }

    /// <summary>
    /// Finds the version whose file has this SHA-256 (CivitAI's by-hash API, reference §2.2) and resolves exactly that
    /// file as a create would, without touching the download endpoint. <paramref name="sha256"/> is 64 hex digits.
    /// </summary>
    public Task<CivitaiResolveResult> LookupByHashAsync(string sha256, CancellationToken cancellationToken) =>
        GuardAsync(async civitai =>
        {
            var hash = sha256.ToUpperInvariant();
            var (status, version, error) = await GetJsonAsync($"api/v1/model-versions/by-hash/{hash}", CivitaiJsonContext.Default.CivitaiVersionDto, civitai, cancellationToken).ConfigureAwait(false);
            if (version is null)
            {
                return status == HttpStatusCode.NotFound
                    ? CivitaiResolveResult.Fail(ReasonClass.NotFound, $"CivitAI knows no published file with SHA-256 {sha256.ToLowerInvariant()}")
                    : ApiFailure(status, error, $"SHA-256 {sha256.ToLowerInvariant()}");
            }
            // The hash may belong to any file of the version; pin that one so a create fetches these very bytes.
            var file = (version.Files ?? []).FirstOrDefault(f => string.Equals(ListedSha256(f), sha256, StringComparison.OrdinalIgnoreCase));
            if (file is null)
            {
                // Never offer another file of the version in its place: the user's bytes are what was asked about.
                return CivitaiResolveResult.Fail(ReasonClass.NotFound, $"CivitAI matched SHA-256 {sha256.ToLowerInvariant()} to version {version.Id}, but lists no public file with that SHA-256 in it");
            }
            var reference = new CivitaiReference { ModelId = version.ModelId, VersionId = version.Id, FileId = file.Id };
            return await ResolveCoreAsync(reference, civitai, checkDownloadAccess: false, cancellationToken).ConfigureAwait(false);
        });

    private async Task<CivitaiResolveResult> GuardAsync(Func<CivitaiOptions, Task<CivitaiResolveResult>> call)
    {
        var civitai = options.CurrentValue;
        try
        {
            return await call(civitai).ConfigureAwait(false);
        }
        catch (OutboundRequestRefusedException ex)
        {
            // Only the operator's own Civitai:BaseUrl gets the setting named; a redirect's target never does.
            var hint = ex.Address is not null && !ex.ViaRedirect
                ? "; Civitai:BaseUrl is contacted only at public addresses or ones listed in Network:AllowedPrivateRanges"
                : "";
            return CivitaiResolveResult.Fail(ReasonClass.Refused, $"could not contact CivitAI at {civitai.GetBaseUri()}: {ex.Message}{hint}");
        }
        catch (TimeoutRejectedException)
        {
            return CivitaiResolveResult.Fail(ReasonClass.Network, $"CivitAI at {civitai.GetBaseUri()} did not answer in time; try again later");
        }
        catch (HttpRequestException ex)
        {
            return CivitaiResolveResult.Fail(ReasonClass.Network, $"could not reach CivitAI at {civitai.GetBaseUri()} ({ex.Message}); check the network and Civitai:BaseUrl");
        }
        catch (JsonException)
        {
            return CivitaiResolveResult.Fail(ReasonClass.Upstream, $"CivitAI at {civitai.GetBaseUri()} answered with JSON this service cannot read; check Civitai:BaseUrl");
        }
        catch (UpstreamAnswerException ex)
        {
            return CivitaiResolveResult.Fail(ex.ReasonClass, ex.Message);
        }
    }

    private async Task<CivitaiResolveResult> ResolveCoreAsync(CivitaiReference reference, CivitaiOptions civitai, bool checkDownloadAccess, CancellationToken ct)
    {
        CivitaiVersionDto version;
        int modelId;
        string? modelType, modelMode, modelName;
        CivitaiModelDto? modelBody = null;

        if (reference.VersionId is { } vid)
        {
            var (status, dto, error) = await GetJsonAsync($"api/v1/model-versions/{vid}", CivitaiJsonContext.Default.CivitaiVersionDto, civitai, ct).ConfigureAwait(false);
            if (dto is null)
            {
                return status == HttpStatusCode.NotFound
                    ? CivitaiResolveResult.Fail(ReasonClass.NotFound, $"CivitAI has no published version {vid} (it may be deleted, unpublished or not yet rated); check the link")
                    : ApiFailure(status, error, $"version {vid}");
            }
            version = dto;
            if (reference.ModelId is { } pasted && dto.ModelId is { } actual && pasted != actual)
            {
                return CivitaiResolveResult.Fail(ReasonClass.NotFound, $"CivitAI version {vid} belongs to model {actual}, not model {pasted}; check the link");
            }
            modelId = dto.ModelId ?? reference.ModelId ?? 0;
            modelType = dto.Model?.Type;
            modelMode = dto.Model?.Mode;
            modelName = dto.Model?.Name;
        }
        else
        {
            var mid = reference.ModelId ?? throw new ArgumentException("a CivitAI reference needs a model or version id", nameof(reference));
            var (status, model, error) = await GetJsonAsync($"api/v1/models/{mid}", CivitaiJsonContext.Default.CivitaiModelDto, civitai, ct).ConfigureAwait(false);
            if (model is null)
            {
                return status == HttpStatusCode.NotFound
                    ? CivitaiResolveResult.Fail(ReasonClass.NotFound, $"CivitAI has no model {mid}; check the link")
                    : ApiFailure(status, error, $"model {mid}");
            }
            if (CheckModel(mid, model.Type, model.Mode) is { } refusal)
            {
                return refusal;
            }
            // /models lists versions by index: 0 is the newest, the one the site shows by default.
            var newest = (model.ModelVersions ?? []).Select((v, i) => (v, i)).OrderBy(p => p.v.Index ?? int.MaxValue).ThenBy(p => p.i).Select(p => p.v).FirstOrDefault();
            if (newest is null)
            {
                return CivitaiResolveResult.Fail(ReasonClass.NotFound, $"CivitAI model {mid} has no published version to download");
            }
            version = newest;
            modelBody = model;
            modelId = mid;
            modelType = model.Type;
            modelMode = model.Mode;
            modelName = model.Name;
        }

        var versionId = version.Id;
        if (CheckModel(modelId, modelType, modelMode) is { } modelRefusal)
        {
            return modelRefusal;
        }
        if (version.Status is { } st && !string.Equals(st, "Published", StringComparison.OrdinalIgnoreCase))
        {
            return CivitaiResolveResult.Fail(ReasonClass.NotFound, $"CivitAI version {versionId} is not published ({st}); pick a published version");
        }
        if (!civitai.HasToken && EarlyAccessUntil(version) is { } ea)
        {
            return CivitaiResolveResult.Fail(ReasonClass.EarlyAccess, EarlyAccessSentence(versionId, ea == DateTimeOffset.MaxValue ? null : ea));
        }

        var picked = PickFile(reference, version);
        if (picked.Failure is { } pickFailure)
        {
            return pickFailure;
        }
        var file = picked.File!;

        // License terms, NSFW level and creator are the model's (reference §2.3); a version body does not carry them.
        if (modelBody is null)
        {
            var (status, model, error) = await GetJsonAsync($"api/v1/models/{modelId}", CivitaiJsonContext.Default.CivitaiModelDto, civitai, ct).ConfigureAwait(false);
            if (model is null)
            {
                return status == HttpStatusCode.NotFound
                    ? CivitaiResolveResult.Fail(ReasonClass.NotFound, $"CivitAI has no model {modelId} for version {versionId}, so its license cannot be read; check the link")
                    : ApiFailure(status, error, $"model {modelId}");
            }
            modelBody = model;
        }

        var resolved = new ResolvedCivitaiFile
        {
            ModelId = modelId,
            VersionId = versionId,
            FileId = file.Id,
            FileName = SafeFileName(file.Name, file.Id),
            ListedSizeBytes = (long)Math.Round((file.SizeKB ?? 0) * 1024),
            ListedSha256 = ListedSha256(file),
            BaseModel = version.BaseModel ?? "",
            TrainedWords = version.TrainedWords ?? [],
            ModelType = modelType!,
            ModelName = modelName,
            VersionName = version.Name,
            DownloadUrl = DownloadUrlFor(civitai, versionId, file.Id),
            License = CivitaiLicense.From(modelBody),
        };

        // The JSON does not say whether a login is needed or access was bought; only the download endpoint knows.
        if (!checkDownloadAccess)
        {
            return CivitaiResolveResult.Ok(resolved);
        }
        return await ProbeDownloadAsync(resolved, civitai, ct).ConfigureAwait(false) ?? CivitaiResolveResult.Ok(resolved);
    }

    private async Task<CivitaiResolveResult?> ProbeDownloadAsync(ResolvedCivitaiFile file, CivitaiOptions civitai, CancellationToken ct)
    {
        using var request = CivitaiHttp.CreateRequest(file.DownloadUrl, civitai);
        request.Options.Set(RedirectHandler.FollowRedirects, false);
        using var response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, ct).ConfigureAwait(false);
        if ((int)response.StatusCode is >= 200 and < 400)
        {
            return null;
        }
        var body = await CivitaiHttp.ReadErrorAsync(response, importOptions.CurrentValue, time, ct).ConfigureAwait(false);
        var (reasonClass, reason) = CivitaiHttp.DescribeDownloadError(response.StatusCode, body, file.VersionId, civitai.HasToken, time);
        return CivitaiResolveResult.Fail(reasonClass, reason);
    }

    private static CivitaiResolveResult? CheckModel(int modelId, string? type, string? mode)
    {
        if (type is null || !LoraTypes.Contains(type, StringComparer.Ordinal))
        {
            return CivitaiResolveResult.Fail(ReasonClass.UnsupportedType,
                $"CivitAI model {modelId} is a {type ?? "model of unknown type"}, not a LoRA; only LORA, LoCon and DoRA models can be deployed");
        }
        if (string.Equals(mode, "Archived", StringComparison.OrdinalIgnoreCase))
        {
            return CivitaiResolveResult.Fail(ReasonClass.Unavailable, $"CivitAI model {modelId} is archived and its files can no longer be downloaded");
        }
        if (string.Equals(mode, "TakenDown", StringComparison.OrdinalIgnoreCase))
        {
            return CivitaiResolveResult.Fail(ReasonClass.Unavailable, $"CivitAI model {modelId} has been taken down and cannot be downloaded");
        }
        return null;
    }

    private static (CivitaiFileDto? File, CivitaiResolveResult? Failure) PickFile(CivitaiReference reference, CivitaiVersionDto version)
    {
        var vid = version.Id;
        var files = version.Files ?? [];
        if (reference.FileId is { } fid)
        {
            var exact = files.FirstOrDefault(f => f.Id == fid);
            if (exact is null)
            {
                return (null, CivitaiResolveResult.Fail(ReasonClass.NotFound, $"CivitAI version {vid} has no public file {fid}; check the link"));
            }
            if (string.Equals(exact.Type, "Training Data", StringComparison.OrdinalIgnoreCase))
            {
                return (null, CivitaiResolveResult.Fail(ReasonClass.UnsupportedType, $"CivitAI file {fid} is the training data archive of version {vid}, not an adapter; link the model file instead"));
            }
            if (!IsSafetensors(exact))
            {
                return (null, IsPickle(exact)
                    ? CivitaiResolveResult.Fail(ReasonClass.PickleOnly, $"CivitAI file {fid} ({exact.Name}) is a PickleTensor file, which can run code when loaded; only SafeTensor files are accepted")
                    : CivitaiResolveResult.Fail(ReasonClass.UnsupportedType, $"CivitAI file {fid} ({exact.Name}) is not a SafeTensor file ({exact.Metadata?.Format ?? "unknown format"}); only SafeTensor adapters are accepted"));
            }
            return Flagged(exact) ?? (exact, null);
        }

        var modelFiles = files.Where(f => PrimaryCapableFileTypes.Contains(f.Type ?? "", StringComparer.OrdinalIgnoreCase)).ToList();
        if (reference.HasSelector)
        {
            modelFiles = modelFiles.Where(f =>
                Same(reference.FileType, f.Type) && Same(reference.Format, f.Metadata?.Format)
                && Same(reference.Size, f.Metadata?.Size) && Same(reference.Fp, f.Metadata?.Fp)).ToList();
        }
        var candidates = modelFiles.Where(IsSafetensors).ToList();
        if (candidates.Count == 0)
        {
            if (modelFiles.Any(IsPickle))
            {
                return (null, CivitaiResolveResult.Fail(ReasonClass.PickleOnly,
                    $"CivitAI version {vid} only offers PickleTensor (.ckpt/.pt) files, which can run code when loaded; only SafeTensor files are accepted"));
            }
            return (null, CivitaiResolveResult.Fail(ReasonClass.NotFound, reference.HasSelector
                ? $"CivitAI version {vid} has no SafeTensor model file matching the link's type/format/size/fp; link the file with ?fileId= instead"
                : $"CivitAI version {vid} lists no SafeTensor model file to download"));
        }

        // Same preference as CivitAI's own getPrimaryFile: the primary file, else pruned, else fp16; ties keep listing order.
        var best = candidates
            .Select((f, i) => (f, i))
            .OrderByDescending(p => p.f.Primary == true)
            .ThenByDescending(p => (string.Equals(p.f.Metadata?.Size, "pruned", StringComparison.OrdinalIgnoreCase) ? 10 : 0)
                                   + (string.Equals(p.f.Metadata?.Fp, "fp16", StringComparison.OrdinalIgnoreCase) ? 1 : 0))
            .ThenBy(p => p.i)
            .First().f;
        return Flagged(best) ?? (best, null);

        static bool Same(string? wanted, string? actual) => wanted is null || string.Equals(wanted, actual, StringComparison.OrdinalIgnoreCase);

        static (CivitaiFileDto?, CivitaiResolveResult?)? Flagged(CivitaiFileDto f) =>
            string.Equals(f.PickleScanResult, "Danger", StringComparison.OrdinalIgnoreCase) || string.Equals(f.VirusScanResult, "Danger", StringComparison.OrdinalIgnoreCase)
                ? (null, CivitaiResolveResult.Fail(ReasonClass.Flagged, $"CivitAI's scanner flagged file {f.Id} ({f.Name}) as dangerous; it will not be imported"))
                : null;
    }

    private static bool IsSafetensors(CivitaiFileDto f) => f.Metadata?.Format is { } format
        ? string.Equals(format, "SafeTensor", StringComparison.OrdinalIgnoreCase)
        : f.Name is { } n && (n.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase) || n.EndsWith(".sft", StringComparison.OrdinalIgnoreCase));

    private static bool IsPickle(CivitaiFileDto f) =>
        string.Equals(f.Metadata?.Format, "PickleTensor", StringComparison.OrdinalIgnoreCase)
        || (f.Name is { } n && (n.EndsWith(".ckpt", StringComparison.OrdinalIgnoreCase) || n.EndsWith(".pt", StringComparison.OrdinalIgnoreCase)
                                || n.EndsWith(".pth", StringComparison.OrdinalIgnoreCase) || n.EndsWith(".bin", StringComparison.OrdinalIgnoreCase)));

    private static string? ListedSha256(CivitaiFileDto f)
    {
        var value = f.Hashes?.FirstOrDefault(h => string.Equals(h.Key, "SHA256", StringComparison.OrdinalIgnoreCase)).Value;
        return value is { Length: 64 } && value.All(char.IsAsciiHexDigit) ? value.ToLowerInvariant() : null;
    }

    private static string SafeFileName(string? name, int fileId)
    {
        var cleaned = Path.GetFileName((name ?? "").Replace('\\', '/'));
        cleaned = new string(cleaned.Where(c => !char.IsControl(c)).ToArray()).Trim();
        return cleaned.Length == 0 || cleaned is "." or ".." ? $"civitai-{fileId}.safetensors" : cleaned;
    }

    /// <summary>Deadline of an early-access window still open, <see cref="DateTimeOffset.MaxValue"/> when open without a known end, or null.</summary>
    private DateTimeOffset? EarlyAccessUntil(CivitaiVersionDto v)
    {
        var now = time.GetUtcNow();
        DateTimeOffset? until = null;
        foreach (var raw in new[] { v.EarlyAccessEndsAt, v.EarlyAccessDeadline })
        {
            if (raw is not null && DateTimeOffset.TryParse(raw, CultureInfo.InvariantCulture, DateTimeStyles.AssumeUniversal, out var d) && d > now)
            {
                until = d;
            }
        }
        if (v.PaidAccess is { ValueKind: JsonValueKind.Object } paid)
        {
            if (paid.TryGetProperty("permanent", out var perm) && perm.ValueKind == JsonValueKind.True)
            {
                until ??= DateTimeOffset.MaxValue;
            }
            else if (paid.TryGetProperty("endsAt", out var ends) && ends.ValueKind == JsonValueKind.String
                     && DateTimeOffset.TryParse(ends.GetString(), CultureInfo.InvariantCulture, DateTimeStyles.AssumeUniversal, out var e) && e > now)
            {
                until ??= e;
            }
        }
        if (until is null && string.Equals(v.Availability, "EarlyAccess", StringComparison.OrdinalIgnoreCase))
        {
            until = DateTimeOffset.MaxValue;
        }
        return until;
    }

    internal static string EarlyAccessSentence(int versionId, DateTimeOffset? until) =>
        $"CivitAI version {versionId} is in Early Access{(until is { } u ? $" until {u.UtcDateTime:yyyy-MM-dd HH:mm} UTC" : "")}; buy access with the account whose API key is in Civitai:Token, or wait until it ends";

    private static CivitaiResolveResult ApiFailure(HttpStatusCode status, string? error, string what) => (int)status switch
    {
        429 => CivitaiResolveResult.Fail(ReasonClass.RateLimited, $"CivitAI is rate-limiting requests (429) while looking up {what}; try again later"),
        401 or 403 => CivitaiResolveResult.Fail(ReasonClass.AuthRequired, $"CivitAI refused to show {what} ({(int)status}{(error is null ? "" : ": " + error)}); check Civitai:Token"),
        >= 500 => CivitaiResolveResult.Fail(ReasonClass.Upstream, $"CivitAI answered {(int)status} while looking up {what}; try again later"),
        _ => CivitaiResolveResult.Fail(ReasonClass.Upstream, $"CivitAI answered {(int)status}{(error is null ? "" : $" ({error})")} while looking up {what}"),
    };

    private async Task<(HttpStatusCode Status, T? Body, string? Error)> GetJsonAsync<T>(string relative, JsonTypeInfo<T> typeInfo, CivitaiOptions civitai, CancellationToken ct)
        where T : class
    {
        using var request = CivitaiHttp.CreateRequest(new Uri(civitai.GetBaseUri(), relative), civitai);
        request.Headers.Accept.Add(new MediaTypeWithQualityHeaderValue("application/json"));
        using var response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, ct).ConfigureAwait(false);
        var import = importOptions.CurrentValue;
        if (!response.IsSuccessStatusCode)
        {
            var error = await CivitaiHttp.ReadErrorAsync(response, import, time, ct).ConfigureAwait(false);
            return (response.StatusCode, null, error.Message);
        }
        var body = await ResponseBodyLimits.ReadJsonAsync(response.Content, typeInfo, import.MaxApiBodyBytes, import.ApiBodyTimeout, time, "/" + relative, ct).ConfigureAwait(false);
        return (response.StatusCode, body, null);
    }

    internal static Uri DownloadUrlFor(CivitaiOptions civitai, int versionId, int fileId) =>
        new(civitai.GetBaseUri(), $"api/download/models/{versionId}?fileId={fileId}");
}

/// <summary>Request and error-body helpers shared by the resolver and the downloader.</summary>
internal static class CivitaiHttp
{
    internal sealed record ErrorBody(string? Error, string? Message, string? Deadline)
    {
        public string? Text => Message ?? Error;
    }

    /// <summary>A GET that carries the token only when it goes to Civitai:BaseUrl's own origin.</summary>
    public static HttpRequestMessage CreateRequest(Uri uri, CivitaiOptions civitai)
    {
        var request = new HttpRequestMessage(HttpMethod.Get, uri);
        var baseUri = civitai.GetBaseUri();
        if (civitai.HasToken && Uri.Compare(uri, baseUri, UriComponents.SchemeAndServer, UriFormat.Unescaped, StringComparison.OrdinalIgnoreCase) == 0)
        {
            request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", civitai.Token!.Trim());
        }
        return request;
    }

    /// <summary>
    /// Reads CivitAI's error body leniently: <c>error</c> may be a string or an object (reference §5.13). At most
    /// <see cref="ResponseBodyLimits.ErrorBodyBytes"/> are read, within Import:ApiBodyTimeout; a longer or slower body says nothing.
    /// </summary>
    public static async Task<ErrorBody> ReadErrorAsync(HttpResponseMessage response, ImportOptions import, TimeProvider time, CancellationToken ct)
    {
        try
        {
            var bytes = await ResponseBodyLimits.ReadAtMostAsync(response.Content, ResponseBodyLimits.ErrorBodyBytes, import.ApiBodyTimeout, time, ct).ConfigureAwait(false);
            if (bytes is null)
            {
                return new ErrorBody(null, null, null);
            }
            using var doc = JsonDocument.Parse(bytes);
            if (doc.RootElement.ValueKind != JsonValueKind.Object)
            {
                return new ErrorBody(null, null, null);
            }
            return new ErrorBody(Str(doc.RootElement, "error"), Str(doc.RootElement, "message"), Str(doc.RootElement, "deadline"));
        }
        catch (Exception ex) when (ex is JsonException or HttpRequestException or IOException)
        {
            return new ErrorBody(null, null, null);
        }

        static string? Str(JsonElement e, string name) =>
            e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;
    }

    /// <summary>Maps an answer of <c>/api/download/models/{vid}</c> (reference §4.2) to a reason class and a sentence.</summary>
    public static (string ReasonClass, string Reason) DescribeDownloadError(HttpStatusCode status, ErrorBody body, int versionId, bool hasToken, TimeProvider time)
    {
        var detail = body.Text is { } t ? $": {t}" : "";
        switch ((int)status)
        {
            case 401 when body.Message?.Contains("disabled downloads", StringComparison.OrdinalIgnoreCase) == true:
                return (ReasonClass.Unavailable, $"the creator of CivitAI version {versionId} has disabled downloads");
            case 401:
                return (ReasonClass.AuthRequired, hasToken
                    ? $"CivitAI requires a login to download version {versionId} and did not accept Civitai:Token; check that the API key is valid"
                    : $"CivitAI requires a login to download version {versionId}; set Civitai:Token");
            case 403 when string.Equals(body.Error, "Early Access", StringComparison.OrdinalIgnoreCase):
                DateTimeOffset? until = DateTimeOffset.TryParse(body.Deadline, CultureInfo.InvariantCulture, DateTimeStyles.AssumeUniversal, out var d) && d > time.GetUtcNow() ? d : null;
                return (ReasonClass.EarlyAccess, CivitaiClient.EarlyAccessSentence(versionId, until));
            case 403:
                return (ReasonClass.AuthRequired, hasToken
                    ? $"CivitAI refused the download of version {versionId} (403{detail}); the account behind Civitai:Token has no access to it"
                    : $"CivitAI refused the download of version {versionId} (403{detail}); set Civitai:Token to an account with access");
            case 404:
                return (ReasonClass.NotFound, $"CivitAI has no downloadable file for version {versionId} (404{detail}); the version may be unpublished or the file removed");
            case 410:
                return (ReasonClass.Unavailable, $"the CivitAI model of version {versionId} is archived and can no longer be downloaded (410)");
            case 429:
                return (ReasonClass.RateLimited, $"CivitAI is rate-limiting downloads (429{detail}); try again later");
            case >= 500:
                return (ReasonClass.Upstream, $"CivitAI answered {(int)status} for the download of version {versionId}; try again later");
            default:
                return (ReasonClass.Upstream, $"CivitAI answered {(int)status}{detail} for the download of version {versionId}");
        }
    }
}
