using System.Text.Json.Serialization;

namespace LoraDeploy.Lora;

/// <summary>
/// What <see cref="LoraProber"/> learned about a safetensors file: whether it is a LoRA-family adapter,
/// what it targets, and whether a text-to-image server could apply it. Serialise with
/// <see cref="ProbeJsonContext"/> (snake_case names; see docs/inspect-json.md).
/// </summary>
public sealed record ProbeReport
{
    /// <summary>Key layout: kohya, onetrainer, diffusers, peft, bfl, native, xlabs, lycoris, or unknown.</summary>
    public required string Format { get; init; }

    /// <summary>Adapter type: lora, locon, loha, lokr, dora, ia3, glora, oft, full, norm, control-lora, lllite, or none.</summary>
    public required string Network { get; init; }

    /// <summary>Architecture id (see <see cref="ArchitectureFamilies"/>), decided from keys and shapes.</summary>
    public required string Architecture { get; init; }

    /// <summary>Display name of <see cref="Architecture"/>.</summary>
    public required string ArchitectureDisplay { get; init; }

    /// <summary>Adapted components: unet or transformer, text_encoder_1/2/3.</summary>
    public required IReadOnlyList<string> Targets { get; init; }

    /// <summary>Number of adapted modules (layers).</summary>
    public required int ModuleCount { get; init; }

    /// <summary>Number of tensors in the file.</summary>
    public required int TensorCount { get; init; }

    /// <summary>Smallest module rank, when ranks apply.</summary>
    public int? RankMin { get; init; }

    /// <summary>Largest module rank, when ranks apply.</summary>
    public int? RankMax { get; init; }

    /// <summary>The alpha shared by every module, when uniform and known.</summary>
    public double? Alpha { get; init; }

    /// <summary>Effective alpha/rank multiplier at strength 1, when uniform across modules.</summary>
    public double? Scale { get; init; }

    /// <summary>Element types of the tensors, sorted.</summary>
    public required IReadOnlyList<string> Dtypes { get; init; }

    /// <summary>Total number of elements over all tensors.</summary>
    public required long ParameterCount { get; init; }

    /// <summary>Trigger words from <c>modelspec.trigger_phrase</c> and kohya dataset folder names.</summary>
    public required IReadOnlyList<string> TriggerWords { get; init; }

    /// <summary>Most frequent training-caption tags from <c>ss_tag_frequency</c>.</summary>
    public required IReadOnlyList<TagCount> TopTags { get; init; }

    /// <summary><c>ss_base_model_version</c> or <c>modelspec.architecture</c>, as written by the trainer (a hint only).</summary>
    public string? BaseModelVersion { get; init; }

    /// <summary>Selected metadata worth showing (<c>modelspec.*</c>, output name, training info), values truncated.</summary>
    public required IReadOnlyDictionary<string, string> Metadata { get; init; }

    /// <summary>True for a LoRA-family adapter; false for full checkpoints, ControlNet-LLLite, Control-LoRA, or unrecognised files.</summary>
    public required bool IsAdapter { get; init; }

    /// <summary>Whether a text-to-image server could apply this file as a LoRA to a model of <see cref="Architecture"/>.</summary>
    public required bool Applicable { get; init; }

    /// <summary>Why <see cref="Applicable"/> is false; null when applicable.</summary>
    public string? NotApplicableReason { get; init; }

    /// <summary>Things worth knowing, one sentence each.</summary>
    public required IReadOnlyList<string> Warnings { get; init; }

    /// <summary>Lower-case hex SHA-256 of the whole file; only filled when asked for.</summary>
    public string? FileSha256 { get; init; }

    /// <summary>Lower-case hex SHA-256 of the data section (what <c>sshs_model_hash</c> and <c>modelspec.hash_sha256</c> hold); only filled when asked for.</summary>
    public string? DataSha256 { get; init; }
}

/// <summary>A caption tag and how often it occurred in the training set.</summary>
public sealed record TagCount(string Tag, int Count);

/// <summary>Source-generated JSON metadata for <see cref="ProbeReport"/> (snake_case, indented, nulls kept).</summary>
[JsonSourceGenerationOptions(
    PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower,
    WriteIndented = true)]
[JsonSerializable(typeof(ProbeReport))]
public sealed partial class ProbeJsonContext : JsonSerializerContext;
