using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization;
using LoraDeploy.Audit;
using LoraDeploy.Data;
using LoraDeploy.Loras;
using LoraDeploy.OpenApi;
using LoraDeploy.Validation;
using Microsoft.AspNetCore.Http.HttpResults;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Caching.Memory;

namespace LoraDeploy.Auth;

/// <summary>
/// A user's own API tokens (<c>/v1/me/tokens</c>) and, for admins, users with their first token (<c>/v1/admin/users</c>).
/// A token's secret is in the create answer only; lists show ids, labels and times. Revoking deletes the row.
/// </summary>
public static class TokenEndpoints
{
    public const int MaxLabelLength = 100;
    public const int MaxExpiresInDays = 3650;

    public static IEndpointRouteBuilder MapTokens(this IEndpointRouteBuilder app)
    {
        var me = app.MapGroup("/v1/me/tokens").WithTags("Tokens").RequireAuthorization();
        me.MapPost("", CreateToken)
            .WithSummary("Create an API token for yourself (the token is in this answer only)")
            .WithRequestBody<TokenCreateIn>()
            .Produces<TokenCreatedOut>()
            .Produces<HTTPValidationError>(StatusCodes.Status422UnprocessableEntity);
        me.MapGet("", ListTokens).WithSummary("Your API tokens (never their secrets)");
        me.MapDelete("/{token_id}", RevokeToken).WithSummary("Revoke one of your tokens: refused from the next request on")
            .Audited(AuditLog.Actions.TokenRevoke, "token", "token_id");

        var admin = app.MapGroup("/v1/admin/users").WithTags("Tokens")
            .RequireAuthorization(policy => policy.RequireRole("admin"));
        admin.MapPost("", CreateUser)
            .WithSummary("Create a user and its first API token (admins; the token is in this answer only)")
            .WithRequestBody<UserCreateIn>()
            .Produces<UserCreatedOut>()
            .Produces<DeepError>(StatusCodes.Status409Conflict)
            .Produces<HTTPValidationError>(StatusCodes.Status422UnprocessableEntity);
        admin.MapGet("", ListUsers).WithSummary("Users with their token counts (admins)");
        return app;
    }

    internal static async Task<IResult> CreateToken(
        HttpContext http, LoraDeployDbContext db, TimeProvider time, AuditLog audit, CancellationToken ct)
    {
        var (body, error) = await RequestBody.ReadObjectAsync(http.Request, ct);
        if (body is not { } json)
        {
            return error!;
        }
        var now = time.GetUtcNow().UtcDateTime;
        var errors = new ValidationErrors();
        var label = ReadLabel(json, errors);
        var expiresAt = ReadExpiry(json, now, errors);
        if (errors.Any)
        {
            return errors.ToResult();
        }
        var user = CurrentUser.From(http.User);
        var token = await ApiTokens.CreateAsync(db, user.Id, label, now, ct, expiresAt);
        await audit.RecordAsync(http, AuditLog.Actions.TokenCreate, "token", ApiTokens.IdOf(token), label is null ? "" : $"label {label}");
        return TypedResults.Json(Created(token, label, now, expiresAt), TokenJson.Context.TokenCreatedOut);
    }

    internal static async Task<JsonHttpResult<List<TokenOut>>> ListTokens(HttpContext http, LoraDeployDbContext db, CancellationToken ct)
    {
        var user = CurrentUser.From(http.User);
        var current = CurrentUser.TokenId(http.User);
        var rows = await db.ApiTokens.Where(t => t.UserId == user.Id)
            .OrderByDescending(t => t.CreatedAt).ThenBy(t => t.Id)
            .Select(t => new { t.Id, t.Label, t.CreatedAt, t.ExpiresAt })
            .ToListAsync(ct);
        var tokens = rows.Select(t => new TokenOut(t.Id, t.Label, Timestamps.Format(t.CreatedAt), Format(t.ExpiresAt), t.Id == current))
            .ToList();
        return TypedResults.Json(tokens, TokenJson.Context.ListTokenOut);
    }

