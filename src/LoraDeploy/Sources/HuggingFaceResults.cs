using System.Diagnostics.CodeAnalysis;

namespace LoraDeploy.Sources;

/// <summary>One file of a Hugging Face repo, pinned to a commit. Holds no token: safe to store and log.</summary>
public sealed record HuggingFaceRepoFile
{
    /// <summary><c>owner/repo</c>.</summary>
    public required string RepoId { get; init; }
    /// <summary>The 40-hex commit every file of one import comes from.</summary>
    public required string Commit { get; init; }
    /// <summary>Path in the repo, e.g. <c>adapter_model.safetensors</c>.</summary>
    public required string Path { get; init; }
    /// <summary>Exact size the Hub lists (the LFS object's size for LFS files).</summary>
    public required long SizeBytes { get; init; }
    /// <summary>The LFS object's SHA-256, lowercase hex; null for a file kept in git itself (not LFS).</summary>
    public string? Sha256 { get; init; }
    /// <summary>The git blob id (SHA-1 of the git object) of a file kept in git; for an LFS file, of its pointer.</summary>
    public string? GitBlobId { get; init; }
    /// <summary><c>{HuggingFace:BaseUrl}/{owner}/{repo}/resolve/{commit}/{path}</c>.</summary>
    public required Uri DownloadUrl { get; init; }
}

/// <summary>A PEFT adapter repo resolved to one commit: its config and its safetensors weights.</summary>
public sealed record ResolvedHuggingFaceAdapter
{
    public required string RepoId { get; init; }
    /// <summary>The revision asked for; null for the default branch.</summary>
    public string? Revision { get; init; }
    public required string Commit { get; init; }
    public bool IsPrivate { get; init; }
    /// <summary>null when not gated, else the Hub's gating mode (<c>auto</c> or <c>manual</c>).</summary>
    public string? Gated { get; init; }
    /// <summary>The model card's <c>base_model</c> (its first entry when it lists several), if any.</summary>
    public string? CardBaseModel { get; init; }
    /// <summary><c>adapter_config.json</c> (small; fetch it with <see cref="HuggingFaceClient.FetchConfigAsync"/>).</summary>
    public required HuggingFaceRepoFile Config { get; init; }
    /// <summary><c>adapter_model.safetensors</c> (download it with <see cref="HuggingFaceDownloader.DownloadAsync"/>).</summary>
    public required HuggingFaceRepoFile Weights { get; init; }
}

/// <summary>Either a resolved adapter or a failure with a sentence naming cause and fix.</summary>
public sealed record HuggingFaceResolveResult
{
    public ResolvedHuggingFaceAdapter? Adapter { get; init; }
    public string? FailReason { get; init; }
    public string? ReasonClass { get; init; }

    [MemberNotNullWhen(true, nameof(Adapter))]
    [MemberNotNullWhen(false, nameof(FailReason), nameof(ReasonClass))]
    public bool Succeeded => Adapter is not null;

    public static HuggingFaceResolveResult Ok(ResolvedHuggingFaceAdapter adapter) => new() { Adapter = adapter };

    public static HuggingFaceResolveResult Fail(string reasonClass, string failReason) => new() { ReasonClass = reasonClass, FailReason = failReason };
}

/// <summary>The bytes of a repo's <c>adapter_config.json</c> (a JSON object, at most <see cref="HuggingFaceClient.MaxConfigBytes"/>), or why not.</summary>
public sealed record HuggingFaceConfigResult
{
    public byte[]? Bytes { get; init; }
    public string? FailReason { get; init; }
    public string? ReasonClass { get; init; }

    [MemberNotNullWhen(true, nameof(Bytes))]
    [MemberNotNullWhen(false, nameof(FailReason), nameof(ReasonClass))]
    public bool Succeeded => Bytes is not null;

    public static HuggingFaceConfigResult Ok(byte[] bytes) => new() { Bytes = bytes };

    public static HuggingFaceConfigResult Fail(string reasonClass, string failReason) => new() { ReasonClass = reasonClass, FailReason = failReason };
}
