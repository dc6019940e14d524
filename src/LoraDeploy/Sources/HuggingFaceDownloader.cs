using Microsoft.Extensions.Options;

using LoraDeploy.Storage;

namespace LoraDeploy.Sources;

/// <summary>
/// Streams a resolved Hugging Face file (the adapter's weights) into a staging file of the blob store with
/// <see cref="ResumableDownload"/>: Range resume, a fresh signed link from the Hub when one expires, and the exact
/// size and LFS SHA-256 the Hub lists checked. The hf_token goes to HuggingFace:BaseUrl's origin only, never to the
/// storage host, and is neither kept nor logged.
/// </summary>
public sealed class HuggingFaceDownloader(
    HttpClient http,
    IOptionsMonitor<HuggingFaceOptions> hubOptions,
    IOptionsMonitor<ImportOptions> importOptions,
    TimeProvider time,
    ILogger<HuggingFaceDownloader> logger)
{
    /// <summary>
    /// Downloads into (or resumes) the staging file <paramref name="stagingName"/> of <paramref name="blobs"/>.
    /// <paramref name="token"/> is the import's hf_token for private and gated repos (null for public ones).
    /// Throws <see cref="DownloadFailedException"/> when the file cannot be fetched for good; its FailReason says why.
    /// </summary>
    public async Task<DownloadResult> DownloadAsync(HuggingFaceRepoFile file, string? token, IBlobStore blobs, string stagingName, IProgress<long>? progress, CancellationToken cancellationToken)
    {
        if (!HuggingFaceHttp.TryNormalizeToken(token, out var bearer, out var tokenError))
        {
            throw new DownloadFailedException(tokenError, ReasonClass.AuthRequired);
        }
        var import = importOptions.CurrentValue;
        var target = new HuggingFaceDownloadTarget(file, bearer, hubOptions.CurrentValue, import, time);
        var result = await new ResumableDownload(http, time, logger).RunAsync(target, blobs, stagingName, import, progress, cancellationToken).ConfigureAwait(false);
        logger.LogInformation("Downloaded {Path} of Hugging Face repo {Repo} at commit {Commit} ({Bytes} bytes, sha256 {Sha256})",
            file.Path, file.RepoId, file.Commit, result.Bytes, result.Sha256);
        return result;
    }

    /// <summary>The Hub's resolve link at the pinned commit; it redirects LFS files to signed storage.</summary>
    private sealed class HuggingFaceDownloadTarget(HuggingFaceRepoFile file, string? bearer, HuggingFaceOptions hub, ImportOptions import, TimeProvider time) : DownloadTarget
    {
        public override string Name => $"{file.Path} of Hugging Face repo {file.RepoId} (commit {file.Commit[..Math.Min(12, file.Commit.Length)]})";

        public override string SourceName => "the Hugging Face Hub";

        public override Uri SourceOrigin => hub.GetBaseUri();

        public override long? ExpectedBytes => file.SizeBytes;

        public override string? ExpectedSha256 => file.Sha256;

        public override HttpRequestMessage CreateSourceRequest() => HuggingFaceHttp.CreateRequest(file.DownloadUrl, hub, bearer);

        public override async Task<DownloadFailedException> DescribeSourceErrorAsync(HttpResponseMessage response, CancellationToken ct)
        {
            var error = await HuggingFaceHttp.ReadErrorAsync(response, import, time, ct).ConfigureAwait(false);
            var (reasonClass, reason) = HuggingFaceHttp.Describe(response.StatusCode, error, bearer is not null, file.RepoId, file.Commit, file.Path, hub,
                $"downloading {file.Path} of {file.RepoId}");
            return new DownloadFailedException(reason, reasonClass);
        }
    }
}
