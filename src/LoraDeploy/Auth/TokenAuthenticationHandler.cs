using System.Security.Claims;
using System.Text.Encodings.Web;
using LoraDeploy.Data;
using Microsoft.AspNetCore.Authentication;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Caching.Memory;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Auth;

/// <summary>
/// DeepInfra's auth: <c>Authorization: Bearer TOKEN</c> (scheme case-insensitive) or <c>xi-api-key: TOKEN</c>.
/// Verified tokens are cached briefly by token id + secret hash, so a hot path costs one hash, not a query.
/// </summary>
public sealed class TokenAuthenticationHandler(
    IOptionsMonitor<AuthenticationSchemeOptions> options,
    ILoggerFactory logger,
    UrlEncoder encoder,
    IDbContextFactory<LoraDeployDbContext> contexts,
    IMemoryCache cache) : AuthenticationHandler<AuthenticationSchemeOptions>(options, logger, encoder)
{
    public const string SchemeName = "Token";
    private static readonly TimeSpan CacheFor = TimeSpan.FromSeconds(30);

    protected override async Task<AuthenticateResult> HandleAuthenticateAsync()
    {
        var token = ReadToken(Request.Headers);
        if (token is null)
        {
            return AuthenticateResult.NoResult();
        }
        if (!ApiTokens.TryParse(token, out var parsed))
        {
            return AuthenticateResult.Fail("Malformed token.");
        }

        var cacheKey = (typeof(CurrentUser), parsed.Id);
        if (!cache.TryGetValue(cacheKey, out CachedToken? cached) || cached is null)
        {
            // Only a cache miss touches the database, so a hot request does not rent a context for auth.
            await using var db = await contexts.CreateDbContextAsync(Context.RequestAborted);
            cached = await db.ApiTokens
                .Where(t => t.Id == parsed.Id)
                .Select(t => new CachedToken(t.SecretHash, t.UserId, t.User!.Name, t.User.IsAdmin))
                .FirstOrDefaultAsync(Context.RequestAborted);
            if (cached is null)
            {
                return AuthenticateResult.Fail("Unknown token.");
            }
            cache.Set(cacheKey, cached, CacheFor);
        }
        if (!ApiTokens.Matches(parsed, cached.SecretHash))
        {
            return AuthenticateResult.Fail("Bad token.");
        }

        var identity = new ClaimsIdentity(
            [
                new Claim(ClaimTypes.NameIdentifier, cached.UserId.ToString(System.Globalization.CultureInfo.InvariantCulture)),
                new Claim(ClaimTypes.Name, cached.UserName),
                .. cached.IsAdmin ? [new Claim(ClaimTypes.Role, "admin")] : Array.Empty<Claim>(),
            ],
            SchemeName);
        return AuthenticateResult.Success(new AuthenticationTicket(new ClaimsPrincipal(identity), SchemeName));
    }

    protected override async Task HandleChallengeAsync(AuthenticationProperties properties)
    {
        Response.StatusCode = StatusCodes.Status401Unauthorized;
        Response.Headers.WWWAuthenticate = "Bearer";
        await Response.WriteAsJsonAsync(new DeepError("Not authenticated"), ApiJson.Context.DeepError);
    }

    protected override async Task HandleForbiddenAsync(AuthenticationProperties properties)
    {
        Response.StatusCode = StatusCodes.Status403Forbidden;
        await Response.WriteAsJsonAsync(new DeepError("Forbidden"), ApiJson.Context.DeepError);
    }

    internal static string? ReadToken(IHeaderDictionary headers)
    {
        var authorization = headers.Authorization.ToString();
        if (authorization.Length > 7 && authorization.StartsWith("Bearer ", StringComparison.OrdinalIgnoreCase))
        {
            return authorization[7..].Trim();
        }
        var apiKey = headers["xi-api-key"].ToString();
        return apiKey.Length > 0 ? apiKey.Trim() : null;
    }

    private sealed record CachedToken(byte[] SecretHash, long UserId, string UserName, bool IsAdmin);
}

/// <summary>The authenticated caller, read from the principal.</summary>
public readonly record struct CurrentUser(long Id, string Name)
{
    public static CurrentUser From(ClaimsPrincipal principal) => new(
        long.Parse(principal.FindFirstValue(ClaimTypes.NameIdentifier)!, System.Globalization.CultureInfo.InvariantCulture),
        principal.FindFirstValue(ClaimTypes.Name)!);
}
