namespace LoraDeploy.Data;

public sealed class User
{
    public long Id { get; set; }
    public required string Name { get; set; }
    public bool IsAdmin { get; set; }
    public DateTime CreatedAt { get; set; }
}

/// <summary>An API token. The secret is never stored: only its SHA-256, compared in constant time.</summary>
public sealed class ApiToken
{
    /// <summary>The public part of the token (<c>ld_{Id}_{secret}</c>), used to find the row.</summary>
    public required string Id { get; set; }
    public long UserId { get; set; }
    public User? User { get; set; }
    public required byte[] SecretHash { get; set; }
    public string? Label { get; set; }
    public DateTime CreatedAt { get; set; }
    /// <summary>After this instant the token is refused (checked on every request); null: it never expires.</summary>
    public DateTime? ExpiresAt { get; set; }
}

/// <summary>
/// A worker's credential: its own kind, so a worker token opens no user route and a user token no worker route.
/// Stored like an API token (SHA-256 of the secret, compared in constant time).
/// </summary>
public sealed class WorkerToken
{
    /// <summary>The public part of the token (<c>ldw_{Id}_{secret}</c>), used to find the row.</summary>
    public required string Id { get; set; }
    /// <summary>The worker's name (<c>token create --worker NAME</c>), unique.</summary>
    public required string Name { get; set; }
    public required byte[] SecretHash { get; set; }
    public DateTime CreatedAt { get; set; }
}

public sealed class Lora
{
    public long Id { get; set; }
    public long UserId { get; set; }
    public User? User { get; set; }
    public required string Name { get; set; }
    public required string BaseModel { get; set; }
    public required string SourceType { get; set; }
    /// <summary>The pasted URL with any <c>token</c> removed.</summary>
    public required string SourceUrl { get; set; }
    public bool Private { get; set; }
    public string Description { get; set; } = "";
    public bool Deleted { get; set; }
    public DateTime CreatedAt { get; set; }
    public DateTime UpdatedAt { get; set; }

    // Filled by the import pipeline once CivitAI resolves the exact file.
    public int? CivitaiModelId { get; set; }
    public int? CivitaiVersionId { get; set; }
    public int? CivitaiFileId { get; set; }
    public string? FileName { get; set; }
    public string? CivitaiBaseModel { get; set; }
    public string? TrainedWordsJson { get; set; }
    /// <summary>SHA-256 CivitAI lists for the file (lowercase hex).</summary>
    public string? ExpectedSha256 { get; set; }
    /// <summary>The stored, probed adapter (its SHA-256), once the import verified it; null until then.</summary>
    public string? AdapterSha256 { get; set; }
    public Adapter? Adapter { get; set; }
    public long? SizeBytes { get; set; }
    /// <summary>Warnings about this adapter on this LoRA's base model (JSON list of sentences).</summary>
    public string? WarningsJson { get; set; }

    // The CivitAI model's license terms, NSFW level and creator when it was resolved; the policy is checked against them.
    /// <summary>CivitAI's commercial-use permissions, normalised (JSON list such as <c>["Image","RentCivit"]</c>; <c>[]</c> for none).</summary>
    public string? AllowCommercialUseJson { get; set; }
    public bool? AllowDerivatives { get; set; }
    public bool? AllowDifferentLicense { get; set; }
    public bool? AllowNoCredit { get; set; }
    /// <summary>The model's NSFW level: an OR of CivitAI's flags (PG=1 … XXX=16, Blocked=32).</summary>
    public int? NsfwLevel { get; set; }
    public string? CivitaiCreator { get; set; }
}

