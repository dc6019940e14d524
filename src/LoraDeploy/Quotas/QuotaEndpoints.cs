using System.Text.Json;
using System.Text.Json.Serialization;
using LoraDeploy.Auth;
using LoraDeploy.Data;

namespace LoraDeploy.Quotas;

/// <summary><c>GET /v1/me/quota</c>: the caller's limits (null = unlimited) beside what they use now.</summary>
public static class QuotaEndpoints
{
    public static IServiceCollection AddQuotas(this IServiceCollection services)
    {
        services.AddOptions<QuotaOptions>().BindConfiguration(QuotaOptions.Section).ValidateDataAnnotations().ValidateOnStart();
        services.AddSingleton<QuotaGate>();
        return services;
    }

    public static IEndpointRouteBuilder MapQuotas(this IEndpointRouteBuilder app)
    {
        app.MapGet("/v1/me/quota", GetQuota).WithTags("Quotas").RequireAuthorization()
            .WithSummary("Your quotas (null: unlimited) and what you use now")
            .Produces<QuotaOut>();
        return app;
    }

    internal static async Task<IResult> GetQuota(HttpContext http, LoraDeployDbContext db, QuotaGate quotas, CancellationToken ct)
    {
        var user = CurrentUser.From(http.User);
        var limits = quotas.LimitsFor(user.Name);
        var usage = await QuotaGate.UsageAsync(db, user.Id, ct);
        return TypedResults.Json(
            new QuotaOut(limits.MaxDeploys, usage.Deploys, limits.MaxStoredBytes, usage.StoredBytes, limits.MaxConcurrentImports, usage.ConcurrentImports),
            QuotaJson.Context.QuotaOut);
    }
}

public sealed record QuotaOut(int? MaxDeploys, long Deploys, long? MaxStoredBytes, long StoredBytes, int? MaxConcurrentImports, long ConcurrentImports);

[JsonSourceGenerationOptions(
    JsonSerializerDefaults.Web,
    PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower,
    DefaultIgnoreCondition = JsonIgnoreCondition.Never)]
[JsonSerializable(typeof(QuotaOut))]
public sealed partial class QuotaJsonContext : JsonSerializerContext;

/// <summary>The quota route's serializer, configured like <see cref="ApiJson"/> (snake_case, readable).</summary>
internal static class QuotaJson
{
    public static readonly QuotaJsonContext Context = new(new JsonSerializerOptions(JsonSerializerDefaults.Web)
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
    });
}
