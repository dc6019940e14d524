using LoraDeploy.Data;
using Microsoft.AspNetCore.Http.HttpResults;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Health;

public static class HealthEndpoints
{
    public static IEndpointRouteBuilder MapHealth(this IEndpointRouteBuilder app)
    {
        var health = app.MapGroup("").WithTags("Health").AllowAnonymous();
        health.MapGet("/health", () => TypedResults.Ok(new HealthOut("ok")))
            .WithSummary("Liveness");
        health.MapGet("/ready", Ready).WithSummary("Readiness: the database answers and accepts writes");
        return app;
    }

    internal static async Task<Results<Ok<HealthOut>, JsonHttpResult<HealthOut>>> Ready(HttpContext http, LoraDeployDbContext db, CancellationToken ct)
    {
        bool ready;
        try
        {
            ready = await db.Database.CanConnectAsync(ct) && !(await db.Database.GetPendingMigrationsAsync(ct)).Any();
            if (ready)
            {
                // A write that matches no row: it changes nothing, yet the database must take it as a write, so a file
                // that became read-only or a read-only server fails here rather than at the user's next create.
                await db.Database.ExecuteSqlRawAsync("UPDATE users SET \"IsAdmin\" = \"IsAdmin\" WHERE \"Id\" < 0", ct);
            }
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            ready = false;
        }
        if (ready)
        {
            return TypedResults.Ok(new HealthOut("ready"));
        }
        http.Response.Headers.RetryAfter = ErrorHandling.RetryAfterSeconds.ToString(System.Globalization.CultureInfo.InvariantCulture);
        return TypedResults.Json(new HealthOut("database unavailable"), ApiJson.Context.HealthOut,
            statusCode: StatusCodes.Status503ServiceUnavailable);
    }
}
