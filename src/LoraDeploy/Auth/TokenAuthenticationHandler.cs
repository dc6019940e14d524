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
/// On SQLite (one server process by design) verified tokens are cached briefly by token id + secret hash, so a hot path
/// costs one hash, not a query; a revoke in this process removes the entry and marks the id revoked, so it is refused
/// from the next request on. On PostgreSQL several replicas share the database and a cache in one of them cannot see a
/// revoke made by another, so every request reads the token's row (one primary-key read). Expiry is checked on every
/// request either way. Ids that match no token are remembered briefly (<see cref="UnknownTokenIds"/>), so probing ids
/// costs no query.
/// </summary>
public sealed class TokenAuthenticationHandler(
    IOptionsMonitor<AuthenticationSchemeOptions> options,
    ILoggerFactory logger,
    UrlEncoder encoder,
    IDbContextFactory<LoraDeployDbContext> contexts,
    IMemoryCache cache,
    UnknownTokenIds unknownTokens,
    IOptions<DatabaseOptions> database,
    TimeProvider time) : AuthenticationHandler<AuthenticationSchemeOptions>(options, logger, encoder)
{
    public const string SchemeName = "Token";

    /// <summary>The claim holding the id of the token that made the request (<c>current</c> in the token list).</summary>
    public const string TokenIdClaim = "loradeploy:token_id";

    private static readonly TimeSpan CacheFor = TimeSpan.FromSeconds(30);
    private static readonly object ExpiredItem = new();

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

        var cacheVerified = database.Value.Provider == DatabaseProvider.Sqlite;
        var cacheKey = (typeof(CurrentUser), parsed.Id);
        VerifiedToken? verified = null;
        // Revoked in this process a moment ago: refused even if a request that read the row before the delete re-cached it.
        var revokedHere = cache.TryGetValue((typeof(RevokedMarker), parsed.Id), out _);
        if (!revokedHere && (!cacheVerified || !cache.TryGetValue(cacheKey, out verified)) && !unknownTokens.Contains(parsed.Id))
        {
            // On SQLite only a cache miss touches the database, so a hot request does not rent a context for auth.
            await using var db = await contexts.CreateDbContextAsync(Context.RequestAborted);
            var row = await db.ApiTokens
                .Where(t => t.Id == parsed.Id)
                .Select(t => new { t.SecretHash, t.ExpiresAt, t.UserId, UserName = t.User!.Name, t.User.IsAdmin })
                .FirstOrDefaultAsync(Context.RequestAborted);
            if (row is null)
            {
                unknownTokens.Add(parsed.Id);
            }
            else
            {
                verified = new VerifiedToken(row.SecretHash, row.ExpiresAt, Principal(parsed.Id, row.UserId, row.UserName, row.IsAdmin));
                if (cacheVerified)
                {
                    cache.Set(cacheKey, verified, CacheFor);
                }
            }
        }
        // Known or not, the same constant-time comparison runs (an unknown id against a hash no secret has), so an
        // unknown id and a wrong secret take one path and answer alike.
        if (!ApiTokens.Verify(parsed, verified?.SecretHash) || verified is null)
        {
            return AuthenticateResult.Fail("Bad token.");
        }
        // Checked after the secret, so only the token's holder learns that it expired.
        if (verified.ExpiresAt is { } expiresAt && time.GetUtcNow().UtcDateTime >= expiresAt)
        {
            Context.Items[ExpiredItem] = true;
            return AuthenticateResult.Fail("Token expired.");
        }
        return AuthenticateResult.Success(new AuthenticationTicket(verified.Principal, SchemeName));
    }

    /// <summary>
    /// Called by a revoke after the row is deleted: this process stops accepting the token at once (other replicas
    /// read the row on every request, see the class summary). The marker outlives any cache entry a request that read
    /// the row just before the delete could still write.
    /// </summary>
    public static void Forget(IMemoryCache cache, string tokenId)
    {
        cache.Set((typeof(RevokedMarker), tokenId), RevokedMarker.Instance, 2 * CacheFor);
        cache.Remove((typeof(CurrentUser), tokenId));
    }

    /// <summary>Built once per cache entry and shared by that token's requests; nothing in the pipeline changes it.</summary>
    private static ClaimsPrincipal Principal(string tokenId, long userId, string userName, bool isAdmin) => new(new ClaimsIdentity(
        [
            new Claim(TokenIdClaim, tokenId),
            new Claim(ClaimTypes.NameIdentifier, userId.ToString(System.Globalization.CultureInfo.InvariantCulture)),
            new Claim(ClaimTypes.Name, userName),
            .. isAdmin ? [new Claim(ClaimTypes.Role, "admin")] : Array.Empty<Claim>(),
        ],
        SchemeName));

    protected override Task HandleChallengeAsync(AuthenticationProperties properties) =>
        ChallengeAsync(Response, Context.Items.ContainsKey(ExpiredItem) ? "Token expired" : "Not authenticated");

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

    private sealed record VerifiedToken(byte[] SecretHash, DateTime? ExpiresAt, ClaimsPrincipal Principal);

    private sealed class RevokedMarker
    {
        public static readonly RevokedMarker Instance = new();
    }
}

/// <summary>The authenticated caller, read from the principal.</summary>
public readonly record struct CurrentUser(long Id, string Name)
{
    /// <summary>The id of the token the request came with.</summary>
    public static string? TokenId(ClaimsPrincipal principal) => principal.FindFirstValue(TokenAuthenticationHandler.TokenIdClaim);

    public static CurrentUser From(ClaimsPrincipal principal) => new(
        long.Parse(principal.FindFirstValue(ClaimTypes.NameIdentifier)!, System.Globalization.CultureInfo.InvariantCulture),
        principal.FindFirstValue(ClaimTypes.Name)!);
}
