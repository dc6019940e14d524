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
    public required string DeployId { get; set; }
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
    /// <summary>SHA-256 of the bytes actually stored (lowercase hex).</summary>
    public string? Sha256 { get; set; }
    public long? SizeBytes { get; set; }
    public string? ProbeJson { get; set; }
    public string? WarningsJson { get; set; }
}

/// <summary>A deployment. The row is also the pipeline's job: claimed with a lease, advanced by status.</summary>
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
    public int RunningInstances { get; set; }
    public int PendingInstances { get; set; }
    public DateTime CreatedAt { get; set; }
    public DateTime UpdatedAt { get; set; }

    // Pipeline bookkeeping.
    public string? LeaseOwner { get; set; }
    public DateTime? LeaseExpiresAt { get; set; }
    public int Attempts { get; set; }
    public long? DownloadId { get; set; }
    public Download? Download { get; set; }
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
