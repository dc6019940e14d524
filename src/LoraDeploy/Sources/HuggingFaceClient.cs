using System.Net;
using System.Net.Http.Headers;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using Microsoft.Extensions.Options;
using Polly.Timeout;

namespace LoraDeploy.Sources;

/// <summary>
/// Resolves a Hugging Face repo to one commit's PEFT adapter (<c>adapter_config.json</c> + <c>adapter_model.safetensors</c>)
/// through the Hub API at HuggingFace:BaseUrl, and fetches the small config. The caller's hf_token is used for the
/// call it is given to and never kept or logged.
/// </summary>
public sealed class HuggingFaceClient(
    HttpClient http,
    IOptionsMonitor<HuggingFaceOptions> options,
    IOptionsMonitor<ImportOptions> importOptions,
    TimeProvider time,
    ILogger<HuggingFaceClient> logger)
{
    /// <summary>The most of <c>adapter_config.json</c> read; real ones are a few KiB.</summary>
    public const int MaxConfigBytes = 1024 * 1024;

    public const string ConfigFileName = "adapter_config.json";
    public const string WeightsFileName = "adapter_model.safetensors";
    public const string PickleWeightsFileName = "adapter_model.bin";

    /// <summary>Looks the repo up at its revision (the default branch when none) and picks the adapter's files at that commit.</summary>
    public async Task<HuggingFaceResolveResult> ResolveAsync(HuggingFaceRepoRef repo, string? token, CancellationToken cancellationToken)
    {
        var hub = options.CurrentValue;
        if (!HuggingFaceHttp.TryNormalizeToken(token, out var bearer, out var tokenError))
        {
            return HuggingFaceResolveResult.Fail(ReasonClass.AuthRequired, tokenError);
        }
        var result = await HuggingFaceHttp.GuardAsync(hub, () => ResolveCoreAsync(repo, bearer, hub, cancellationToken), HuggingFaceResolveResult.Fail).ConfigureAwait(false);
        if (result.Succeeded)
        {
            logger.LogInformation("Resolved Hugging Face repo {Repo} to commit {Commit}", repo, result.Adapter.Commit);
        }
        else
        {
            logger.LogInformation("Could not resolve Hugging Face repo {Repo}: {ReasonClass} {FailReason}", repo, result.ReasonClass, result.FailReason);
        }
        return result;
    }

    /// <summary>
    /// Fetches the adapter's <c>adapter_config.json</c> at its pinned commit: at most <see cref="MaxConfigBytes"/>, the size
    /// and git blob id the Hub listed, and a JSON object (what is in it is for the PEFT reader to judge).
    /// </summary>
    public async Task<HuggingFaceConfigResult> FetchConfigAsync(ResolvedHuggingFaceAdapter adapter, string? token, CancellationToken cancellationToken)
    {
        var hub = options.CurrentValue;
        if (!HuggingFaceHttp.TryNormalizeToken(token, out var bearer, out var tokenError))
        {
            return HuggingFaceConfigResult.Fail(ReasonClass.AuthRequired, tokenError);
        }
        var result = await HuggingFaceHttp.GuardAsync(hub, () => FetchConfigCoreAsync(adapter.Config, bearer, hub, cancellationToken), HuggingFaceConfigResult.Fail).ConfigureAwait(false);
        if (!result.Succeeded)
        {
            logger.LogInformation("Could not fetch {Path} of Hugging Face repo {Repo}: {ReasonClass} {FailReason}", adapter.Config.Path, adapter.RepoId, result.ReasonClass, result.FailReason);
        }
        return result;
    }

    private async Task<HuggingFaceResolveResult> ResolveCoreAsync(HuggingFaceRepoRef repo, string? bearer, HuggingFaceOptions hub, CancellationToken ct)
    {
        var import = importOptions.CurrentValue;
        var relative = repo.Revision is null
            ? $"api/models/{repo.Owner}/{repo.Name}?blobs=true"
            : $"api/models/{repo.Owner}/{repo.Name}/revision/{Uri.EscapeDataString(repo.Revision)}?blobs=true";
        using var request = HuggingFaceHttp.CreateRequest(new Uri(hub.GetBaseUri(), relative), hub, bearer);
        request.Headers.Accept.Add(new MediaTypeWithQualityHeaderValue("application/json"));
        using var response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, ct).ConfigureAwait(false);
        if (!response.IsSuccessStatusCode)
        {
            var error = await HuggingFaceHttp.ReadErrorAsync(response, import, time, ct).ConfigureAwait(false);
            var (reasonClass, reason) = HuggingFaceHttp.Describe(response.StatusCode, error, bearer is not null, repo.RepoId, repo.Revision, null, hub, $"looking up {repo.RepoId}");
            return HuggingFaceResolveResult.Fail(reasonClass, reason);
        }
        var limit = (int)Math.Min(import.MaxApiBodyBytes, int.MaxValue - 1);
        var bytes = await ResponseBodyLimits.ReadAtMostAsync(response.Content, limit, import.ApiBodyTimeout, time, ct).ConfigureAwait(false)
            ?? throw new UpstreamAnswerException(
                $"the Hugging Face Hub's answer about {repo.RepoId} was larger than Import:MaxApiBodyBytes ({import.MaxApiBodyBytes} bytes) or did not arrive whole within Import:ApiBodyTimeout ({import.ApiBodyTimeout}); check HuggingFace:BaseUrl, or try again later",
                ReasonClass.Upstream);
        var info = JsonSerializer.Deserialize(bytes, HuggingFaceJsonContext.Default.HuggingFaceModelInfoDto)
            ?? throw new JsonException("null model info");
        return Pick(repo, info, bearer is not null, hub, import);
    }

    private static HuggingFaceResolveResult Pick(HuggingFaceRepoRef repo, HuggingFaceModelInfoDto info, bool hasToken, HuggingFaceOptions hub, ImportOptions import)
    {
        var what = $"Hugging Face repo {repo}";
        if (info.Sha is not { Length: 40 } commit || !commit.All(char.IsAsciiHexDigit))
        {
            return HuggingFaceResolveResult.Fail(ReasonClass.Upstream, $"the Hugging Face Hub's answer about {what} names no commit; check HuggingFace:BaseUrl");
        }
        commit = commit.ToLowerInvariant();
        // A renamed repo answers under its new name: use it, so the file links do not go through the rename redirect.
        if (info.Id is { } id && !string.Equals(id, repo.RepoId, StringComparison.Ordinal)
            && HuggingFaceRepoRef.TryParse(id, null, out var canonical, out _) && canonical.Revision is null)
        {
            repo = repo with { Owner = canonical.Owner, Name = canonical.Name };
        }
        var siblings = (info.Siblings ?? []).Where(s => !string.IsNullOrEmpty(s.Rfilename)).GroupBy(s => s.Rfilename!, StringComparer.Ordinal)
            .ToDictionary(g => g.Key, g => g.First(), StringComparer.Ordinal);
        siblings.TryGetValue(ConfigFileName, out var config);
        siblings.TryGetValue(WeightsFileName, out var weights);

        if (weights is null && siblings.ContainsKey(PickleWeightsFileName))
        {
            return HuggingFaceResolveResult.Fail(ReasonClass.PickleOnly,
                $"{what} has its adapter weights only as {PickleWeightsFileName}, a pickle file that can run code when loaded, so it was not downloaded; ask its author for {WeightsFileName} (PEFT's default format), or convert it and import a repo of your own");
        }
        if (config is null)
        {
            return HuggingFaceResolveResult.Fail(ReasonClass.UnsupportedType, weights is null
                ? $"{what} is not a PEFT adapter: it has no {ConfigFileName}; it {DescribeRepo(info, siblings.Keys)}. Give a repo holding {ConfigFileName} and {WeightsFileName}"
                : $"{what} has {WeightsFileName} but no {ConfigFileName}, so it is not a complete PEFT adapter (the config says its rank, alpha and target modules); ask its author to add the config");
        }
        if (weights is null)
        {
            return HuggingFaceResolveResult.Fail(ReasonClass.NotFound,
                $"{what} has {ConfigFileName} but no {WeightsFileName} at its top level; give a repo holding both");
        }

        var gated = GatedMode(info.Gated);
        var configFile = RepoFile(repo, commit, ConfigFileName, config, hub, out var configProblem);
        var weightsFile = RepoFile(repo, commit, WeightsFileName, weights, hub, out var weightsProblem);
        if ((configProblem ?? weightsProblem) is { } problem)
        {
            return HuggingFaceResolveResult.Fail(ReasonClass.Upstream, $"the Hugging Face Hub's answer about {what} {problem}; check HuggingFace:BaseUrl");
        }
        if (configFile!.SizeBytes > MaxConfigBytes)
        {
            return HuggingFaceResolveResult.Fail(ReasonClass.TooLarge,
                $"{ConfigFileName} of {what} is {configFile.SizeBytes} bytes; a PEFT config is a few KiB and at most {MaxConfigBytes} bytes are read");
        }
        if (weightsFile!.SizeBytes > import.MaxFileBytes)
        {
            return HuggingFaceResolveResult.Fail(ReasonClass.TooLarge,
                $"{WeightsFileName} of {what} is {weightsFile.SizeBytes} bytes, over Import:MaxFileBytes ({import.MaxFileBytes}); raise the limit to import it");
        }
        if (gated is not null && !hasToken)
        {
            // The listing is public, the files are not; with a token only a file's answer tells whether access was granted.
            return HuggingFaceResolveResult.Fail(ReasonClass.AuthRequired,
                $"{what} is gated: give an hf_token of an account that has been granted access (ask for it at {new Uri(hub.GetBaseUri(), repo.RepoId)})");
        }
        return HuggingFaceResolveResult.Ok(new ResolvedHuggingFaceAdapter
        {
            RepoId = repo.RepoId,
            Revision = repo.Revision,
            Commit = commit,
            IsPrivate = info.Private == true,
            Gated = gated,
            CardBaseModel = CardBaseModel(info.CardData),
            Config = configFile,
            Weights = weightsFile,
        });
    }

    private static HuggingFaceRepoFile? RepoFile(HuggingFaceRepoRef repo, string commit, string path, HuggingFaceSiblingDto sibling, HuggingFaceOptions hub, out string? problem)
    {
        problem = null;
        string? sha256 = null;
        if (sibling.Lfs is { } lfs)
        {
            if (lfs.Sha256 is not { Length: 64 } sha || !sha.All(char.IsAsciiHexDigit))
            {
                problem = $"lists {path} as an LFS file without a readable SHA-256";
                return null;
            }
            sha256 = sha.ToLowerInvariant();
        }
        var size = sibling.Lfs?.Size ?? sibling.Size;
        if (size is not >= 0)
        {
            problem = $"lists no size for {path}";
            return null;
        }
        return new HuggingFaceRepoFile
        {
            RepoId = repo.RepoId,
            Commit = commit,
            Path = path,
            SizeBytes = size.Value,
            Sha256 = sha256,
            GitBlobId = sibling.BlobId is { Length: 40 } blob && blob.All(char.IsAsciiHexDigit) ? blob.ToLowerInvariant() : null,
            DownloadUrl = HuggingFaceHttp.ResolveUrl(hub, repo.RepoId, commit, path),
        };
    }

    /// <summary>What a repo without adapter_config.json seems to be, as the end of "it …".</summary>
    private static string DescribeRepo(HuggingFaceModelInfoDto info, ICollection<string> files)
    {
        var kind = info.LibraryName is null && info.PipelineTag is null
            ? ""
            : $" ({string.Join(", ", new[] { info.LibraryName is { } l ? $"library {l}" : null, info.PipelineTag is { } p ? $"task {p}" : null }.OfType<string>())})";
        bool Has(Func<string, bool> test) => files.Any(test);
        static bool Top(string f) => !f.Contains('/', StringComparison.Ordinal);

        if (files.Count == 0)
        {
            return "is empty";
        }
        if (files.FirstOrDefault(f => f.EndsWith("/" + ConfigFileName, StringComparison.Ordinal)) is { } nested)
        {
            return $"keeps adapters in subfolders ({nested}), and only an adapter at the top of a repo can be imported";
        }
        if (files.Contains("config.json") && Has(f => Top(f) && (f.EndsWith(".safetensors", StringComparison.Ordinal) || f.EndsWith(".bin", StringComparison.Ordinal)
                                                                   || f.EndsWith(".safetensors.index.json", StringComparison.Ordinal))))
        {
            return $"looks like a full model{kind}: config.json with model weights, not a LoRA adapter";
        }
        if (Has(f => f.EndsWith(".gguf", StringComparison.OrdinalIgnoreCase)))
        {
            return $"holds GGUF files{kind}, not a PEFT adapter";
        }
        if (files.Contains("model_index.json"))
        {
            return $"looks like a diffusers pipeline{kind}";
        }
        if (files.Contains("pytorch_lora_weights.safetensors"))
        {
            return $"looks like a diffusers LoRA{kind} (pytorch_lora_weights.safetensors), which is for image models, not a PEFT adapter";
        }
        var shown = files.Where(f => !f.StartsWith('.')).Take(5).ToList();
        return $"holds {string.Join(", ", shown)}{(files.Count > shown.Count ? ", …" : "")}{kind}";
    }

    private static string? GatedMode(JsonElement? gated) => gated switch
    {
        { ValueKind: JsonValueKind.String } g => g.GetString(),
        { ValueKind: JsonValueKind.True } => "true",
        _ => null,
    };

    private static string? CardBaseModel(JsonElement? card)
    {
        if (card is not { ValueKind: JsonValueKind.Object } c || !c.TryGetProperty("base_model", out var b))
        {
            return null;
        }
        return b.ValueKind switch
        {
            JsonValueKind.String => b.GetString(),
            JsonValueKind.Array when b.GetArrayLength() > 0 && b[0].ValueKind == JsonValueKind.String => b[0].GetString(),
            _ => null,
        };
    }

    private async Task<HuggingFaceConfigResult> FetchConfigCoreAsync(HuggingFaceRepoFile file, string? bearer, HuggingFaceOptions hub, CancellationToken ct)
    {
        var import = importOptions.CurrentValue;
        var what = $"{file.Path} of Hugging Face repo {file.RepoId}";
        using var request = HuggingFaceHttp.CreateRequest(file.DownloadUrl, hub, bearer);
        using var response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, ct).ConfigureAwait(false);
        if (!response.IsSuccessStatusCode)
        {
            var finalUri = response.RequestMessage?.RequestUri ?? file.DownloadUrl;
            if (!HuggingFaceHttp.IsHub(finalUri, hub))
            {
                return HuggingFaceConfigResult.Fail((int)response.StatusCode == 429 ? ReasonClass.RateLimited : ReasonClass.Upstream,
                    $"the storage host {finalUri.IdnHost} answered {(int)response.StatusCode} for {what}; try again later");
            }
            var error = await HuggingFaceHttp.ReadErrorAsync(response, import, time, ct).ConfigureAwait(false);
            var (reasonClass, reason) = HuggingFaceHttp.Describe(response.StatusCode, error, bearer is not null, file.RepoId, file.Commit, file.Path, hub, $"fetching {file.Path} of {file.RepoId}");
            return HuggingFaceConfigResult.Fail(reasonClass, reason);
        }
        var tooLarge = $"{what} is larger than {MaxConfigBytes} bytes; a PEFT config is a few KiB";
        if (response.Content.Headers.ContentLength > MaxConfigBytes)
        {
            return HuggingFaceConfigResult.Fail(ReasonClass.TooLarge, tooLarge);
        }
        var bytes = await ResponseBodyLimits.ReadAtMostAsync(response.Content, MaxConfigBytes, import.ApiBodyTimeout, time, ct).ConfigureAwait(false);
        if (bytes is null)
        {
            return HuggingFaceConfigResult.Fail(ReasonClass.TooLarge, $"{tooLarge}, or it did not arrive whole within Import:ApiBodyTimeout ({import.ApiBodyTimeout})");
        }
        if (bytes.Length != file.SizeBytes || (file.Sha256 is null && file.GitBlobId is { } blob && GitBlobId(bytes) != blob)
            || (file.Sha256 is { } sha && Convert.ToHexStringLower(SHA256.HashData(bytes)) != sha))
        {
            return HuggingFaceConfigResult.Fail(ReasonClass.HashMismatch,
                $"{what} arrived as {bytes.Length} bytes that do not match the {file.SizeBytes}-byte file the Hub lists at commit {file.Commit}; try again later");
        }
        try
        {
            using var doc = JsonDocument.Parse(bytes);
            if (doc.RootElement.ValueKind != JsonValueKind.Object)
            {
                return HuggingFaceConfigResult.Fail(ReasonClass.UnsupportedType, $"{what} is not a JSON object, so it is not a PEFT config");
            }
        }
        catch (JsonException ex)
        {
            return HuggingFaceConfigResult.Fail(ReasonClass.UnsupportedType, $"{what} is not valid JSON ({ex.Message}), so it is not a PEFT config");
        }
        return HuggingFaceConfigResult.Ok(bytes);
    }

    /// <summary>git's object id of a blob: SHA-1 of "blob {length}\0" and the bytes; the Hub lists it as blobId.</summary>