/// <summary>
/// A verified adapter file: the bytes (by SHA-256, a blob) and what the prober learned, as columns routing and
/// validation can use. Shared by every LoRA that points at the same bytes, whoever imported them.
/// </summary>
public sealed class Adapter
{
    public required string Sha256 { get; set; }
    public long SizeBytes { get; set; }
    /// <summary>Key layout (kohya, diffusers, peft, …).</summary>
    public required string Format { get; set; }
    /// <summary>Network type (lora, locon, loha, lokr, …).</summary>
    public required string Network { get; set; }
    /// <summary>Architecture id from the keys (sdxl, flux1, sd1, …).</summary>
    public required string Architecture { get; set; }
    public int? RankMin { get; set; }
    public int? RankMax { get; set; }
    public double? Alpha { get; set; }
    /// <summary>The whole probe report (JSON), for display.</summary>
    public required string ProbeJson { get; set; }
    /// <summary>Where the bytes were first found (<c>civitai</c>, <c>huggingface</c>) and the reference there.</summary>
    public required string SourceType { get; set; }
    public required string SourceRef { get; set; }
    /// <summary>For an adapter converted from another (a PEFT adapter → llama.cpp GGUF): what it was made from and how
    /// (<c>peft-gguf:v{converter}:{weights sha}:{config sha}</c>), so the same conversion is never done twice.</summary>
    public string? DerivedKey { get; set; }
    public DateTime CreatedAt { get; set; }
}

/// <summary>
/// A deployment: the desired state (status, settings, pool = its LoRA's base model). The import is its own job
/// (<see cref="ImportJob"/>) and the serving capacity its own observed state (<see cref="Instance"/>); the
/// status and instance counts here mirror both, as the user sees them.
/// </summary>
public sealed class Deploy
{
    public required string Id { get; set; }
    public long UserId { get; set; }
    public long LoraId { get; set; }
    public Lora? Lora { get; set; }
    public required string ModelName { get; set; }
    public string Type { get; set; } = "lora";
    public string Task { get; set; } = "text-to-image";
    public string Status { get; set; } = DeployStatus.Initializing;
    public string FailReason { get; set; } = "";
    /// <summary>Short machine class of the failure (metrics, docs), empty unless failed.</summary>
    public string FailClass { get; set; } = "";
    public string Version { get; set; } = "";
    public int MinInstances { get; set; } = 1;
    public int MaxInstances { get; set; } = 1;
    /// <summary>Instances ready with the adapter (a summary of <see cref="Instance"/> rows, kept by the placer).</summary>
    public int RunningInstances { get; set; }
    /// <summary>Instances loading it, or wanted while no worker can take them.</summary>
    public int PendingInstances { get; set; }
    public DateTime CreatedAt { get; set; }
    public DateTime UpdatedAt { get; set; }
}

/// <summary>
/// The import of one deploy's adapter, owned by the pipeline: claimed with a lease, advanced by its own status, so a
/// failed import can be retried (requeued) without touching the deploy's identity. The deploy mirrors what a user sees.
/// </summary>
public sealed class ImportJob
{
    public long Id { get; set; }
    public required string DeployId { get; set; }
    public Deploy? Deploy { get; set; }
    public string Status { get; set; } = ImportJobStatus.Queued;
    public string? LeaseOwner { get; set; }
    public DateTime? LeaseExpiresAt { get; set; }
    public int Attempts { get; set; }
    /// <summary>The shared download this job waits on, once resolved.</summary>
    public long? DownloadId { get; set; }
    public Download? Download { get; set; }
    public DateTime CreatedAt { get; set; }
    public DateTime UpdatedAt { get; set; }
}

public static class ImportJobStatus
{
    /// <summary>Waiting to be resolved (the deploy shows <c>initializing</c>).</summary>
    public const string Queued = "queued";
    /// <summary>Claimed: resolving at the source, then waiting on its download (the deploy shows <c>downloading</c>).</summary>
    public const string Importing = "importing";
    /// <summary>Stored, verified and probed (the deploy moved on to <c>deploying</c>).</summary>
    public const string Done = "done";
    /// <summary>Failed for good, or abandoned because the deploy was deleted; a start requeues it.</summary>
    public const string Ended = "ended";
}

