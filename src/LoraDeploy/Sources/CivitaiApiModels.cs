using System.Text.Json;
using System.Text.Json.Serialization;

namespace LoraDeploy.Sources;

// Lenient shapes for CivitAI's JSON (reference §2): every field optional, enums kept as strings,
// because values drift and /models omits empty arrays and false flags.

internal sealed class CivitaiModelDto
{
    public int Id { get; init; }
    public string? Name { get; init; }
    public string? Type { get; init; }
    public string? Mode { get; init; }
    public List<CivitaiVersionDto>? ModelVersions { get; init; }
    /// <summary>A Postgres array literal (<c>"{Image,RentCivit}"</c>), a JSON array or an older single string (reference §2.3).</summary>
    public JsonElement? AllowCommercialUse { get; init; }
    public bool? AllowDerivatives { get; init; }
    public bool? AllowDifferentLicense { get; init; }
    public bool? AllowNoCredit { get; init; }
    public int? NsfwLevel { get; init; }
    public CivitaiCreatorDto? Creator { get; init; }
}

internal sealed class CivitaiCreatorDto
{
    public string? Username { get; init; }
}

internal sealed class CivitaiVersionDto
{
    public int Id { get; init; }
    public int? ModelId { get; init; }
    public int? Index { get; init; }
    public string? Name { get; init; }
    public string? BaseModel { get; init; }
    public string? Status { get; init; }
    public string? Availability { get; init; }
    public List<string>? TrainedWords { get; init; }
    public List<CivitaiFileDto>? Files { get; init; }
    public CivitaiVersionModelDto? Model { get; init; }
    public string? EarlyAccessEndsAt { get; init; }
    public string? EarlyAccessDeadline { get; init; }
    public JsonElement? PaidAccess { get; init; }
}

internal sealed class CivitaiVersionModelDto
{
    public string? Name { get; init; }
    public string? Type { get; init; }
    public string? Mode { get; init; }
}

internal sealed class CivitaiFileDto
{
    public int Id { get; init; }
    public string? Name { get; init; }
    public string? Type { get; init; }
    public double? SizeKB { get; init; }
    public bool? Primary { get; init; }
    public CivitaiFileMetadataDto? Metadata { get; init; }
    public Dictionary<string, string?>? Hashes { get; init; }
    public string? PickleScanResult { get; init; }
    public string? VirusScanResult { get; init; }
}

internal sealed class CivitaiFileMetadataDto
{
    public string? Format { get; init; }
    public string? Size { get; init; }
    public string? Fp { get; init; }
}

[JsonSourceGenerationOptions(JsonSerializerDefaults.Web, NumberHandling = JsonNumberHandling.AllowReadingFromString)]
[JsonSerializable(typeof(CivitaiModelDto))]
[JsonSerializable(typeof(CivitaiVersionDto))]
[JsonSerializable(typeof(JsonElement))]
internal sealed partial class CivitaiJsonContext : JsonSerializerContext;