#pragma warning disable CA5350 // SHA-1 is what git names blobs by; this checks an id, it does not protect anything.
    private static string GitBlobId(byte[] bytes) =>
        Convert.ToHexStringLower(SHA1.HashData([.. Encoding.ASCII.GetBytes($"blob {bytes.Length}\0"), .. bytes]));
#pragma warning restore CA5350
}

/// <summary>Requests, error answers and failure sentences shared by the client and the downloader.</summary>
internal static class HuggingFaceHttp
{
    internal sealed record HubError(string? Code, string? Message);

    /// <summary>A GET that carries the token only when it goes to HuggingFace:BaseUrl's own origin.</summary>
    public static HttpRequestMessage CreateRequest(Uri uri, HuggingFaceOptions hub, string? bearer)
    {
        var request = new HttpRequestMessage(HttpMethod.Get, uri);
        if (bearer is not null && IsHub(uri, hub))
        {
            request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", bearer);
        }
        return request;
    }

    public static bool IsHub(Uri uri, HuggingFaceOptions hub) =>
        Uri.Compare(uri, hub.GetBaseUri(), UriComponents.SchemeAndServer, UriFormat.Unescaped, StringComparison.OrdinalIgnoreCase) == 0;

    public static Uri ResolveUrl(HuggingFaceOptions hub, string repoId, string commit, string path) =>
        new(hub.GetBaseUri(), $"{repoId}/resolve/{commit}/{string.Join('/', path.Split('/').Select(Uri.EscapeDataString))}");

