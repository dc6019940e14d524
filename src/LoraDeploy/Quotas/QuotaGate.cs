using LoraDeploy.Data;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Quotas;

/// <summary>What a user has now, as the quotas count it.</summary>
public readonly record struct QuotaUsage(long Deploys, long StoredBytes, long ConcurrentImports);

/// <summary>
/// Counts a user's deploys, stored bytes and imports from the existing tables and refuses what would go over the
/// user's <see cref="QuotaOptions"/>. Count and insert must be serialised per user, or parallel creates (on any number
/// of replicas) each see room for one more: callers run <see cref="LockUserAsync"/> first inside the transaction
/// that also writes the new rows.
/// </summary>
public sealed class QuotaGate(IOptionsMonitor<QuotaOptions> options)
{
    public const string MaxDeploysName = "max_deploys";
    public const string MaxStoredBytesName = "max_stored_bytes";
    public const string MaxConcurrentImportsName = "max_concurrent_imports";

    public EffectiveQuota LimitsFor(string userName) => options.CurrentValue.For(userName);

    /// <summary>
    /// Serialises quota checks of one user until the current transaction ends. PostgreSQL: the user's row is locked
    /// (<c>FOR NO KEY UPDATE</c>, so foreign-key checks of other inserts for that user are not blocked), which holds
    /// across replicas. SQLite: nothing to do here, because EF begins SQLite transactions as <c>BEGIN IMMEDIATE</c>
    /// (Microsoft.Data.Sqlite's default), so the transaction already holds the database's one write lock before it reads.
    /// </summary>
    public static async Task LockUserAsync(LoraDeployDbContext db, long userId, CancellationToken ct)
    {
        if (db.Database.CurrentTransaction is null)
        {
            throw new InvalidOperationException("A quota check must run inside the transaction that writes the new rows.");
        }
        if (db is PostgresLoraDeployContext)
        {
            await db.Database.ExecuteSqlAsync($"""SELECT 1 FROM users WHERE "Id" = {userId} FOR NO KEY UPDATE""", ct);
        }
    }

    /// <summary>
    /// The user's usage. Deploys: every one not deleted; a failed deploy still counts until it is deleted (as on
    /// DeepInfra), since it keeps its name and can be started again. Imports: deploys before <c>deploying</c>.
    /// Stored bytes: the distinct adapter files of the user's LoRAs that are not deleted; an import still in flight
    /// counts the size its source listed, so parallel imports cannot together overshoot the limit.
    /// </summary>
    public static async Task<QuotaUsage> UsageAsync(LoraDeployDbContext db, long userId, CancellationToken ct)
    {
        var deploys = await db.Deploys.LongCountAsync(d => d.UserId == userId && d.Status != DeployStatus.Deleted, ct);
        var imports = await db.Deploys.LongCountAsync(
            d => d.UserId == userId && (d.Status == DeployStatus.Initializing || d.Status == DeployStatus.Downloading), ct);
        var files = await db.Loras
            .Where(l => l.UserId == userId && !l.Deleted)
            .Where(l => l.AdapterSha256 != null || db.Deploys.Any(d => d.LoraId == l.Id
                && (d.Status == DeployStatus.Initializing || d.Status == DeployStatus.Downloading)))
            .Select(l => new { l.Id, l.AdapterSha256, l.ExpectedSha256, Stored = (long?)l.Adapter!.SizeBytes, Listed = l.SizeBytes })
            .ToListAsync(ct);
        // One file referenced by two LoRAs counts once; an in-flight file is known by its listed hash, if any.
        var storedBytes = files
            .GroupBy(f => f.AdapterSha256 ?? f.ExpectedSha256 ?? $"lora:{f.Id}")
            .Sum(g => g.Max(f => f.Stored ?? f.Listed ?? 0));
        return new QuotaUsage(deploys, storedBytes, imports);
    }

