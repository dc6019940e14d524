using System.Globalization;
using System.Text.Json;

namespace LoraDeploy.Workers.Host;

/// <summary>The worker's own HTTP surface: what the server calls (<c>/internal/v1/infer</c>, <c>/internal/v1/wake</c>) and readiness.</summary>
public static class WorkerEndpoints
{
    private static readonly HashSet<string> KnownOperations =
        [Operations.ChatCompletions, Operations.Completions, Operations.ImagesGenerations, Operations.Native];

    public static IEndpointRouteBuilder MapWorkerEndpoints(this IEndpointRouteBuilder app)
    {
        app.MapPost(WorkerProtocol.InferPath, InferAsync);
        app.MapPost(WorkerProtocol.WakePath, Wake);
        app.MapGet(WorkerProtocol.ReadyPath, (WorkerRuntime runtime) => runtime.Ready
            ? Results.Text("ready")
            : (IResult)ApiErrors.Error(StatusCodes.Status503ServiceUnavailable, "the engine is still loading its base models"));
        app.MapGet("/healthz", () => Results.Text("ok"));
        return app;
    }

    /// <summary>The server changed this worker's assignments: every engine unit heartbeats now to learn them.</summary>
    private static IResult Wake(HttpContext http, WorkerRuntime runtime)
    {
        if (!runtime.IsCallKey(http.Request.Headers.Authorization))
        {
            return ApiErrors.Error(StatusCodes.Status401Unauthorized, "missing or wrong call key: only the server this worker registered with may call it.");
        }
        foreach (var unit in runtime.Units)
        {
            unit.Wake();
        }
        return Results.NoContent();
    }

    private static async Task InferAsync(HttpContext http, WorkerRuntime runtime)
    {
        var ct = http.RequestAborted;
        if (!runtime.IsCallKey(http.Request.Headers.Authorization))
        {
            await ErrorAsync(http, StatusCodes.Status401Unauthorized, "missing or wrong call key: only the server this worker registered with may call it.");
            return;
        }
        var pool = http.Request.Headers[WorkerProtocol.PoolHeader].ToString();
        if (runtime.FindUnit(pool) is not { } unit)
        {
            await ErrorAsync(http, StatusCodes.Status404NotFound, $"this worker does not serve pool '{pool}' ({WorkerProtocol.PoolHeader}).");
            return;
        }
        if (!unit.Started)
        {
            await ErrorAsync(http, StatusCodes.Status503ServiceUnavailable, "the engine is still loading its base models.");
            return;
        }
        var operation = http.Request.Headers[WorkerProtocol.OperationHeader].ToString();
        if (!KnownOperations.Contains(operation))
        {
            await ErrorAsync(http, StatusCodes.Status400BadRequest,
                $"{WorkerProtocol.OperationHeader} '{operation}' is not one of {string.Join(", ", KnownOperations)}.");
            return;
        }
        if (ParseAdapters(http.Request.Headers[WorkerProtocol.AdaptersHeader].ToString(), out var adapters) is { } adapterError)
        {
            await ErrorAsync(http, StatusCodes.Status400BadRequest, adapterError);
            return;
        }
        JsonElement body;
        try
        {
            using var document = await JsonDocument.ParseAsync(http.Request.Body, cancellationToken: ct);
            body = document.RootElement.Clone();
        }
        catch (JsonException e)
        {
            await ErrorAsync(http, StatusCodes.Status400BadRequest, $"the body is not JSON: {e.Message}");
            return;
        }

        var uses = new List<IDisposable>();
        try
        {
            using var slot = await unit.Slots.EnterAsync(ct);
            var loaded = new List<string>();
            foreach (var sha in adapters.Select(a => a.Sha256).Distinct(StringComparer.Ordinal))
            {
                var acquired = await unit.Residency.AcquireAsync(pool, sha, sizeBytes: null, ct);
                if (acquired.Use is null)
                {
                    // Refused by the engine or a damaged blob: the request cannot succeed here or anywhere.
                    await ErrorAsync(http, acquired.Transient ? StatusCodes.Status503ServiceUnavailable : StatusCodes.Status422UnprocessableEntity,
                        acquired.Failure ?? "the adapter could not be loaded.");
                    return;
                }
                uses.Add(acquired.Use);
                if (acquired.LoadedNow)
                {
                    loaded.Add(sha);
                }
            }
            if (loaded.Count > 0)
            {
                http.Response.Headers[WorkerProtocol.LoadedHeader] = string.Join(',', loaded);
                unit.Wake(); // the server routes the next requests for these adapters here once a heartbeat says they are resident
            }
            await unit.Engine.HandleAsync(new InferenceCall(pool, operation, adapters, body), http, ct);
        }
        catch (OperationCanceledException) when (ct.IsCancellationRequested)
        {
            // The server (its client) went away: the engine's work was cancelled with it; nobody reads an answer.
        }
        finally
        {
            foreach (var use in uses)
            {
                use.Dispose();
            }
        }
    }

    /// <summary>Parses <see cref="WorkerProtocol.AdaptersHeader"/>: comma-separated <c>sha256:scale</c>; null or a sentence saying what is wrong.</summary>
    internal static string? ParseAdapters(string header, out List<AdapterScale> adapters)
    {
        adapters = [];
        foreach (var item in header.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries))
        {
            var colon = item.IndexOf(':', StringComparison.Ordinal);
            var sha = colon < 0 ? item : item[..colon];
            if (!WorkerBlobCache.Sha256Hex().IsMatch(sha))
            {
                return $"{WorkerProtocol.AdaptersHeader}: '{sha}' is not a lowercase SHA-256 hex digest.";
            }
            if (colon < 0 || !float.TryParse(item.AsSpan(colon + 1), NumberStyles.Float, CultureInfo.InvariantCulture, out var scale) || !float.IsFinite(scale))
            {
                return $"{WorkerProtocol.AdaptersHeader}: adapter {sha} has no valid scale (sha256:scale, e.g. {sha[..8]}…:1.0).";
            }
            adapters.Add(new AdapterScale(sha, scale));
        }
        return null;
    }

    private static Task ErrorAsync(HttpContext http, int status, string message)
    {
        http.Response.StatusCode = status;
        return http.Response.WriteAsJsonAsync(new DeepError(message), ApiJson.Context.DeepError, cancellationToken: http.RequestAborted);
    }
}