    /// <summary>The token trimmed (null when none was given), or why it cannot be one; the message never repeats it.</summary>
    public static bool TryNormalizeToken(string? token, out string? bearer, out string error)
    {
        bearer = null;
        error = "";
        if (string.IsNullOrWhiteSpace(token))
        {
            return true;
        }
        var trimmed = token.Trim();
        if (trimmed.Any(c => c is <= ' ' or > '~'))
        {
            error = "hf_token contains spaces or characters no Hugging Face token has; paste the token (hf_…) exactly";
            return false;
        }
        bearer = trimmed;
        return true;
    }

    /// <summary>Runs a Hub call, turning transport failures into the result type's failure.</summary>
    public static async Task<T> GuardAsync<T>(HuggingFaceOptions hub, Func<Task<T>> call, Func<string, string, T> fail)
    {
        try
        {
            return await call().ConfigureAwait(false);
        }
        catch (OutboundRequestRefusedException ex)
        {
            var hint = ex.Address is not null && !ex.ViaRedirect
                ? "; HuggingFace:BaseUrl is contacted only at public addresses or ones listed in Network:AllowedPrivateRanges"
                : "";
            return fail(ReasonClass.Refused, $"could not contact the Hugging Face Hub at {hub.GetBaseUri()}: {ex.Message}{hint}");
        }
        catch (TimeoutRejectedException)
        {
            return fail(ReasonClass.Network, $"the Hugging Face Hub at {hub.GetBaseUri()} did not answer in time; try again later");
        }
        catch (HttpRequestException ex)
        {
            return fail(ReasonClass.Network, $"could not reach the Hugging Face Hub at {hub.GetBaseUri()} ({ex.Message}); check the network and HuggingFace:BaseUrl");
        }
        catch (JsonException)
        {
            return fail(ReasonClass.Upstream, $"the Hugging Face Hub at {hub.GetBaseUri()} answered with JSON this service cannot read; check HuggingFace:BaseUrl");
        }
        catch (UpstreamAnswerException ex)
        {
            return fail(ex.ReasonClass, ex.Message);
        }
    }

