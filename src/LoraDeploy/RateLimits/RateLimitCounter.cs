using System.Data.Common;
using LoraDeploy.Data;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.RateLimits;

/// <summary>
/// The shared budget: one row per user and clock minute in <c>rate_limit_windows</c>, counted up by one atomic upsert
/// (SQLite ≥ 3.35 and PostgreSQL speak the same <c>INSERT … ON CONFLICT … DO UPDATE … RETURNING</c>), so two replicas
/// on one database can never both hand out the last permit.
/// </summary>
public sealed class RateLimitCounter(IDbContextFactory<LoraDeployDbContext> contexts, TimeProvider time)
{
    public const int WindowSeconds = 60;

    // The WHERE keeps a full window's row untouched: no row comes back, which is the refusal, and Count never passes
    // the limit, so /v1/me/rate_limit can read "remaining" straight from it.
    private const string TakeSql = """
        INSERT INTO rate_limit_windows ("UserId", "Window", "Count") VALUES (@user, @window, 1)
        ON CONFLICT ("UserId", "Window") DO UPDATE SET "Count" = rate_limit_windows."Count" + 1
        WHERE rate_limit_windows."Count" < @limit
        RETURNING "Count"
        """;

    // One minute of slack: a replica whose clock runs a little ahead must not drop the minute the others still count in.
    private const string SweepSql = """DELETE FROM rate_limit_windows WHERE "Window" < @before""";

    private long _sweptWindow = long.MinValue;

    /// <summary>Takes one request from the user's budget of the current minute, or says when the next minute starts.</summary>
    public async ValueTask<RateLimitDecision> TryTakeAsync(long userId, int limit, CancellationToken ct)
    {
        var (window, resetAfter) = Current();
        await using var db = await contexts.CreateDbContextAsync(ct);
        await db.Database.OpenConnectionAsync(ct);
        await using (var take = Command(db, TakeSql, ("user", userId), ("window", window), ("limit", limit)))
        {
            var count = await take.ExecuteScalarAsync(ct);
            if (count is null or DBNull)
            {
                return new RateLimitDecision(false, 0, resetAfter);
            }
            await SweepOnceAsync(db, window, ct);
            return new RateLimitDecision(true, limit - Convert.ToInt32(count, System.Globalization.CultureInfo.InvariantCulture), resetAfter);
        }
    }

    /// <summary>Requests the user has made in the current minute, without taking one.</summary>
    public async Task<(int Used, TimeSpan ResetAfter)> ReadAsync(long userId, CancellationToken ct)
    {
        var (window, resetAfter) = Current();
        await using var db = await contexts.CreateDbContextAsync(ct);
        var used = await db.RateLimitWindows.Where(w => w.UserId == userId && w.Window == window).Select(w => w.Count).FirstOrDefaultAsync(ct);
        return (used, resetAfter);
    }

    /// <summary>The current minute's number since the epoch and the time left in it.</summary>
    public (long Window, TimeSpan ResetAfter) Current()
    {
        var nowMs = time.GetUtcNow().ToUnixTimeMilliseconds();
        var window = Math.DivRem(nowMs, WindowSeconds * 1000L, out var intoWindow);
        return (window, TimeSpan.FromMilliseconds(WindowSeconds * 1000L - intoWindow));
    }

    /// <summary>Old windows are dropped by the first request of each minute on each replica: one indexed delete a minute.</summary>
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

/// <summary>Whether a request may pass, what is left of the minute's budget, and when the minute ends.</summary>
public readonly record struct RateLimitDecision(bool Allowed, int Remaining, TimeSpan ResetAfter);
