using LoraDeploy.Data;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Auth;

/// <summary>
/// Worker credentials: <c>ldw_{id}_{secret}</c>, stored and verified like API tokens but in their own table and with
/// their own prefix and scheme, so a worker token opens no user route and a user token no worker route.
/// </summary>
public static class WorkerTokens
{
    public const string Prefix = "ldw_";

    /// <summary>
    /// Issues a token for worker <paramref name="name"/> and returns it in full (never shown again). A worker has one
    /// token: issuing another replaces it, which is how a leaked token is rotated.
    /// </summary>
    public static async Task<string> CreateAsync(LoraDeployDbContext db, string name, DateTime now, CancellationToken ct)
    {
        var (id, secret) = ApiTokens.NewIdAndSecret();
        await using var transaction = await db.Database.BeginTransactionAsync(ct);
        await db.WorkerTokens.Where(t => t.Name == name).ExecuteDeleteAsync(ct);
        db.WorkerTokens.Add(new WorkerToken { Id = id, Name = name, SecretHash = ApiTokens.HashSecret(secret), CreatedAt = now });
        await db.SaveChangesAsync(ct);
        await transaction.CommitAsync(ct);
        return $"{Prefix}{id}_{secret}";
    }

    public static bool TryParse(string? token, out ApiTokens.ParsedToken parsed) => ApiTokens.TryParse(token, Prefix, out parsed);
}