    /// <summary>The Hub's <c>X-Error-Code</c> / <c>X-Error-Message</c>, else the <c>{"error": …}</c> body (read within limits).</summary>
    public static async Task<HubError> ReadErrorAsync(HttpResponseMessage response, ImportOptions import, TimeProvider time, CancellationToken ct)
    {
        var code = Header(response, "X-Error-Code");
        var message = Header(response, "X-Error-Message");
        if (message is null)
        {
            try
            {
                var bytes = await ResponseBodyLimits.ReadAtMostAsync(response.Content, ResponseBodyLimits.ErrorBodyBytes, import.ApiBodyTimeout, time, ct).ConfigureAwait(false);
                if (bytes is not null)
                {
                    using var doc = JsonDocument.Parse(bytes);
                    if (doc.RootElement.ValueKind == JsonValueKind.Object && doc.RootElement.TryGetProperty("error", out var e) && e.ValueKind == JsonValueKind.String)
                    {
                        message = Printable(e.GetString());
                    }
                }
            }
            catch (Exception ex) when (ex is JsonException or HttpRequestException or IOException)
            {
                // An unreadable error body says nothing; the status still does.
            }
        }
        return new HubError(code, message);

        static string? Header(HttpResponseMessage r, string name) =>
            r.Headers.NonValidated.TryGetValues(name, out var values) && values.Count > 0 ? Printable(values.ToString()) : null;
    }

