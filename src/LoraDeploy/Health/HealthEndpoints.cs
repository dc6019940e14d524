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
        health.MapGet("/ready", Ready).WithSummary("Readiness: the database answers");
        return app;
    }

    internal static async Task<Results<Ok<HealthOut>, JsonHttpResult<HealthOut>>> Ready(LoraDeployDbContext db, CancellationToken ct)
    {
        bool canConnect;
        try
        {
            canConnect = await db.Database.CanConnectAsync(ct) && !(await db.Database.GetPendingMigrationsAsync(ct)).Any();
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            canConnect = false;
        }
        return canConnect
            ? TypedResults.Ok(new HealthOut("ready"))
            : TypedResults.Json(new HealthOut("database unavailable"), ApiJson.Context.HealthOut,
                statusCode: StatusCodes.Status503ServiceUnavailable);
    }
}
