using System.Text.Json;
using System.Text.Json.Serialization;
using LoraDeploy.Auth;
using LoraDeploy.Workers;
using Microsoft.AspNetCore.Http.HttpResults;
using Microsoft.Extensions.Options;

namespace LoraDeploy.RateLimits;

public static class RateLimitEndpoints
{
    /// <summary>
    /// The rate limiter and the settings behind it. The policy is applied where routes are mapped
    /// (<see cref="ManagementRateLimitPolicy.Name"/>); <c>UseRateLimiter</c> runs after authentication to see the user.
    /// </summary>
    public static IServiceCollection AddRateLimits(this IServiceCollection services)
    {
        services.AddOptions<RateLimitOptions>().BindConfiguration(RateLimitOptions.Section).ValidateDataAnnotations().ValidateOnStart();
        services.AddSingleton<RateLimitCounter>();
        services.AddSingleton<ManagementRateLimitPolicy>();
        services.AddRateLimiter(limiter =>
        {
            limiter.RejectionStatusCode = StatusCodes.Status429TooManyRequests;
            limiter.AddPolicy<long, ManagementRateLimitPolicy>(ManagementRateLimitPolicy.Name);
        });
        return services;
    }

    public static IEndpointRouteBuilder MapRateLimits(this IEndpointRouteBuilder app)
    {
        // Not counted against the budget it reports: a client checking how much it has left should not spend it. It is
        // one indexed read of one row.
        app.MapGet("/v1/me/rate_limit", GetRateLimitAsync).WithTags("Rate limits").RequireAuthorization().DisableRateLimiting()
            .WithSummary("Your limits: inference concurrency per model pool, and the management API's requests per minute");
        return app;
    }

    internal static async Task<JsonHttpResult<RateLimitOut>> GetRateLimitAsync(
        HttpContext http, ManagementRateLimitPolicy policy, RateLimitCounter counter, IOptions<WorkersOptions> workers, CancellationToken ct)
    {
        var user = CurrentUser.From(http.User);
        // DeepInfra's rate_limit is the outstanding requests a model takes: ours is the per-pool limit of each replica.
        // There is no tokens-per-minute limit here; 0 says so.
        var inference = workers.Value.MaxOutstandingPerPool;
        if (!policy.Enabled)
        {
            return TypedResults.Json(new RateLimitOut(inference, 0, null, null, null), RateLimitJson.Context.RateLimitOut);
        }
        var limit = policy.LimitFor(user.Name);
        var (used, resetAfter) = await counter.ReadAsync(user.Id, ct);
        return TypedResults.Json(
            new RateLimitOut(inference, 0, limit, Math.Max(0, limit - used), Math.Max(1, (int)Math.Ceiling(resetAfter.TotalSeconds))),
            RateLimitJson.Context.RateLimitOut);
    }
}

/// <summary>
/// <c>GET /v1/me/rate_limit</c>: DeepInfra's two fields, then ours for the management API (null when limits are off).
/// </summary>
public sealed record RateLimitOut(int RateLimit, int TpmRateLimit, int? RequestsPerMinute, int? Remaining, int? ResetSeconds);

[JsonSourceGenerationOptions(
    JsonSerializerDefaults.Web,
    PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower,
    DefaultIgnoreCondition = JsonIgnoreCondition.Never)]
[JsonSerializable(typeof(RateLimitOut))]
public sealed partial class RateLimitJsonContext : JsonSerializerContext;

internal static class RateLimitJson
{
    public static readonly RateLimitJsonContext Context = new(new JsonSerializerOptions(JsonSerializerDefaults.Web)
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
    });
}