/// <summary>
/// An export: one LoRA's adapter merged into its pool's base weights on this host, as a downloadable file. The row is
/// the job: claimed with a lease by an export runner, so a crashed runner's job is taken up again once the lease lapses.
/// </summary>
public sealed class ExportJob
{
    public required string Id { get; set; }
    public long UserId { get; set; }
    public long LoraId { get; set; }
    public Lora? Lora { get; set; }
    public required string DeployId { get; set; }
    /// <summary>The adapter merged (its blob), fixed when the export was asked for.</summary>
    public required string AdapterSha256 { get; set; }
    public required string BaseModel { get; set; }
    /// <summary>The file written: <c>safetensors</c>, or <c>gguf</c> for a llama.cpp pool.</summary>
    public required string Format { get; set; }
    /// <summary>dtype of the merged float tensors: <c>f16</c>, <c>bf16</c>, <c>f32</c>, or <c>base</c> (each keeps the base's).</summary>
    public required string Dtype { get; set; }
    public double Strength { get; set; } = 1.0;
    public string Status { get; set; } = ExportJobStatus.Queued;
    public string? LeaseOwner { get; set; }
    public DateTime? LeaseExpiresAt { get; set; }
    public int Attempts { get; set; }
    public int TensorsDone { get; set; }
    public int TensorsTotal { get; set; }
    public long BytesDone { get; set; }
    public long BytesTotal { get; set; }
    public long? OutputBytes { get; set; }
    public string? OutputSha256 { get; set; }
    public string FailReason { get; set; } = "";
    public DateTime CreatedAt { get; set; }
    public DateTime? StartedAt { get; set; }
    public DateTime? FinishedAt { get; set; }
}

public static class ExportJobStatus
{
    public const string Queued = "queued";
    public const string Running = "running";
    public const string Done = "done";
    public const string Failed = "failed";
}

/// <summary>A worker process serving one engine's pools: registered and heartbeating through the database.</summary>
public sealed class Worker
{
    public required string Id { get; set; }
    /// <summary>The worker token's name (<c>token create --worker NAME</c>).</summary>
    public required string Name { get; set; }
    public required string Engine { get; set; }
    /// <summary>Pools (base model names) it serves, JSON list.</summary>
    public required string PoolsJson { get; set; }
    public int Slots { get; set; }
    /// <summary>Where the server sends inference requests.</summary>
    public required string Url { get; set; }
    public required string Version { get; set; }
    /// <summary>The secret the server presents when it calls this worker, chosen by the worker at registration.</summary>
    public required string CallKey { get; set; }
    public int QueueDepth { get; set; }
    public int BusySlots { get; set; }
    /// <summary>Adapters ready on it (JSON list of <c>pool|sha256</c>), pinned or cached: what routing prefers.</summary>
    public string ResidentJson { get; set; } = "[]";
    public DateTime RegisteredAt { get; set; }
    public DateTime LastHeartbeatAt { get; set; }
}

/// <summary>Observed state: one worker holding (or loading, or refusing) one deploy's adapter.</summary>
public sealed class Instance
{
    public long Id { get; set; }
    public required string DeployId { get; set; }
    public required string WorkerId { get; set; }
    public Worker? Worker { get; set; }
    public required string AdapterSha256 { get; set; }
    public string State { get; set; } = InstanceState.Loading;
    /// <summary>Kept by the placer for <c>min_instances</c>: never evicted by the worker's LRU.</summary>
    public bool Pinned { get; set; }
    /// <summary>The engine's reason when <see cref="State"/> is failed.</summary>
    public string FailReason { get; set; } = "";
    public DateTime Since { get; set; }
}

public static class InstanceState
{
    public const string Loading = "loading";
    public const string Ready = "ready";
    public const string Failed = "failed";
}

