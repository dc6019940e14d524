using LoraDeploy.Data;
using Microsoft.AspNetCore.Authentication;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Auth;

public static class AuthExtensions
{
    public static IServiceCollection AddTokenAuth(this IServiceCollection services)
    {
        services.AddMemoryCache();
        services.AddSingleton<UnknownTokenIds>();
        services.AddAuthentication(TokenAuthenticationHandler.SchemeName)
            .AddScheme<AuthenticationSchemeOptions, TokenAuthenticationHandler>(TokenAuthenticationHandler.SchemeName, null);
        services.AddAuthorizationBuilder()
            .SetFallbackPolicy(null)
            // No scheme named in the policy: the authentication middleware already ran the default (token) scheme, and
            // naming it would authenticate again and merge a new principal on every request.
            .SetDefaultPolicy(new Microsoft.AspNetCore.Authorization.AuthorizationPolicyBuilder()
                .RequireAuthenticatedUser().Build());
        return services;
    }

    /// <summary>First start on an empty database: create <c>admin</c> and print its token once.</summary>
    public static async Task BootstrapAdminAsync(this WebApplication app, CancellationToken ct)
    {
        await using var scope = app.Services.CreateAsyncScope();
        var db = scope.ServiceProvider.GetRequiredService<LoraDeployDbContext>();
        if (await db.Users.AnyAsync(ct))
        {
            return;
        }
        var time = app.Services.GetRequiredService<TimeProvider>();
        string token;
        try
        {
            token = await ApiTokens.CreateForUserAsync(db, "admin", isAdmin: true, "first start", time.GetUtcNow().UtcDateTime, ct);
        }
        catch (DbUpdateException e) when (db.IsUniqueViolation(e))
        {
            return; // another replica bootstrapped at the same moment
        }
        // Printed, not logged: the token must not end up in a log pipeline.
        Console.Out.WriteLine($"Created user 'admin'. Its API token (shown once): {token}");
        Console.Out.Flush();
    }
}
