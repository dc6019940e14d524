using System.Text.Json;
using System.Text.RegularExpressions;
using LoraDeploy.Auth;
using LoraDeploy.Data;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Audit;

/// <summary>Who made a request: copied onto each audit line so it still reads after the user or token is gone.</summary>
public sealed record AuditActor(long? UserId, string? UserName, string? TokenId, string? TokenLabel, string? Ip);

/// <summary>
/// Appends lines to the audit log. Called after a change has committed, so a failed request records nothing. Writes with
/// its own context: the caller's may hold changes it did not mean to save. Every detail is scrubbed of query strings
/// (civitai URLs carry <c>token=</c>) and of anything shaped like an API token.
/// </summary>
public sealed partial class AuditLog(IDbContextFactory<LoraDeployDbContext> contexts, TimeProvider time)
{
    public static class Actions
    {
        public const string Create = "create";
        public const string Delete = "delete";
        public const string Stop = "stop";
        public const string Start = "start";
        public const string Settings = "settings";
        public const string TokenCreate = "token.create";
        public const string TokenRevoke = "token.revoke";
        public const string UserCreate = "user.create";
        public const string ExportCreate = "export.create";
        public const string ExportDelete = "export.delete";
        public const string PolicyRefused = "policy.refused";
    }

    /// <summary>The caller of <paramref name="http"/>, with its token's label read from the token row.</summary>
    public async Task<AuditActor> ActorAsync(HttpContext http, CancellationToken ct)
    {
        var ip = http.Connection.RemoteIpAddress is { } address
            ? (address.IsIPv4MappedToIPv6 ? address.MapToIPv4() : address).ToString()
            : null;
        if (http.User.Identity?.IsAuthenticated != true)
        {
            return new AuditActor(null, null, null, null, ip);
        }
        var user = CurrentUser.From(http.User);
        var tokenId = CurrentUser.TokenId(http.User);
        string? label = null;
        if (tokenId is not null)
        {
            await using var db = await contexts.CreateDbContextAsync(ct);
            label = await db.ApiTokens.Where(t => t.Id == tokenId).Select(t => t.Label).FirstOrDefaultAsync(ct);
        }
        return new AuditActor(user.Id, user.Name, tokenId, label, ip);
    }

    public async Task RecordAsync(HttpContext http, string action, string objectType, string? objectId, string detail = "")
    {
        // Not the request's token: the change has committed, so the line is written even if the caller hangs up now.
        var actor = await ActorAsync(http, CancellationToken.None);
        await RecordAsync(actor, action, objectType, objectId, detail, CancellationToken.None);
    }

    public async Task RecordAsync(AuditActor actor, string action, string objectType, string? objectId, string detail, CancellationToken ct)
    {
        await using var db = await contexts.CreateDbContextAsync(ct);
        db.AuditEntries.Add(new AuditEntry
        {
            At = time.GetUtcNow().UtcDateTime,
            UserId = actor.UserId,
            UserName = actor.UserName,
            TokenId = actor.TokenId,
            TokenLabel = actor.TokenLabel,
            Ip = actor.Ip,
            Action = action,
            ObjectType = objectType,
            ObjectId = objectId is null ? null : Truncate(Scrub(objectId), 200),
            Detail = Truncate(Scrub(detail), AuditEntryLimits.DetailLength),
        });
        await db.SaveChangesAsync(ct);
    }

    /// <summary>A line for work done on a user's behalf away from any request (the pipeline): no token, no IP.</summary>
    public async Task RecordForUserAsync(long userId, string action, string objectType, string? objectId, string detail, CancellationToken ct)
    {
        string? name;
        await using (var db = await contexts.CreateDbContextAsync(ct))
        {
            name = await db.Users.Where(u => u.Id == userId).Select(u => u.Name).FirstOrDefaultAsync(ct);
        }
        await RecordAsync(new AuditActor(userId, name, null, null, null), action, objectType, objectId, detail, ct);
    }

    /// <summary>Drops query strings and fragments from URLs and masks API-token-shaped words.</summary>
    public static string Scrub(string text)
    {
        var withoutQueries = UrlQuery().Replace(text, "$1");
        return TokenShaped().Replace(withoutQueries, "ld_***");
    }

    private static string Truncate(string text, int length) => text.Length <= length ? text : text[..length];

    /// <summary>The names (never the values) of a JSON body's fields, one level of nesting spelled out, for a settings line.</summary>
    internal static string FieldNames(string body)
    {
        try
        {
            using var json = JsonDocument.Parse(body);
            if (json.RootElement.ValueKind != JsonValueKind.Object)
            {
                return "";
            }
            var names = json.RootElement.EnumerateObject().SelectMany(field => field.Value.ValueKind == JsonValueKind.Object
                ? field.Value.EnumerateObject().Select(inner => $"{field.Name}.{inner.Name}")
                : [field.Name]);
            return "fields: " + string.Join(", ", names);
        }
        catch (JsonException)
        {
            return "";
        }
    }

    /// <summary>A top-level string field of a JSON body, or null.</summary>
    internal static string? StringField(string body, string name)
    {
        try
        {
            using var json = JsonDocument.Parse(body);
            return json.RootElement.ValueKind == JsonValueKind.Object
                && json.RootElement.TryGetProperty(name, out var value) && value.ValueKind == JsonValueKind.String
                ? value.GetString()
                : null;
        }
        catch (JsonException)
        {
            return null;
        }
    }

    [GeneratedRegex(@"((?:https?://)?[^\s?#]*)[?#]\S*", RegexOptions.IgnoreCase)]
    private static partial Regex UrlQuery();

    [GeneratedRegex(@"\bld_[A-Za-z0-9]+_[A-Za-z0-9_\-]+")]
    private static partial Regex TokenShaped();
}
