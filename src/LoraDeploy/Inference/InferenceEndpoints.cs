using System.Buffers;
using System.Diagnostics;
using System.Text.Json;
using LoraDeploy.Auth;
using LoraDeploy.BaseModels;
using LoraDeploy.Data;
using LoraDeploy.Workers;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Inference;

/// <summary>
/// The inference gateway: DeepInfra's native routes and OpenAI's, each resolved to a pool and adapters, routed to a
/// worker (<see cref="InferenceRouter"/>) and answered with what the worker streams back, unbuffered (SSE included).
/// OpenAI routes answer errors in OpenAI's shape (<c>{"error":{"message","type","param","code"}}</c>), native ones in
/// DeepInfra's (<c>{"error": "…"}</c>).
/// </summary>
public static class InferenceEndpoints
{
    /// <summary>Named client for server → worker calls: no retries (inference is not idempotent), no overall timeout (streams).
    /// The gateway uses its handler through an <see cref="HttpMessageInvoker"/>.</summary>
    public const string WorkerClientName = "LoraDeploy.Workers";

    public static IServiceCollection AddInferenceGateway(this IServiceCollection services)
    {
        services.AddSingleton<InferenceMetrics>();
        services.AddSingleton<InferenceRouter>();
        services.AddHostedService<PoolGauge>();
        services.AddHttpClient(WorkerClientName, client => client.Timeout = Timeout.InfiniteTimeSpan)
            .ConfigurePrimaryHttpMessageHandler(() => new SocketsHttpHandler
            {
                AllowAutoRedirect = false,
                UseCookies = false,
                UseProxy = false,
                ConnectTimeout = TimeSpan.FromSeconds(5),
                // A dead worker's pooled connections must not outlive it by much.
                PooledConnectionIdleTimeout = TimeSpan.FromSeconds(30),
            })
            // The factory's default logging writes four Information lines per inference call; the gateway has its own
            // metrics (loradeploy_inference_*) and logs the failures that matter.
            .RemoveAllLoggers();
        return services;
    }

    public static IEndpointRouteBuilder MapInference(this IEndpointRouteBuilder app)
    {
        var native = app.MapGroup("/v1/inference").WithTags("Inference").RequireAuthorization();
        native.MapPost("/deploy/{deploy_id}", (string deploy_id, HttpContext http) =>
            HandleAsync(http, Operations.Native, openAi: false, "/v1/inference/deploy/{deploy_id}", deployId: deploy_id, model: null))
            .WithSummary("Run a deployed LoRA by deploy id (DeepInfra's native body)");
        native.MapPost("/{owner}/{lora_name}", (string owner, string lora_name, HttpContext http) =>
            HandleAsync(http, Operations.Native, openAi: false, "/v1/inference/{owner}/{lora_name}", deployId: null, model: $"{owner}/{lora_name}"))
            .WithSummary("Run a LoRA (or a base model) by name (DeepInfra's native body)");

        foreach (var prefix in new[] { "/v1/openai", "/v1" })
        {
            var openAi = app.MapGroup(prefix).WithTags("OpenAI").RequireAuthorization();
            openAi.MapPost("/chat/completions", (HttpContext http) => HandleAsync(http, Operations.ChatCompletions, openAi: true, prefix + "/chat/completions", null, null))
                .WithSummary("OpenAI chat completions; model = owner/lora_name or a base model");
            openAi.MapPost("/completions", (HttpContext http) => HandleAsync(http, Operations.Completions, openAi: true, prefix + "/completions", null, null))
                .WithSummary("OpenAI completions (string or token-id prompt)");
            openAi.MapPost("/images/generations", (HttpContext http) => HandleAsync(http, Operations.ImagesGenerations, openAi: true, prefix + "/images/generations", null, null))
                .WithSummary("OpenAI image generation with a LoRA applied");
        }
        return app;
    }

    private static async Task HandleAsync(HttpContext http, string operation, bool openAi, string route, string? deployId, string? model)
    {
        var started = Stopwatch.GetTimestamp();
        var services = http.RequestServices;
        var metrics = services.GetRequiredService<InferenceMetrics>();
        try
        {
            await RunAsync(http, services, operation, openAi, deployId, model);
        }
        finally
        {
            metrics.Finished(route, http.Response.StatusCode, Stopwatch.GetElapsedTime(started));
        }
    }

