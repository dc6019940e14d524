using System.Diagnostics.CodeAnalysis;

namespace LoraDeploy.Sources;

/// <summary>Short machine-readable failure classes; the sentence in FailReason is for people.</summary>
public static class ReasonClass
{
    public const string InvalidUrl = "invalid_url";
    public const string NotFound = "not_found";
    public const string AuthRequired = "auth_required";
    public const string EarlyAccess = "early_access";
    public const string UnsupportedType = "unsupported_type";
    public const string PickleOnly = "pickle_only";
    public const string Unavailable = "unavailable";
    public const string Flagged = "flagged";
    public const string RateLimited = "rate_limited";
    public const string Upstream = "upstream_error";
    public const string Network = "network";
    public const string Refused = "refused";
    public const string TooLarge = "too_large";
    public const string NotSafetensors = "not_safetensors";
    /// <summary>The bytes that arrived are not the size or SHA-256 the source lists for the file.</summary>
    public const string HashMismatch = "hash_mismatch";
}

/// <summary>The one file a CivitAI reference resolved to.</summary>
public sealed record ResolvedCivitaiFile
{
    public required int ModelId { get; init; }
    public required int VersionId { get; init; }
    public required int FileId { get; init; }
    public required string FileName { get; init; }
    /// <summary>round(sizeKB × 1024); CivitAI's figure is approximate, so use it as a sanity bound only.</summary>
    public required long ListedSizeBytes { get; init; }
    /// <summary>Listed SHA-256, lowercase hex; null when CivitAI lists none.</summary>
    public string? ListedSha256 { get; init; }
    /// <summary>CivitAI's open-ended base model string (e.g. "SDXL 1.0", "Flux.1 D").</summary>
    public required string BaseModel { get; init; }
    public IReadOnlyList<string> TrainedWords { get; init; } = [];
    /// <summary>CivitAI model type: LORA, LoCon or DoRA.</summary>
    public required string ModelType { get; init; }
    public string? ModelName { get; init; }
    public string? VersionName { get; init; }
    /// <summary>CivitAI download endpoint for exactly this file (<c>{BaseUrl}/api/download/models/{vid}?fileId={fid}</c>), without any token.</summary>
    public required Uri DownloadUrl { get; init; }
    /// <summary>The model's license terms, NSFW level and creator; null only in rows written before they were recorded.</summary>
    public CivitaiLicense? License { get; init; }
}

/// <summary>Either a resolved file or a failure with a sentence naming cause and fix.</summary>
public sealed record CivitaiResolveResult
{
    public ResolvedCivitaiFile? File { get; init; }
    public string? FailReason { get; init; }
    public string? ReasonClass { get; init; }

    [MemberNotNullWhen(true, nameof(File))]
    [MemberNotNullWhen(false, nameof(FailReason), nameof(ReasonClass))]
    public bool Succeeded => File is not null;

    public static CivitaiResolveResult Ok(ResolvedCivitaiFile file) => new() { File = file };

    public static CivitaiResolveResult Fail(string reasonClass, string failReason) => new() { ReasonClass = reasonClass, FailReason = failReason };
}

public sealed record DownloadResult(string Sha256, long Bytes);

/// <summary>A download failed for good (after retries and resumes); the staging file may be left for a later resume unless the cause was its content.</summary>
public sealed class DownloadFailedException(string failReason, string reasonClass, Exception? inner = null) : Exception(failReason, inner)
{
    public string FailReason { get; } = failReason;
    public string ReasonClass { get; } = reasonClass;

    /// <summary>The staging bytes are bad (not just incomplete), so the downloader deletes them.</summary>
    internal bool DiscardStaging { get; init; }
}
