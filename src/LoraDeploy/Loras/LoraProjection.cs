using System.Text.Json;
using LoraDeploy.Data;

namespace LoraDeploy.Loras;

/// <summary>The columns a LoRA response needs, read in one query (LoRA ⋈ deploy ⟕ import job ⟕ download ⟕ adapter).</summary>
public sealed class LoraRow
{
    // Settable properties (not a constructor) so EF can keep composing Where/OrderBy over the projection.
    public required Data.Lora Lora { get; init; }
    public required string OwnerName { get; init; }
    public required string Status { get; init; }
    public required string FailReason { get; init; }
    public required string Version { get; init; }
    public required string DeployId { get; init; }
    public string? ProbeJson { get; init; }
    public long? DownloadBytesDone { get; init; }
    public DateTime? DownloadStalledSince { get; init; }

    public static IQueryable<LoraRow> Query(LoraDeployDbContext db) =>
        from lora in db.Loras
        join deploy in db.Deploys on lora.Id equals deploy.LoraId
        join job in db.ImportJobs on deploy.Id equals job.DeployId into jobs
        from job in jobs.DefaultIfEmpty()
        select new LoraRow
        {
            Lora = lora,
            OwnerName = lora.User!.Name,
            Status = deploy.Status,
            FailReason = deploy.FailReason,
            Version = deploy.Version,
            DeployId = deploy.Id,
            ProbeJson = lora.Adapter == null ? null : lora.Adapter.ProbeJson,
            DownloadBytesDone = job == null || job.Download == null ? null : job.Download.BytesDone,
            DownloadStalledSince = job == null || job.Download == null ? null : job.Download.StalledSince,
        };

    public string ModelName => $"{OwnerName}/{Lora.Name}";

    /// <summary>Bytes in hand: the shared download's progress while fetching, the whole file once stored.</summary>
    public long DownloadedBytes => Lora.AdapterSha256 is not null ? Lora.SizeBytes ?? 0 : DownloadBytesDone ?? 0;

    /// <summary>Since when no byte arrived for this LoRA's download (once that lasted Pipeline:StalledAfter), while downloading.</summary>
    public string? StalledSince => Status == DeployStatus.Downloading && DownloadStalledSince is { } since ? Timestamps.Format(since) : null;

    public LoraOut ToOut() => new(
        Lora.Name,
        ModelName,
        Lora.BaseModel,
        new SourceModel(Lora.SourceType, Lora.SourceType == "upload" ? null : Lora.SourceUrl), // an upload's link is its hash: version
        Lora.Private,
        Lora.Description,
        DeployId,
        Status,
        FailReason,
        Version,
        Lora.SizeBytes,
        DownloadedBytes,
        StalledSince,
        Lora.CivitaiVersionId is null
            ? null
            : new CivitaiInfo(
                Lora.CivitaiModelId,
                Lora.CivitaiVersionId,
                Lora.CivitaiFileId,
                Lora.FileName,
                Lora.CivitaiBaseModel,
                Lora.TrainedWordsJson is null ? [] : JsonSerializer.Deserialize(Lora.TrainedWordsJson, ApiJson.Context.ListString) ?? [],
                Lora.SourceUrl),
        ProbeJson is null ? null : JsonDocument.Parse(ProbeJson).RootElement.Clone(),
        Lora.WarningsJson is null ? [] : JsonSerializer.Deserialize(Lora.WarningsJson, ApiJson.Context.ListString) ?? [],
        Timestamps.Format(Lora.CreatedAt),
        Timestamps.Format(Lora.UpdatedAt),
        LicenseOut.From(Pipeline.PolicyGate.RecordedLicense(Lora)),
        Lora.NsfwLevel);

    public LoraStatusOut ToStatus() =>
        new(Lora.Name, ModelName, DeployId, Status, FailReason, Version, Lora.SizeBytes, DownloadedBytes, StalledSince);
}
