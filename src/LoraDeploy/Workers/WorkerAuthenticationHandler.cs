using System.Security.Claims;
using System.Text.Encodings.Web;
using LoraDeploy.Auth;
using LoraDeploy.Data;
using Microsoft.AspNetCore.Authentication;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Workers;

/// <summary>
/// Authenticates workers by their own token kind (<c>ldw_…</c>, <see cref="WorkerTokens"/>). Only the worker routes
/// name this scheme, and the user scheme refuses the <c>ldw_</c> prefix, so neither credential opens the other's routes.
/// No cache: a worker calls a few times a second at most, and each call writes anyway.
/// </summary>
public sealed class WorkerAuthenticationHandler(
    IOptionsMonitor<AuthenticationSchemeOptions> options,
    ILoggerFactory logger,
    UrlEncoder encoder,
    IDbContextFactory<LoraDeployDbContext> contexts) : AuthenticationHandler<AuthenticationSchemeOptions>(options, logger, encoder)
{
    public const string SchemeName = "Worker";
    public const string PolicyName = "Worker";
    public const string Role = "worker";

    protected override async Task<AuthenticateResult> HandleAuthenticateAsync()
    {
        var token = TokenAuthenticationHandler.ReadToken(Request.Headers);
        if (token is null)
        {
            return AuthenticateResult.NoResult();
        }
        if (!WorkerTokens.TryParse(token, out var parsed))
        {
            return AuthenticateResult.Fail("Not a worker token.");
        }
        await using var db = await contexts.CreateDbContextAsync(Context.RequestAborted);
        var row = await db.WorkerTokens.Where(t => t.Id == parsed.Id)
            .Select(t => new { t.SecretHash, t.Name })
            .FirstOrDefaultAsync(Context.RequestAborted);
        if (!ApiTokens.Verify(parsed, row?.SecretHash) || row is null)
        {
            return AuthenticateResult.Fail("Bad worker token.");
        }
        var principal = new ClaimsPrincipal(new ClaimsIdentity(
            [new Claim(ClaimTypes.Name, row.Name), new Claim(ClaimTypes.Role, Role)], SchemeName));
        return AuthenticateResult.Success(new AuthenticationTicket(principal, SchemeName));
    }

    protected override Task HandleChallengeAsync(AuthenticationProperties properties) =>
        TokenAuthenticationHandler.ChallengeAsync(Response, "Not authenticated as a worker");

    protected override Task HandleForbiddenAsync(AuthenticationProperties properties) => TokenAuthenticationHandler.ForbiddenAsync(Response);
}