    private static string? Printable(string? raw)
    {
        if (string.IsNullOrWhiteSpace(raw))
        {
            return null;
        }
        var cleaned = new string(raw.Select(c => char.IsControl(c) ? ' ' : c).ToArray()).Trim();
        return cleaned.Length > 300 ? cleaned[..300] + "…" : cleaned;
    }

    /// <summary>Maps a Hub error answer (reference huggingface-hub.md § Auth and errors) to a reason class and a sentence.</summary>
    public static (string ReasonClass, string Reason) Describe(HttpStatusCode status, HubError error, bool hasToken, string repoId, string? revision,
        string? path, HuggingFaceOptions hub, string doing)
    {
        var repo = $"Hugging Face repo {repoId}";
        var page = new Uri(hub.GetBaseUri(), repoId);
        var detail = error.Message is { } m ? $": {m}" : "";
        var code = error.Code;
        switch ((int)status)
        {
            case 401 when !hasToken && code == "GatedRepo":
                return (ReasonClass.AuthRequired, $"{repo} is gated: give an hf_token of an account that has been granted access (ask for it at {page})");
            case 401 when !hasToken:
                return (ReasonClass.AuthRequired, $"{repo} is private or gated, or does not exist (the Hub answers 401 to anonymous requests for all three): give an hf_token with access to it");
            case 401:
                return (ReasonClass.AuthRequired, $"the Hugging Face Hub did not accept hf_token while {doing} (401{detail}); check that the token is valid and not expired");
            case 403 when code == "GatedRepo":
                return (ReasonClass.AuthRequired, $"access to the gated {repo} has not been granted to the account of hf_token; visit {page} to ask for access, then try again");
            case 403:
                return (ReasonClass.AuthRequired, $"the Hugging Face Hub refused access while {doing} (403{detail}); give an hf_token with read access to the repo");
            case 404 when code == "RevisionNotFound":
                return (ReasonClass.NotFound, $"{repo} has no revision '{revision}'; give an existing branch, tag or commit after '@'");
            case 404 when code == "EntryNotFound":
                return (ReasonClass.NotFound, $"{repo} has no file {path} at {(revision is { Length: 40 } ? "commit " : "")}{revision ?? "its default branch"}");
            case 404 when hasToken:
                return (ReasonClass.NotFound, $"{repo} does not exist, or the account of hf_token cannot see it; check the name and the token");
            case 404:
                return (ReasonClass.NotFound, $"{repo} does not exist; check the name");
            case 429:
                return (ReasonClass.RateLimited, $"the Hugging Face Hub is rate-limiting requests (429) while {doing}; try again later");
            case >= 500:
                return (ReasonClass.Upstream, $"the Hugging Face Hub answered {(int)status} while {doing}; try again later");
            default:
                return (ReasonClass.Upstream, $"the Hugging Face Hub answered {(int)status}{detail} while {doing}");
        }
    }
}