    private static async Task RunAsync(HttpContext http, IServiceProvider services, string operation, bool openAi, string? deployId, string? model)
    {
        var options = services.GetRequiredService<IOptions<WorkersOptions>>().Value;
        var registry = services.GetRequiredService<BaseModelRegistry>();
        var ct = http.RequestAborted;
        var caller = CurrentUser.From(http.User);

        var body = await ReadBodyAsync(http, options.MaxRequestBytes, ct);
        if (body is null)
        {
            await ErrorAsync(http, openAi, StatusCodes.Status413PayloadTooLarge, $"Request body is larger than {options.MaxRequestBytes} bytes.", null);
            return;
        }
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(body, new JsonDocumentOptions { MaxDepth = 32 });
        }
        catch (JsonException)
        {
            await ErrorAsync(http, openAi, StatusCodes.Status422UnprocessableEntity, "The request body is not valid JSON.", "body");
            return;
        }
        // Read in place while this request runs (the worker gets the original bytes), rather than cloned per request.
        using var parsed = document;
        var json = document.RootElement;
        if (json.ValueKind != JsonValueKind.Object)
        {
            await ErrorAsync(http, openAi, StatusCodes.Status422UnprocessableEntity, "The request body must be a JSON object.", "body");
            return;
        }

        if (model is null && deployId is null)
        {
            if (!json.TryGetProperty("model", out var m) || m.ValueKind != JsonValueKind.String || m.GetString()!.Length is 0 or > 300)
            {
                await ErrorAsync(http, openAi, StatusCodes.Status422UnprocessableEntity, "model is required: owner/lora_name, or a base model name.", "model");
                return;
            }
            model = m.GetString()!;
        }
        var scale = 1f;
        if (json.TryGetProperty("lora_scale", out var s) && s.ValueKind == JsonValueKind.Number && s.TryGetSingle(out var requested))
        {
            scale = requested;
        }

        var contexts = services.GetRequiredService<IDbContextFactory<LoraDeployDbContext>>();
        var (target, problem) = deployId is not null
            ? await InferenceTargets.ResolveDeployAsync(contexts, registry, caller.Id, deployId, scale, ct)
            : await InferenceTargets.ResolveModelAsync(contexts, registry, caller.Id, model!, scale, ct);
        if (problem is null && json.TryGetProperty("loras", out var loras) && loras.ValueKind != JsonValueKind.Null)
        {
            (target, problem) = await InferenceTargets.AddAdaptersAsync(contexts, registry, caller.Id, target!, loras, ct);
        }
        if (problem is not null)
        {
            await ErrorAsync(http, openAi, problem.Status, problem.Message, problem.Param);
            return;
        }
        if (InferenceValidation.Check(operation, target!.Pool.Engine!, json) is { } invalid)
        {
            await ErrorAsync(http, openAi, StatusCodes.Status422UnprocessableEntity, invalid.Message, invalid.Param);
            return;
        }
        if (operation == Operations.ImagesGenerations && target.Pool.Engine != Engines.ComfyUi
            || operation is Operations.ChatCompletions or Operations.Completions && target.Pool.Engine != Engines.LlamaCpp)
        {
            await ErrorAsync(http, openAi, StatusCodes.Status422UnprocessableEntity,
                $"{target.Pool.Name} is served by the {target.Pool.Engine} engine, which does not answer {operation} requests.", "model");
            return;
        }

        Uri? webhook = null;
        if (operation == Operations.Native)
        {
            var allowed = services.GetRequiredService<IOptionsMonitor<Sources.NetworkOptions>>().CurrentValue.ParsedRanges();
            (webhook, var badHook) = InferenceWebhooks.Parse(json, allowed);
            if (badHook is not null)
            {
                await ErrorAsync(http, openAi, StatusCodes.Status422UnprocessableEntity, badHook.Message, badHook.Param);
                return;
            }
        }

