using System.Text.Json;
using System.Text.Json.Serialization;

namespace LoraDeploy;

// Wire types. Names match DeepInfra's OpenAPI schema names, which our OpenAPI document reuses.

/// <summary>DeepInfra's error body for every 4xx but validation.</summary>
public sealed record DeepError(string Error);

/// <summary>FastAPI's 422 body.</summary>
public sealed record HTTPValidationError(IReadOnlyList<ValidationError> Detail);

/// <summary>One validation problem; <c>loc</c> items are strings or integers.</summary>
public sealed record ValidationError(IReadOnlyList<object> Loc, string Msg, string Type);

public sealed record SourceModel(string Type, string? CivitUrl = null);

public sealed record CreateLoraApiRequest(string BaseModel, string LoraName, SourceModel Source, bool Private, string? Description = "");

public sealed record UpdateLoraApiRequest(bool? Private, string? Description);

public sealed record DeployInstances(int Running, int Pending);

public sealed record ScaleSettings(int MinInstances = 1, int MaxInstances = 1);

public sealed record DeployLLMUpdateIn(ScaleSettings Settings);

/// <summary>Never filled for LoRA deploys yet (no serving pool); present so the schema is complete.</summary>
public sealed record DeployLLMConfig(string Gpu, int NumGpus, int MaxBatchSize);

public sealed record DeploymentOut(
    string DeployId,
    string ModelName,
    string Version,
    string Task,
    string Status,
    string FailReason,
    string CreatedAt,
    string UpdatedAt,
    DeployInstances? Instances,
    DeployLLMConfig? Config,
    ScaleSettings? Settings,
    string Type = "lora");

/// <summary>DeepInfra's <c>DeployStatusOut</c>/<c>DeployDelete</c>: just the id.</summary>
public sealed record DeployStatusOut(string DeployId);

public sealed record CivitaiInfo(
    int? ModelId,
    int? VersionId,
    int? FileId,
    string? FileName,
    string? BaseModel,
    IReadOnlyList<string> TrainedWords,
    string Url);

/// <summary>Our shape for <c>GET /v1/lora/{lora_name}</c> (DeepInfra leaves it untyped).</summary>
public sealed record LoraOut(
    string LoraName,
    string ModelName,
    string BaseModel,
    SourceModel Source,
    bool Private,
    string Description,
    string DeployId,
    string Status,
    string FailReason,
    string Version,
    long? SizeBytes,
    long DownloadedBytes,
    string? StalledSince,
    CivitaiInfo? Civitai,
    JsonElement? Probe,
    IReadOnlyList<string> Warnings,
    string CreatedAt,
    string UpdatedAt,
    LicenseOut? License = null,
    int? NsfwLevel = null);

/// <summary>A CivitAI model's license terms as recorded with the LoRA (null parts: CivitAI did not say).</summary>
public sealed record LicenseOut(
    IReadOnlyList<string>? AllowCommercialUse,
    bool? AllowDerivatives,
    bool? AllowDifferentLicense,
    bool? AllowNoCredit,
    string? Creator)
{
    public static LicenseOut? From(Sources.CivitaiLicense? license) => license is null
        ? null
        : new(license.AllowCommercialUse, license.AllowDerivatives, license.AllowDifferentLicense, license.AllowNoCredit, license.Creator);
}

/// <summary>What <c>GET /v1/lora/civitai/by-hash/{sha256}</c> found: the CivitAI file with that hash and how to deploy it.</summary>
public sealed record CivitaiLookupOut(
    string Sha256,
    int ModelId,
    string? ModelName,
    int VersionId,
    string? VersionName,
    int FileId,
    string FileName,
    string ModelType,
    string BaseModel,
    IReadOnlyList<string> TrainedWords,
    string CivitUrl,
    LicenseOut? License,
    int? NsfwLevel,
    string? PolicyRefusal);

public sealed record LoraStatusOut(
    string LoraName,
    string ModelName,
    string DeployId,
    string Status,
    string FailReason,
    string Version,
    long? SizeBytes,
    long DownloadedBytes,
    string? StalledSince);

public sealed record LoraDeleteOut(string LoraName, string DeployId);

public sealed record ModelPricingImageUnits(
    double CentsPerImageUnit,
    int DefaultWidth,
    int DefaultHeight,
    int DefaultIterations,
    bool UsageFromCost,
    string Type = "image_units");

public sealed record ModelOut(
    string ModelName,
    string Type,
    string ReportedType,
    string Description,
    string CoverImgUrl,
    IReadOnlyList<string> Tags,
    ModelPricingImageUnits Pricing,
    int Private = 0);

/// <summary>One accepted base model; <c>engine</c> is its serving pool's engine (<c>llamacpp</c> for LLMs, <c>comfyui</c>), null when it is not a pool.</summary>
public sealed record BaseModelOut(string Name, string Family, string Display, string? Engine);

public sealed record HealthOut(string Status);

[JsonSourceGenerationOptions(
    JsonSerializerDefaults.Web,
    PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower,
    DefaultIgnoreCondition = JsonIgnoreCondition.Never)]
[JsonSerializable(typeof(DeepError))]
[JsonSerializable(typeof(HTTPValidationError))]
[JsonSerializable(typeof(CreateLoraApiRequest))]
[JsonSerializable(typeof(UpdateLoraApiRequest))]
[JsonSerializable(typeof(DeployLLMUpdateIn))]
[JsonSerializable(typeof(DeploymentOut))]
[JsonSerializable(typeof(List<DeploymentOut>))]
[JsonSerializable(typeof(DeployStatusOut))]
[JsonSerializable(typeof(LoraOut))]
[JsonSerializable(typeof(List<LoraOut>))]
[JsonSerializable(typeof(LoraStatusOut))]
[JsonSerializable(typeof(CivitaiLookupOut))]
[JsonSerializable(typeof(LoraDeleteOut))]
[JsonSerializable(typeof(List<ModelOut>))]
[JsonSerializable(typeof(List<BaseModelOut>))]
[JsonSerializable(typeof(HealthOut))]
[JsonSerializable(typeof(Exports.ExportLoraRequest))]
[JsonSerializable(typeof(Exports.ExportOut))]
[JsonSerializable(typeof(List<Exports.ExportOut>))]
[JsonSerializable(typeof(Exports.ExportDeleteOut))]
[JsonSerializable(typeof(List<string>))]
[JsonSerializable(typeof(string))]
[JsonSerializable(typeof(int))]
public sealed partial class AppJsonContext : JsonSerializerContext;

/// <summary>DeepInfra's timestamp format: ISO-8601 UTC with an explicit <c>+00:00</c>, whole seconds.</summary>
public static class Timestamps
{
    /// <summary>The format pattern, for callers that format into UTF-8 themselves.</summary>
    public const string Pattern = "yyyy'-'MM'-'dd'T'HH':'mm':'ss'+00:00'";

    public static string Format(DateTime utc) => utc.ToString(Pattern, System.Globalization.CultureInfo.InvariantCulture);
}

/// <summary>The serializer for every response: source-generated, snake_case, readable (no <c>\u0027</c> escapes).</summary>
public static class ApiJson
{
    public static IServiceCollection AddApiJson(this IServiceCollection services) =>
        services.ConfigureHttpJsonOptions(json =>
        {
            json.SerializerOptions.PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower;
            json.SerializerOptions.Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping;
            json.SerializerOptions.TypeInfoResolverChain.Insert(0, Context);
        });

    public static readonly AppJsonContext Context = new(new JsonSerializerOptions(JsonSerializerDefaults.Web)
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
    });
}
