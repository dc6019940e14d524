using Microsoft.Extensions.Options;

using LoraDeploy.Storage;

namespace LoraDeploy.Sources;

/// <summary>
/// Streams a resolved CivitAI file into a staging file of the blob store while hashing it, resuming with Range after drops
/// and crashes, and asking CivitAI for a fresh signed link when the old one stops working (the loop is
/// <see cref="ResumableDownload"/>'s). Durability (fsync, rename, storing) is the caller's job.
/// </summary>
public sealed class CivitaiDownloader(
    HttpClient http,
    IOptionsMonitor<CivitaiOptions> civitaiOptions,
    IOptionsMonitor<ImportOptions> importOptions,
    TimeProvider time,
    ILogger<CivitaiDownloader> logger)
{
    /// <summary>Downloads into (or resumes) the staging file <paramref name="stagingName"/> of <paramref name="blobs"/>.</summary>
    public async Task<DownloadResult> DownloadAsync(ResolvedCivitaiFile file, IBlobStore blobs, string stagingName, IProgress<long>? progress, CancellationToken cancellationToken)
    {
        var import = importOptions.CurrentValue;
        var target = new CivitaiDownloadTarget(file, civitaiOptions.CurrentValue, import, time);
        var result = await new ResumableDownload(http, time, logger).RunAsync(target, blobs, stagingName, import, progress, cancellationToken).ConfigureAwait(false);
        logger.LogInformation("Downloaded CivitAI file {FileId} ({Bytes} bytes, sha256 {Sha256})", file.FileId, result.Bytes, result.Sha256);
        return result;
    }

    /// <summary>CivitAI's download endpoint for the file; its listed size and hash are approximate or may be wrong, so neither is enforced here.</summary>
    private sealed class CivitaiDownloadTarget(ResolvedCivitaiFile file, CivitaiOptions civitai, ImportOptions import, TimeProvider time) : DownloadTarget
    {
        public override string Name => $"CivitAI file {file.FileId} of version {file.VersionId}";

        public override string SourceName => "CivitAI";

        public override Uri SourceOrigin => civitai.GetBaseUri();

        public override HttpRequestMessage CreateSourceRequest() => CivitaiHttp.CreateRequest(file.DownloadUrl, civitai);

        public override async Task<DownloadFailedException> DescribeSourceErrorAsync(HttpResponseMessage response, CancellationToken ct)
        {
            var body = await CivitaiHttp.ReadErrorAsync(response, import, time, ct).ConfigureAwait(false);
            var (reasonClass, reason) = CivitaiHttp.DescribeDownloadError(response.StatusCode, body, file.VersionId, civitai.HasToken, time);
            return new DownloadFailedException(reason, reasonClass);
        }
    }
}
