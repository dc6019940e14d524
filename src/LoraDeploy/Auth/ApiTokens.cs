using System.Security.Cryptography;
using System.Text;
using LoraDeploy.Data;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Auth;

/// <summary>
/// Tokens look like <c>ld_{id}_{secret}</c>. The id finds the row; only SHA-256(secret) is stored, and it is
/// compared in constant time, so neither a database leak nor response timing reveals a usable token.
/// </summary>
public static class ApiTokens
{
    private const string Prefix = "ld_";
    private const int IdLength = 12;
    private const string IdAlphabet = "abcdefghijklmnopqrstuvwxyz0123456789";

    public readonly record struct ParsedToken(string Id, byte[] SecretHash);

    /// <summary>
    /// Creates a token for user <paramref name="userId"/> and returns it in full; it is never shown again. With
    /// <paramref name="expiresAt"/> it is refused from that instant on.
    /// </summary>
    public static async Task<string> CreateAsync(
        LoraDeployDbContext db, long userId, string? label, DateTime now, CancellationToken ct, DateTime? expiresAt = null)
    {
        var (id, secret) = NewIdAndSecret();
        db.ApiTokens.Add(new ApiToken
        {
            Id = id,
            UserId = userId,
            SecretHash = HashSecret(secret),
            Label = label,
            CreatedAt = now,
            ExpiresAt = expiresAt,
        });
        await db.SaveChangesAsync(ct);
        return $"{Prefix}{id}_{secret}";
    }

    public static bool TryParse(string? token, out ParsedToken parsed) => TryParse(token, Prefix, out parsed);

    /// <summary>The public id of a token this class issued (<c>ld_{id}_…</c>).</summary>
    public static string IdOf(string token) => token.Substring(Prefix.Length, IdLength);

    /// <summary>A fresh token id and a 256-bit secret (base64url, 43 characters).</summary>
    internal static (string Id, string Secret) NewIdAndSecret() =>
        (RandomId(IdLength), Convert.ToBase64String(RandomNumberGenerator.GetBytes(32)).TrimEnd('=').Replace('+', '-').Replace('/', '_'));

    /// <summary>Parses <c>{prefix}{id}_{secret}</c>; each credential kind has its own prefix, so one never passes for another.</summary>
    internal static bool TryParse(string? token, string prefix, out ParsedToken parsed)
    {
        parsed = default;
        if (token is null || token.Length != prefix.Length + IdLength + 1 + 43 || !token.StartsWith(prefix, StringComparison.Ordinal)
            || token[prefix.Length + IdLength] != '_')
        {
            return false;
        }
        parsed = new ParsedToken(token.Substring(prefix.Length, IdLength), HashSecret(token.AsSpan(prefix.Length + IdLength + 1)));
        return true;
    }

    /// <summary>
    /// True when the presented secret hashes to <paramref name="storedHash"/>. With no stored hash (an unknown token
    /// id) the same comparison runs against a hash no secret is known to have, so both cases take one path.
    /// </summary>
    public static bool Verify(ParsedToken presented, byte[]? storedHash) =>
        CryptographicOperations.FixedTimeEquals(presented.SecretHash, storedHash ?? UnknownTokenHash) & storedHash is not null;

    /// <summary>Random per process: no secret can be chosen to match it.</summary>
    private static readonly byte[] UnknownTokenHash = RandomNumberGenerator.GetBytes(SHA256.HashSizeInBytes);

    /// <summary>Lowercase alphanumeric random id (deploy ids, token ids).</summary>
    public static string RandomId(int length) => RandomNumberGenerator.GetString(IdAlphabet, length);

    internal static byte[] HashSecret(ReadOnlySpan<char> secret)
    {
        Span<byte> utf8 = stackalloc byte[Encoding.UTF8.GetMaxByteCount(secret.Length)];
        var count = Encoding.UTF8.GetBytes(secret, utf8);
        return SHA256.HashData(utf8[..count]);
    }

    /// <summary>Finds or creates <paramref name="userName"/>, then issues a token for it.</summary>
    public static async Task<string> CreateForUserAsync(
        LoraDeployDbContext db, string userName, bool isAdmin, string? label, DateTime now, CancellationToken ct)
    {
        var user = await db.Users.AsTracking().FirstOrDefaultAsync(u => u.Name == userName, ct);
        if (user is null)
        {
            user = new User { Name = userName, IsAdmin = isAdmin, CreatedAt = now };
            db.Users.Add(user);
            await db.SaveChangesAsync(ct);
        }
        return await CreateAsync(db, user.Id, label, now, ct);
    }
}