    /// <summary>
    /// Why a new deploy (with a new import) would break the user's quota, as a sentence for a 403, or null when it
    /// fits. <paramref name="knownFile"/> is the new file when known up front (an upload: already stored, so its hash
    /// and size are certain; it adds nothing when the user's LoRAs already use that file); otherwise the stored-bytes
    /// quota refuses only a user who has no room left, and the pipeline checks again once the source reports the size.
    /// </summary>
    public async Task<string?> RefuseCreateAsync(LoraDeployDbContext db, long userId, string userName, (string Sha256, long Bytes)? knownFile, CancellationToken ct)
    {
        var limits = LimitsFor(userName);
        if (limits is { MaxDeploys: null, MaxStoredBytes: null, MaxConcurrentImports: null })
        {
            return null;
        }
        await LockUserAsync(db, userId, ct);
        var usage = await UsageAsync(db, userId, ct);
        if (limits.MaxDeploys is { } maxDeploys && usage.Deploys >= maxDeploys)
        {
            return $"Quota {MaxDeploysName} reached: you have {usage.Deploys} of {maxDeploys} deploys (failed ones count until deleted). "
                + "Delete a deploy you no longer need, or ask the operator to raise your Quotas:MaxDeploys.";
        }
        if (limits.MaxConcurrentImports is { } maxImports && usage.ConcurrentImports >= maxImports)
        {
            return ImportsSentence(usage.ConcurrentImports, maxImports);
        }
        long? knownBytes = null;
        if (knownFile is { } file)
        {
            var sha = file.Sha256;
            knownBytes = await db.Loras.AnyAsync(l => l.UserId == userId && !l.Deleted && (l.AdapterSha256 == sha || l.ExpectedSha256 == sha), ct)
                ? 0
                : file.Bytes;
        }
        if (limits.MaxStoredBytes is { } maxBytes && (knownBytes is { } size ? usage.StoredBytes + size > maxBytes : usage.StoredBytes >= maxBytes))
        {
            return StoredBytesSentence(usage.StoredBytes, maxBytes, knownBytes);
        }
        return null;
    }

    /// <summary>Why starting a failed import again would break the user's concurrent-imports quota, or null.</summary>
    public async Task<string?> RefuseRequeueAsync(LoraDeployDbContext db, long userId, string userName, CancellationToken ct)
    {
        if (LimitsFor(userName).MaxConcurrentImports is not { } maxImports)
        {
            return null;
        }
        await LockUserAsync(db, userId, ct);
        var usage = await UsageAsync(db, userId, ct);
        return usage.ConcurrentImports >= maxImports ? ImportsSentence(usage.ConcurrentImports, maxImports) : null;
    }

    /// <summary>
    /// Once an import's size is known (and recorded in this transaction): why it breaks the user's stored-bytes quota,
    /// as a fail_reason, or null when it fits. Locks the user first, like a create.
    /// </summary>
    public async Task<string?> RefuseStoredBytesAsync(LoraDeployDbContext db, long userId, CancellationToken ct)
    {
        var userName = await db.Users.Where(u => u.Id == userId).Select(u => u.Name).FirstAsync(ct);
        if (LimitsFor(userName).MaxStoredBytes is not { } maxBytes)
        {
            return null;
        }
        await LockUserAsync(db, userId, ct);
        var usage = await UsageAsync(db, userId, ct);
        return usage.StoredBytes > maxBytes ? StoredBytesSentence(usage.StoredBytes, maxBytes, knownBytes: null) : null;
    }

    private static string ImportsSentence(long imports, int maxImports) =>
        $"Quota {MaxConcurrentImportsName} reached: {imports} of {maxImports} imports are still running. "
        + "Wait for one to finish, delete one, or ask the operator to raise your Quotas:MaxConcurrentImports.";

    private static string StoredBytesSentence(long storedBytes, long maxBytes, long? knownBytes)
    {
        var situation = knownBytes is { } size
            ? $"this file is {size} bytes and your LoRAs already use {storedBytes} of {maxBytes} bytes"
            : storedBytes > maxBytes
                ? $"with this file your LoRAs would use {storedBytes} of {maxBytes} bytes (each distinct file counted once, imports in progress by their listed size)"
                : $"your LoRAs already use {storedBytes} of {maxBytes} bytes, so no new file fits";
        return $"Quota {MaxStoredBytesName} exceeded: {situation}. Delete a LoRA you no longer need, or ask the operator to raise your Quotas:MaxStoredBytes.";
    }
}