    internal static async Task<Results<NoContent, NotFound<DeepError>>> RevokeToken(
        string token_id, HttpContext http, LoraDeployDbContext db, IMemoryCache cache, CancellationToken ct)
    {
        var user = CurrentUser.From(http.User);
        // Another user's token id is answered like one that does not exist: it is not this caller's to know about.
        var deleted = await db.ApiTokens.Where(t => t.Id == token_id && t.UserId == user.Id).ExecuteDeleteAsync(ct);
        if (deleted == 0)
        {
            return ApiErrors.NotFound($"You have no token '{token_id}'.");
        }
        TokenAuthenticationHandler.Forget(cache, token_id);
        return TypedResults.NoContent();
    }

    internal static async Task<IResult> CreateUser(
        HttpContext http, LoraDeployDbContext db, TimeProvider time, AuditLog audit, CancellationToken ct)
    {
        var (body, error) = await RequestBody.ReadObjectAsync(http.Request, ct);
        if (body is not { } json)
        {
            return error!;
        }
        var errors = new ValidationErrors();
        var name = errors.String(json, "name", ["body", "name"], required: true);
        if (name is not null && !LoraNames.IsValid(name))
        {
            errors.Add(["body", "name"],
                "Value error, name must be 1-64 of letters, digits, '.', '_', '-', starting with a letter or digit", "value_error");
        }
        var isAdmin = errors.Bool(json, "admin", ["body", "admin"], required: false, nullable: true) ?? false;
        if (errors.Any)
        {
            return errors.ToResult();
        }

        if (await db.Users.AnyAsync(u => u.Name == name, ct))
        {
            return NameTaken(name!);
        }
        var now = time.GetUtcNow().UtcDateTime;
        var user = new User { Name = name!, IsAdmin = isAdmin, CreatedAt = now };
        const string label = "first token";
        string token;
        // One transaction: a user is never left without the token that was to be shown for it.
        await using (var transaction = await db.Database.BeginTransactionAsync(ct))
        {
            db.Users.Add(user);
            try
            {
                await db.SaveChangesAsync(ct);
            }
            catch (DbUpdateException e) when (db.IsUniqueViolation(e))
            {
                return NameTaken(name!); // created by a concurrent request since the check above
            }
            token = await ApiTokens.CreateAsync(db, user.Id, label, now, ct);
            await transaction.CommitAsync(ct);
        }
        await audit.RecordAsync(http, AuditLog.Actions.UserCreate, "user", user.Name, isAdmin ? "admin" : "");
        return TypedResults.Json(
            new UserCreatedOut(user.Name, user.IsAdmin, Timestamps.Format(now), Created(token, label, now, null)),
            TokenJson.Context.UserCreatedOut);
    }

    internal static async Task<JsonHttpResult<List<UserOut>>> ListUsers(LoraDeployDbContext db, CancellationToken ct)
    {
        var rows = await db.Users.OrderBy(u => u.Name)
            .Select(u => new { u.Name, u.IsAdmin, u.CreatedAt, Tokens = db.ApiTokens.Count(t => t.UserId == u.Id) })
            .ToListAsync(ct);
        return TypedResults.Json(rows.Select(u => new UserOut(u.Name, u.IsAdmin, Timestamps.Format(u.CreatedAt), u.Tokens)).ToList(),
            TokenJson.Context.ListUserOut);
    }

    private static Conflict<DeepError> NameTaken(string name) => ApiErrors.Conflict($"A user named '{name}' already exists.");

    private static string? ReadLabel(JsonElement json, ValidationErrors errors)
    {
        var label = errors.String(json, "label", ["body", "label"], required: false, nullable: true);
        if (label is null)
        {
            return null;
        }
        label = label.Trim();
        if (label.Length > MaxLabelLength)
        {
            errors.Add(["body", "label"], $"String should have at most {MaxLabelLength} characters", "string_too_long");
            return null;
        }
        return label.Length == 0 ? null : label;
    }