        var router = services.GetRequiredService<InferenceRouter>();
        var (lease, refusal) = await router.AcquireAsync(target.Pool.Name, target.Adapters.Select(a => a.Sha256).ToList(), ct);
        if (lease is null)
        {
            if (refusal == RouteRefusal.RateLimited)
            {
                http.Response.Headers.RetryAfter = options.RetryAfterSeconds.ToString(System.Globalization.CultureInfo.InvariantCulture);
                await ErrorAsync(http, openAi, StatusCodes.Status429TooManyRequests, "Rate limited", null, rateLimited: true);
            }
            else
            {
                await ErrorAsync(http, openAi, StatusCodes.Status503ServiceUnavailable, $"No worker of {target.Pool.Name} is available right now; try again shortly.", null);
            }
            return;
        }
        var requestId = NewRequestId();
        // The named client's handler without HttpClient around it (as a reverse proxy forwards): an invoker returns once
        // the headers are in and adds no timeout or cancellation source of its own. Not disposed: the handler is the factory's.
        var client = new HttpMessageInvoker(services.GetRequiredService<IHttpMessageHandlerFactory>().CreateHandler(WorkerClientName), disposeHandler: false);
        var metrics = services.GetRequiredService<InferenceMetrics>();
        if (webhook is not null)
        {
            // The lease moves to the background call, which releases it when the worker is done.
            services.GetRequiredService<InferenceWebhooks>().Start(requestId, webhook, TimeSpan.FromSeconds(options.RequestTimeoutSeconds), lease,
                callCt => CallWorkerAsync(client, metrics, lease, target, operation, body, requestId, callCt));
            await http.Response.WriteAsJsonAsync(new QueuedAnswer(requestId, new InferenceStatus("queued", 0)), InferenceJsonContext.Default.QueuedAnswer);
            return;
        }
        using (lease)
        {
            await ProxyAsync(http, client, metrics, lease, target, operation, openAi, body, requestId, options);
        }
    }

    /// <summary>
    /// The one call to a worker, shared by the proxied and the webhook paths: the answer comes back once its headers
    /// have (the body is still to be read). Throws what <see cref="HttpMessageInvoker.SendAsync(HttpRequestMessage, CancellationToken)"/> throws.
    /// </summary>
    private static async Task<HttpResponseMessage> CallWorkerAsync(HttpMessageInvoker client, InferenceMetrics metrics, WorkerLease lease,
        InferenceTarget target, string operation, byte[] body, string requestId, CancellationToken ct)
    {
        // Not disposed here: the answer may arrive before the body is all sent, and the message holds only managed bytes.
        // Headers are added as they are (no parse and re-format): every value is ours and well-formed.
        var content = new ByteArrayContent(body);
        content.Headers.TryAddWithoutValidation("Content-Type", "application/json");
        var request = new HttpRequestMessage(HttpMethod.Post, lease.Worker.InferUri) { Content = content };
        request.Headers.TryAddWithoutValidation("Authorization", lease.Worker.Authorization);
        request.Headers.TryAddWithoutValidation(WorkerProtocol.OperationHeader, operation);
        request.Headers.TryAddWithoutValidation(WorkerProtocol.PoolHeader, target.Pool.Name);
        request.Headers.TryAddWithoutValidation(WorkerProtocol.AdaptersHeader, target.AdaptersHeader);
        request.Headers.TryAddWithoutValidation(WorkerProtocol.RequestIdHeader, requestId);
        var response = await client.SendAsync(request, ct);
        if (response.Headers.NonValidated.TryGetValues(WorkerProtocol.LoadedHeader, out var loaded))
        {
            var count = loaded.SelectMany(v => v.Split(',', StringSplitOptions.RemoveEmptyEntries)).Count();
            if (count > 0)
            {
                metrics.AdapterLoads(target.Pool.Name, count);
            }
        }
        return response;
    }

    /// <summary>
    /// Sends the request to the worker and streams its answer back as it comes. A worker that cannot be reached or drops
    /// the connection before answering → 503 at once; past <see cref="WorkersOptions.RequestTimeoutSeconds"/> → 504; a
    /// client that goes away cancels the call, and with it the work on the worker.
    /// </summary>
    private static async Task ProxyAsync(HttpContext http, HttpMessageInvoker client, InferenceMetrics metrics, WorkerLease lease, InferenceTarget target,
        string operation, bool openAi, byte[] body, string requestId, WorkersOptions options)
    {
        // One source for both ends of the call: the client leaving, or the timeout (told apart by RequestAborted).
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(http.RequestAborted);
        linked.CancelAfter(TimeSpan.FromSeconds(options.RequestTimeoutSeconds));

        HttpResponseMessage response;
        try
        {
            response = await CallWorkerAsync(client, metrics, lease, target, operation, body, requestId, linked.Token);
        }
        catch (OperationCanceledException) when (linked.IsCancellationRequested && !http.RequestAborted.IsCancellationRequested)
        {
            await ErrorAsync(http, openAi, StatusCodes.Status504GatewayTimeout, $"The request took longer than {options.RequestTimeoutSeconds} s; it was cancelled.", null);
            return;
        }
        catch (HttpRequestException)
        {
            await ErrorAsync(http, openAi, StatusCodes.Status503ServiceUnavailable, "The worker serving this request went away; try again.", null);
            return;
        }
        catch (OperationCanceledException) when (http.RequestAborted.IsCancellationRequested)
        {
            return; // the client left; the cancelled call told the worker
        }

        using (response)
        {
            http.Response.StatusCode = (int)response.StatusCode;
            // Passed on as the worker wrote them (NonValidated: no parse and re-format per request).
            if (response.Content.Headers.NonValidated.TryGetValues("Content-Type", out var contentType))
            {
                http.Response.ContentType = contentType.ToString();
            }
            if (response.Headers.NonValidated.TryGetValues("Cache-Control", out var cacheControl))
            {
                http.Response.Headers.CacheControl = cacheControl.ToString();
            }
            // A whole answer of known length goes out with that length (one write, no chunk framing); a stream (SSE)
            // has none and is flushed chunk by chunk as it arrives.
            var length = response.Content.Headers.ContentLength;
            if (length is not null)
            {
                http.Response.ContentLength = length;
            }
            var buffer = ArrayPool<byte>.Shared.Rent(16 * 1024);
            try
            {
                await using var stream = await response.Content.ReadAsStreamAsync(linked.Token);
                int read;
                while ((read = await stream.ReadAsync(buffer, linked.Token)) > 0)
                {
                    await http.Response.Body.WriteAsync(buffer.AsMemory(0, read), linked.Token);
                    if (length is null)
                    {
                        await http.Response.Body.FlushAsync(linked.Token);
                    }
                }
            }
            catch (Exception e) when (e is IOException or HttpRequestException or OperationCanceledException or InvalidOperationException)
            {
                // Headers are gone already: the only honest signal left is to cut the response short (Kestrel throws
                // InvalidOperationException when a worker's body does not match the length it announced).
                http.Abort();
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(buffer);
            }
        }
    }

    /// <summary>A fresh id for one inference call (<see cref="WorkerProtocol.RequestIdHeader"/>, answered as <c>request_id</c>).</summary>
    public static string NewRequestId() => Auth.ApiTokens.RandomId(24);

    private static async Task<byte[]?> ReadBodyAsync(HttpContext http, int limit, CancellationToken ct)
    {
        if (http.Request.ContentLength > limit)
        {
            return null;
        }
        if (http.Features.Get<Microsoft.AspNetCore.Http.Features.IHttpMaxRequestBodySizeFeature>() is { IsReadOnly: false } size)
        {
            size.MaxRequestBodySize = limit + 1L; // this route's own limit, not the server-wide one
        }
        using var memory = new MemoryStream(http.Request.ContentLength is { } announced ? (int)announced : 0);
        var chunk = ArrayPool<byte>.Shared.Rent(16 * 1024);
        try
        {
            int read;
            while ((read = await http.Request.Body.ReadAsync(chunk, ct)) > 0)
            {
                if (memory.Length + read > limit)
                {
                    return null;
                }
                memory.Write(chunk, 0, read);
            }
        }
        catch (BadHttpRequestException e) when (e.StatusCode == StatusCodes.Status413PayloadTooLarge)
        {
            return null;
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(chunk);
        }
        // The exact-size buffer a Content-Length gave is handed over as it is; otherwise copied out.
        return memory.Capacity == memory.Length ? memory.GetBuffer() : memory.ToArray();
    }

    private static Task ErrorAsync(HttpContext http, bool openAi, int status, string message, string? param, bool rateLimited = false) =>
        InferenceErrors.WriteAsync(http.Response, openAi, status, message, param, rateLimited);
}

public sealed record OpenAiError(string Message, string Type, string? Param, string? Code);

public sealed record OpenAiErrorBody(OpenAiError Error);

/// <summary>DeepInfra's <c>inference_status</c> (the fields we fill).</summary>
public sealed record InferenceStatus(string Status, long RuntimeMs);

/// <summary>The immediate answer to a native request with a <c>webhook</c>.</summary>
public sealed record QueuedAnswer(string RequestId, InferenceStatus InferenceStatus);

[System.Text.Json.Serialization.JsonSourceGenerationOptions(
    JsonSerializerDefaults.Web,
    PropertyNamingPolicy = System.Text.Json.Serialization.JsonKnownNamingPolicy.SnakeCaseLower,
    DefaultIgnoreCondition = System.Text.Json.Serialization.JsonIgnoreCondition.Never)]
[System.Text.Json.Serialization.JsonSerializable(typeof(OpenAiErrorBody))]
[System.Text.Json.Serialization.JsonSerializable(typeof(QueuedAnswer))]
public sealed partial class InferenceJsonContext : System.Text.Json.Serialization.JsonSerializerContext;
