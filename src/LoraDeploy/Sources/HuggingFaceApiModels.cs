using System.Text.Json;
using System.Text.Json.Serialization;

namespace LoraDeploy.Sources;

// Lenient shapes for the Hub's /api/models answer (reference huggingface-hub.md § Endpoints): every field optional,
// `gated` and `cardData` kept as raw JSON because their types vary (false | "auto" | "manual"; free-form YAML).

internal sealed class HuggingFaceModelInfoDto
{
    public string? Id { get; init; }
    public string? Sha { get; init; }
    public bool? Private { get; init; }
    public JsonElement? Gated { get; init; }
    public List<HuggingFaceSiblingDto>? Siblings { get; init; }
    public JsonElement? CardData { get; init; }
    public List<string>? Tags { get; init; }

    [JsonPropertyName("library_name")]
    public string? LibraryName { get; init; }

    [JsonPropertyName("pipeline_tag")]
    public string? PipelineTag { get; init; }
}

internal sealed class HuggingFaceSiblingDto
{
    public string? Rfilename { get; init; }
    public long? Size { get; init; }
    public string? BlobId { get; init; }
    public HuggingFaceLfsDto? Lfs { get; init; }
}

internal sealed class HuggingFaceLfsDto
{
    public string? Sha256 { get; init; }
    public long? Size { get; init; }
    public long? PointerSize { get; init; }
}

[JsonSourceGenerationOptions(JsonSerializerDefaults.Web)]
[JsonSerializable(typeof(HuggingFaceModelInfoDto))]
[JsonSerializable(typeof(JsonElement))]
internal sealed partial class HuggingFaceJsonContext : JsonSerializerContext;