/// <summary>
/// One fetch of one file, shared by every deploy waiting on it (single-flight through the unique
/// <see cref="SourceKey"/>: <c>sha256:{listed hash}</c>, or <c>civitai:file:{id}</c> when CivitAI lists no hash).
/// Claimed with a lease like a deploy.
/// </summary>
public sealed class Download
{
    public long Id { get; set; }
    public required string SourceKey { get; set; }
    public string Status { get; set; } = DownloadStatus.Pending;
    public int CivitaiVersionId { get; set; }
    public int CivitaiFileId { get; set; }
    public string? ExpectedSha256 { get; set; }
    public long? SizeBytes { get; set; }
    public long BytesDone { get; set; }
    /// <summary>The resolved file as JSON, so any replica can resume the fetch.</summary>
    public string? ResolvedJson { get; set; }
    public string? BlobSha256 { get; set; }
    public string FailReason { get; set; } = "";
    public string FailClass { get; set; } = "";
    public string? LeaseOwner { get; set; }
    public DateTime? LeaseExpiresAt { get; set; }
    public int Attempts { get; set; }
    /// <summary>When the first worker began fetching; Pipeline:DownloadDeadline counts from here, across restarts.</summary>
    public DateTime? StartedAt { get; set; }
    /// <summary>Since when no byte has arrived, once that lasted Pipeline:StalledAfter; null while bytes flow.</summary>
    public DateTime? StalledSince { get; set; }
    /// <summary>The replica (lease owner name) that finished the fetch and stored the blob.</summary>
    public string? FetchedBy { get; set; }
    public DateTime CreatedAt { get; set; }
    public DateTime UpdatedAt { get; set; }
}

/// <summary>A stored, verified file in the content-addressed blob store.</summary>
public sealed class Blob
{
    public required string Sha256 { get; set; }
    public long SizeBytes { get; set; }
    public DateTime CreatedAt { get; set; }
}

public sealed class IdempotencyRecord
{
    public long UserId { get; set; }
    public required string Key { get; set; }
    public required string RequestHash { get; set; }
    public required string DeployId { get; set; }
    public DateTime CreatedAt { get; set; }
}

/// <summary>
/// One user's claimed requests in one fixed minute of the management-route rate limit. The row is the budget every
/// replica shares; <c>Window</c> is the minute's number since the Unix epoch, so rows of past minutes are easy to drop.
/// </summary>
public sealed class RateLimitWindow
{
    public long UserId { get; set; }
    public long Window { get; set; }
    /// <summary>Permits claimed so far (used, or held by a replica to hand out); never above the limit.</summary>
    public int Count { get; set; }
    /// <summary>The size of the last claim: what the upsert hands back to the replica that made it.</summary>
    public int Claimed { get; set; }
}

public static class DeployStatus
{
    public const string Initializing = "initializing";
    public const string Downloading = "downloading";
    public const string Deploying = "deploying";
    public const string Running = "running";
    public const string Stopped = "stopped";
    public const string Failed = "failed";
    public const string Deleted = "deleted";

    public static readonly IReadOnlyList<string> All =
        [Initializing, Downloading, Deploying, Running, Stopped, Failed, Deleted];
}

public static class DownloadStatus
{
    public const string Pending = "pending";
    public const string Downloading = "downloading";
    public const string Done = "done";
    public const string Failed = "failed";
    public const string Cancelled = "cancelled";
}

/// <summary>
/// One line of the append-only audit log: who did what to which object, and when. Names are copied, not joined, so a
/// line still reads right after its user or token is deleted. Never holds a secret.
/// </summary>
public sealed class AuditEntry
{
    public long Id { get; set; }
    public DateTime At { get; set; }
    public long? UserId { get; set; }
    public string? UserName { get; set; }
    public string? TokenId { get; set; }
    public string? TokenLabel { get; set; }
    public string? Ip { get; set; }
    public required string Action { get; set; }
    public required string ObjectType { get; set; }
    public string? ObjectId { get; set; }
    public string Detail { get; set; } = "";
}

public static class AuditEntryLimits
{
    public const int DetailLength = 500;
}
