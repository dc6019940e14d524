using System.ComponentModel.DataAnnotations;
using LoraDeploy.Data;
using Microsoft.AspNetCore.Http.HttpResults;
using Microsoft.Data.Sqlite;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Health;

/// <summary>The <c>Health</c> settings section.</summary>
public sealed class HealthOptions
{
    public const string Section = "Health";

    /// <summary>
    /// Free bytes the SQLite database's disk must have for <c>/ready</c>: below it writes are about to fail (SQLite
    /// appends every commit to its write-ahead log), so the replica reports not ready before users see 503s.
    /// </summary>
    [Range(0, long.MaxValue)]
    public long MinFreeBytes { get; set; } = 16 * 1024 * 1024;
}

public static class HealthEndpoints
{
    public static IServiceCollection AddHealth(this IServiceCollection services)
    {
        services.AddOptions<HealthOptions>().BindConfiguration(HealthOptions.Section).ValidateDataAnnotations().ValidateOnStart();
        return services;
    }

    public static IEndpointRouteBuilder MapHealth(this IEndpointRouteBuilder app)
    {
        var health = app.MapGroup("").WithTags("Health").AllowAnonymous();
        health.MapGet("/health", () => TypedResults.Ok(new HealthOut("ok")))
            .WithSummary("Liveness");
        health.MapGet("/ready", Ready).WithSummary("Readiness: the database answers and accepts writes");
        return app;
    }

    internal static async Task<Results<Ok<HealthOut>, JsonHttpResult<HealthOut>>> Ready(
        HttpContext http, LoraDeployDbContext db, IOptions<HealthOptions> options, CancellationToken ct)
    {
        string? problem = null;
        try
        {
            if (!await db.Database.CanConnectAsync(ct) || (await db.Database.GetPendingMigrationsAsync(ct)).Any())
            {
                problem = "database unavailable";
            }
            else
            {
                // A write that matches no row: it changes nothing, yet the database must take it as a write, so a file
                // that became read-only or a read-only server fails here rather than at the user's next create.
                await db.Database.ExecuteSqlRawAsync("UPDATE users SET \"IsAdmin\" = \"IsAdmin\" WHERE \"Id\" < 0", ct);
                // A full disk passes that (nothing is written), so look at the space the next commits need.
                if (db.Database.GetDbConnection() is SqliteConnection { DataSource: { Length: > 0 } file }
                    && FreeBytes(file) is { } free && free < options.Value.MinFreeBytes)
                {
                    problem = $"database disk full ({free} bytes free, Health:MinFreeBytes is {options.Value.MinFreeBytes})";
                }
            }
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            problem = "database unavailable";
        }
        if (problem is null)
        {
            return TypedResults.Ok(new HealthOut("ready"));
        }
        http.Response.Headers.RetryAfter = ErrorHandling.RetryAfterSeconds.ToString(System.Globalization.CultureInfo.InvariantCulture);
        return TypedResults.Json(new HealthOut(problem), ApiJson.Context.HealthOut,
            statusCode: StatusCodes.Status503ServiceUnavailable);
    }

    private static long? FreeBytes(string databaseFile)
    {
        var directory = Path.GetDirectoryName(Path.GetFullPath(databaseFile));
        return directory is null ? null : new DriveInfo(directory).AvailableFreeSpace;
    }
}
