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
/// Verified tokens are cached briefly by token id + secret hash, so a hot path costs one hash, not a query; ids that
/// match no token are remembered briefly too (<see cref="UnknownTokenIds"/>), so probing ids costs no query either.
/// </summary>
public sealed class TokenAuthenticationHandler(
    IOptionsMonitor<AuthenticationSchemeOptions> options,
    ILoggerFactory logger,
    UrlEncoder encoder,
    IDbContextFactory<LoraDeployDbContext> contexts,
    IMemoryCache cache,
    UnknownTokenIds unknownTokens) : AuthenticationHandler<AuthenticationSchemeOptions>(options, logger, encoder)
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
        if (!cache.TryGetValue(cacheKey, out VerifiedToken? verified) && !unknownTokens.Contains(parsed.Id))
        {
            // Only a cache miss touches the database, so a hot request does not rent a context for auth.
            await using var db = await contexts.CreateDbContextAsync(Context.RequestAborted);
            var row = await db.ApiTokens
                .Where(t => t.Id == parsed.Id)
                .Select(t => new { t.SecretHash, t.UserId, UserName = t.User!.Name, t.User.IsAdmin })
                .FirstOrDefaultAsync(Context.RequestAborted);
            if (row is null)
            {
                unknownTokens.Add(parsed.Id);
            }
            else
            {
                verified = new VerifiedToken(row.SecretHash, Principal(row.UserId, row.UserName, row.IsAdmin));
                cache.Set(cacheKey, verified, CacheFor);
            }
        }
        // Known or not, the same constant-time comparison runs (an unknown id against a hash no secret has), so an
        // unknown id and a wrong secret take one path and answer alike.
        if (!ApiTokens.Verify(parsed, verified?.SecretHash) || verified is null)
        {
            return AuthenticateResult.Fail("Bad token.");
        }
        return AuthenticateResult.Success(new AuthenticationTicket(verified.Principal, SchemeName));
    }

    /// <summary>Built once per cache entry and shared by that token's requests; nothing in the pipeline changes it.</summary>
    private static ClaimsPrincipal Principal(long userId, string userName, bool isAdmin) => new(new ClaimsIdentity(
        [
            new Claim(ClaimTypes.NameIdentifier, userId.ToString(System.Globalization.CultureInfo.InvariantCulture)),
            new Claim(ClaimTypes.Name, userName),
            .. isAdmin ? [new Claim(ClaimTypes.Role, "admin")] : Array.Empty<Claim>(),
        ],
        SchemeName));

    protected override Task HandleChallengeAsync(AuthenticationProperties properties) => ChallengeAsync(Response, "Not authenticated");

    protected override Task HandleForbiddenAsync(AuthenticationProperties properties) => ForbiddenAsync(Response);

    /// <summary>401 in DeepInfra's shape with <c>WWW-Authenticate: Bearer</c>; every token scheme answers alike.</summary>
    internal static async Task ChallengeAsync(HttpResponse response, string message)
    {
        response.StatusCode = StatusCodes.Status401Unauthorized;
        response.Headers.WWWAuthenticate = "Bearer";
        await response.WriteAsJsonAsync(new DeepError(message), ApiJson.Context.DeepError);
    }

    internal static async Task ForbiddenAsync(HttpResponse response)
    {
        response.StatusCode = StatusCodes.Status403Forbidden;
        await response.WriteAsJsonAsync(new DeepError("Forbidden"), ApiJson.Context.DeepError);
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

    private sealed record VerifiedToken(byte[] SecretHash, ClaimsPrincipal Principal);
}

/// <summary>The authenticated caller, read from the principal.</summary>
public readonly record struct CurrentUser(long Id, string Name)
{
    public static CurrentUser From(ClaimsPrincipal principal) => new(
        long.Parse(principal.FindFirstValue(ClaimTypes.NameIdentifier)!, System.Globalization.CultureInfo.InvariantCulture),
        principal.FindFirstValue(ClaimTypes.Name)!);
}