    /// <summary><c>expires_in_days</c> (1–3650) or <c>expires_at</c> (an ISO time in the future), not both; neither: never.</summary>
    private static DateTime? ReadExpiry(JsonElement json, DateTime now, ValidationErrors errors)
    {
        var hasDays = json.TryGetProperty("expires_in_days", out var daysValue) && daysValue.ValueKind != JsonValueKind.Null;
        var hasAt = json.TryGetProperty("expires_at", out var atValue) && atValue.ValueKind != JsonValueKind.Null;
        if (hasDays && hasAt)
        {
            errors.Add(["body", "expires_at"], "Value error, give expires_in_days or expires_at, not both", "value_error");
            return null;
        }
        if (hasDays)
        {
            var days = errors.Int(json, "expires_in_days", ["body", "expires_in_days"], required: false);
            if (days is null)
            {
                return null;
            }
            if (days is < 1 or > MaxExpiresInDays)
            {
                errors.Add(["body", "expires_in_days"], $"Input should be between 1 and {MaxExpiresInDays} (days)", "less_than_equal");
                return null;
            }
            return now.AddDays(days.Value);
        }
        if (hasAt)
        {
            var text = errors.String(json, "expires_at", ["body", "expires_at"], required: false);
            if (text is null)
            {
                return null;
            }
            // An explicit offset (or Z) is required: a bare local time would mean a different instant on every server.
            if (!DateTimeOffset.TryParse(text, CultureInfo.InvariantCulture, DateTimeStyles.None, out var at)
                || !HasOffset(text))
            {
                errors.Add(["body", "expires_at"],
                    "Input should be an ISO-8601 time with an offset, like 2027-01-31T12:00:00+00:00", "datetime_parsing");
                return null;
            }
            var utc = at.UtcDateTime;
            if (utc <= now)
            {
                errors.Add(["body", "expires_at"], "Value error, expires_at must be in the future", "value_error");
                return null;
            }
            if (utc > now.AddDays(MaxExpiresInDays))
            {
                errors.Add(["body", "expires_at"], $"Value error, expires_at must be within {MaxExpiresInDays} days", "value_error");
                return null;
            }
            // Whole seconds, as every timestamp the API shows.
            return new DateTime(utc.Ticks - utc.Ticks % TimeSpan.TicksPerSecond, DateTimeKind.Utc);
        }
        return null;
    }

    private static bool HasOffset(string text)
    {
        var t = text.IndexOf('T', StringComparison.OrdinalIgnoreCase);
        if (t < 0)
        {
            return false;
        }
        var time = text.AsSpan(t + 1);
        return time.EndsWith("Z", StringComparison.OrdinalIgnoreCase) || time.Contains('+') || time.Contains('-');
    }

    private static TokenCreatedOut Created(string token, string? label, DateTime now, DateTime? expiresAt) =>
        new(ApiTokens.IdOf(token), token, label, Timestamps.Format(now), Format(expiresAt));

    private static string? Format(DateTime? utc) => utc is { } value ? Timestamps.Format(value) : null;
}

/// <summary>Body of <c>POST /v1/me/tokens</c>: all optional; give at most one of the two expiry fields.</summary>
public sealed record TokenCreateIn(string? Label, int? ExpiresInDays, string? ExpiresAt);

/// <summary>The create answer: the only place the full token ever appears.</summary>
public sealed record TokenCreatedOut(string Id, string Token, string? Label, string CreatedAt, string? ExpiresAt);

/// <summary>A token as lists show it; <c>current</c> marks the one the request came with.</summary>
public sealed record TokenOut(string Id, string? Label, string CreatedAt, string? ExpiresAt, bool Current);

public sealed record UserCreateIn(string Name, bool Admin = false);

public sealed record UserCreatedOut(string Name, bool Admin, string CreatedAt, TokenCreatedOut Token);

public sealed record UserOut(string Name, bool Admin, string CreatedAt, int Tokens);

[JsonSourceGenerationOptions(
    JsonSerializerDefaults.Web,
    PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower,
    DefaultIgnoreCondition = JsonIgnoreCondition.Never)]
[JsonSerializable(typeof(TokenCreateIn))]
[JsonSerializable(typeof(TokenCreatedOut))]
[JsonSerializable(typeof(List<TokenOut>))]
[JsonSerializable(typeof(UserCreateIn))]
[JsonSerializable(typeof(UserCreatedOut))]
[JsonSerializable(typeof(List<UserOut>))]
public sealed partial class TokenJsonContext : JsonSerializerContext;

/// <summary>The token routes' serializer, configured like <see cref="ApiJson"/> (snake_case, readable).</summary>
internal static class TokenJson
{
    public static readonly TokenJsonContext Context = new(new JsonSerializerOptions(JsonSerializerDefaults.Web)
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
    });
}
