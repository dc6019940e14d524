using System.Data.Common;
using LoraDeploy.Data;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace LoraDeploy.RateLimits;

/// <summary>
/// The shared budget: one row per user and clock minute in <c>rate_limit_windows</c>, counted up by one atomic upsert
/// (SQLite ≥ 3.35 and PostgreSQL speak the same <c>INSERT … ON CONFLICT … DO UPDATE … RETURNING</c>), so two replicas
/// on one database can never hand out more than the limit between them.
/// </summary>
/// <remarks>
/// A replica claims permits in batches (<see cref="DatabaseWindowLimiter"/> hands them out from memory): a
/// sixteenth of what is left of the minute, at least one. One write per request made the limited routes 80× slower on
/// SQLite (each write a commit; docs/benchmarks.md); batches make it a few dozen writes a minute per busy user, and as
/// the budget runs out claims shrink to one permit, so the edge stays exact. The cost: permits a replica claimed but
/// did not use are lost to the others for that minute (at most a sixteenth of what was left when it claimed).
/// <para>
/// On SQLite the same windows and batches are counted in this process instead: SQLite serves one replica, and there
/// every commit to the database makes every kept <c>/deploy</c> body stale (<see cref="Deploys.DeployReads"/> watches
/// <c>PRAGMA data_version</c>), so counting polls in the database would cost the polls themselves.
/// </para>
/// </remarks>
public sealed class RateLimitCounter(IDbContextFactory<LoraDeployDbContext> contexts, IOptions<DatabaseOptions> database, TimeProvider time)
{
    private readonly bool _inProcess = database.Value.Provider == DatabaseProvider.Sqlite;
    private readonly Lock _localLock = new();
    private readonly Dictionary<long, (long Window, int Count)> _local = [];

    public const int WindowSeconds = 60;

    /// <summary>A claim takes this share of what is left of the minute's budget (at least one permit).</summary>
    public const int ClaimShare = 16;

    // Both SET expressions read the row as it was, so "Claimed" is the size of this claim and "Count" what is claimed
    // now. The WHERE leaves a full window's row untouched: no row comes back, which is the refusal, and Count never
    // passes the limit, so /v1/me/rate_limit can read "remaining" straight from it.
    private const string ClaimSql = """
        INSERT INTO rate_limit_windows ("UserId", "Window", "Count", "Claimed") VALUES (@user, @window, @first, @first)
        ON CONFLICT ("UserId", "Window") DO UPDATE SET
            "Claimed" = CASE WHEN (@limit - rate_limit_windows."Count") / @share > 1 THEN (@limit - rate_limit_windows."Count") / @share ELSE 1 END,
            "Count" = rate_limit_windows."Count" + CASE WHEN (@limit - rate_limit_windows."Count") / @share > 1 THEN (@limit - rate_limit_windows."Count") / @share ELSE 1 END
        WHERE rate_limit_windows."Count" < @limit
        RETURNING "Claimed"
        """;

    // One minute of slack: a replica whose clock runs a little ahead must not drop the minute the others still count in.
    private const string SweepSql = """DELETE FROM rate_limit_windows WHERE "Window" < @before""";

    private long _sweptWindow = long.MinValue;

    /// <summary>Claims permits of the user's budget for <paramref name="window"/>: how many (0 when the budget is spent).</summary>
    public async ValueTask<int> ClaimAsync(long userId, int limit, long window, CancellationToken ct)
    {
        if (_inProcess)
        {
            return ClaimLocally(userId, limit, window);
        }
        await using var db = await contexts.CreateDbContextAsync(ct);
        await db.Database.OpenConnectionAsync(ct);
        var first = Math.Max(1, limit / ClaimShare);
        await using (var claim = Command(db, ClaimSql, ("user", userId), ("window", window), ("first", first), ("limit", limit), ("share", ClaimShare)))
        {
            var claimed = await claim.ExecuteScalarAsync(ct);
            if (claimed is null or DBNull)
            {
                return 0;
            }
            await SweepOnceAsync(db, window, ct);
            return Convert.ToInt32(claimed, System.Globalization.CultureInfo.InvariantCulture);
        }
    }

    /// <summary>Permits claimed in the current minute (used, or held by a replica), without claiming any.</summary>
    public async Task<(int Claimed, TimeSpan ResetAfter)> ReadAsync(long userId, CancellationToken ct)
    {
        var (window, resetAfter) = Current();
        if (_inProcess)
        {
            lock (_localLock)
            {
                return (_local.TryGetValue(userId, out var local) && local.Window == window ? local.Count : 0, resetAfter);
            }
        }
        await using var db = await contexts.CreateDbContextAsync(ct);
        var claimed = await db.RateLimitWindows.Where(w => w.UserId == userId && w.Window == window).Select(w => w.Count).FirstOrDefaultAsync(ct);
        return (claimed, resetAfter);
    }

    /// <summary>The current minute's number since the epoch and the time left in it.</summary>
    public (long Window, TimeSpan ResetAfter) Current()
    {
        var nowMs = time.GetUtcNow().ToUnixTimeMilliseconds();
        var window = Math.DivRem(nowMs, WindowSeconds * 1000L, out var intoWindow);
        return (window, TimeSpan.FromMilliseconds(WindowSeconds * 1000L - intoWindow));
    }

    /// <summary>What <see cref="ClaimSql"/> does, in memory: the first claim of a minute, then a sixteenth of what is left.</summary>
    private int ClaimLocally(long userId, int limit, long window)
    {
        lock (_localLock)
        {
            var count = _local.TryGetValue(userId, out var local) && local.Window == window ? local.Count : 0;
            if (count >= limit)
            {
                return 0;
            }
            var claimed = count == 0 ? Math.Max(1, limit / ClaimShare) : Math.Max(1, (limit - count) / ClaimShare);
            _local[userId] = (window, count + claimed);
            return claimed;
        }
    }

    /// <summary>Old windows are dropped by the first claim of each minute on each replica: one indexed delete a minute.</summary>
    private async Task SweepOnceAsync(LoraDeployDbContext db, long window, CancellationToken ct)
    {
        var swept = Volatile.Read(ref _sweptWindow);
        if (swept >= window || Interlocked.CompareExchange(ref _sweptWindow, window, swept) != swept)
        {
            return;
        }
        await using var sweep = Command(db, SweepSql, ("before", window - 1));
        await sweep.ExecuteNonQueryAsync(ct);
    }

    private static DbCommand Command(LoraDeployDbContext db, string sql, params (string Name, object Value)[] parameters)
    {
        var command = db.Database.GetDbConnection().CreateCommand();
        command.CommandText = sql;
        foreach (var (name, value) in parameters)
        {
            var parameter = command.CreateParameter();
            parameter.ParameterName = name;
            parameter.Value = value;
            command.Parameters.Add(parameter);
        }
        return command;
    }
}
