using System.Collections.Concurrent;
using System.ComponentModel.DataAnnotations;
using System.Net;
using System.Net.Http.Headers;
using System.Text.Json;
using LoraDeploy.Sources;
using Microsoft.Extensions.Http.Resilience;
using Microsoft.Extensions.Options;
using Polly;
using Polly.Timeout;

namespace LoraDeploy.Inference;

/// <summary>Settings section <c>Webhooks</c>: how results are delivered to a native request's <c>webhook</c>.</summary>
public sealed class WebhookOptions
{
    public const string Section = "Webhooks";

    /// <summary>Deliveries tried again after the first when the receiver answers ≥ 400 or cannot be reached.</summary>
    [Range(0, 10)]
    public int MaxRetryAttempts { get; set; } = 4;

    /// <summary>First wait between attempts; doubles each time (with jitter).</summary>
    public TimeSpan RetryBaseDelay { get; set; } = TimeSpan.FromSeconds(2);

    /// <summary>One delivery attempt's limit.</summary>
    public TimeSpan AttemptTimeout { get; set; } = TimeSpan.FromSeconds(30);
}

/// <summary>
/// DeepInfra's webhooks on the native routes: the client gets <c>queued</c> at once, the routed worker call runs here in
/// the background (bounded by <c>Workers:RequestTimeoutSeconds</c> and by host shutdown, not by the client's
/// connection), and its result is POSTed to the webhook as
/// <c>{request_id, inference_status:{status, runtime_ms}, …the native answer's fields}</c> (<c>error</c> on failure),
/// retried with backoff while the receiver answers ≥ 400 or cannot be reached. Deliveries go through the SSRF guard.
/// The queue is in memory: a server restart loses the requests and webhooks not delivered yet.
/// </summary>
public sealed partial class InferenceWebhooks(IHttpClientFactory clients, TimeProvider time, ILogger<InferenceWebhooks> logger) : IHostedService, IDisposable
{
    public const string ClientName = "LoraDeploy.Webhooks";
    public const int MaxUrlLength = 2000;

    private readonly CancellationTokenSource _stopping = new();
    private readonly ConcurrentDictionary<Task, bool> _running = new();

    /// <summary>The webhook named by a native body, or why it cannot be used (422 naming <c>webhook</c>). Null/absent = none.</summary>
    public static (Uri? Webhook, InvalidParameter? Invalid) Parse(JsonElement body, IReadOnlyList<IPNetwork> allowedPrivate)
    {
        if (!body.TryGetProperty("webhook", out var value) || value.ValueKind == JsonValueKind.Null)
        {
            return (null, null);
        }
        if (value.ValueKind != JsonValueKind.String || value.GetString() is not { Length: > 0 and <= MaxUrlLength } text
            || !Uri.TryCreate(text, UriKind.Absolute, out var uri) || uri.Scheme is not ("http" or "https") || uri.Host.Length == 0)
        {
            return (null, new("webhook", $"webhook must be an absolute http(s) URL of at most {MaxUrlLength} characters."));
        }
        if (body.TryGetProperty("stream", out var stream) && stream.ValueKind == JsonValueKind.True)
        {
            return (null, new("stream", "stream cannot be combined with webhook: the result is delivered to the webhook."));
        }
        // A literal address is judged now; a name is judged by the guard when it is resolved at delivery.
        if (uri.HostNameType is UriHostNameType.IPv4 or UriHostNameType.IPv6
            && IPAddress.TryParse(uri.Host.Trim('[', ']'), out var address)
            && AddressPolicy.Check(address, allowedPrivate) is { } category)
        {
            return (null, new("webhook", $"webhook points at {address}, a {category} address; webhooks are delivered only to public addresses (or ones listed in Network:AllowedPrivateRanges)."));
        }
        return (uri, null);
    }

    /// <summary>
    /// Runs <paramref name="callWorker"/> in the background and delivers its outcome to <paramref name="webhook"/>.
    /// <paramref name="lease"/> (the routed worker's slot) is released when the call ends.
    /// </summary>
    public void Start(string requestId, Uri webhook, TimeSpan timeout, IDisposable lease,
        Func<CancellationToken, Task<HttpResponseMessage>> callWorker)
    {
        var task = Task.Run(() => RunAsync(requestId, webhook, timeout, lease, callWorker));
        _running[task] = true;
        task.ContinueWith(t => _running.TryRemove(t, out _), TaskScheduler.Default);
    }

    private async Task RunAsync(string requestId, Uri webhook, TimeSpan timeout, IDisposable lease,
        Func<CancellationToken, Task<HttpResponseMessage>> callWorker)
    {
        try
        {
            var started = time.GetTimestamp();
            var (answer, error) = await CallAsync(timeout, lease, callWorker);
            var runtime = (long)time.GetElapsedTime(started).TotalMilliseconds;
            if (_stopping.IsCancellationRequested)
            {
                LogLostAtShutdown(requestId, Redact(webhook));
                return;
            }
            await DeliverAsync(requestId, webhook, Payload(requestId, runtime, answer, error));
        }
        catch (OperationCanceledException) when (_stopping.IsCancellationRequested)
        {
            LogLostAtShutdown(requestId, Redact(webhook));
        }
#pragma warning disable CA1031 // a background job has no caller to throw to: it logs
        catch (Exception e)
#pragma warning restore CA1031
        {
            LogUnexpected(e, requestId);
        }
    }

    private async Task<(JsonElement? Answer, string? Error)> CallAsync(TimeSpan timeout, IDisposable lease,
        Func<CancellationToken, Task<HttpResponseMessage>> callWorker)
    {
        using var deadline = new CancellationTokenSource(timeout, time);
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(_stopping.Token, deadline.Token);
        try
        {
            using (lease)
            using (var response = await callWorker(linked.Token))
            {
                var bytes = await response.Content.ReadAsByteArrayAsync(linked.Token);
                JsonElement? json = null;
                try
                {
                    using var document = JsonDocument.Parse(bytes);
                    json = document.RootElement.Clone();
                }
                catch (JsonException)
                {
                }
                if (response.IsSuccessStatusCode && json is { ValueKind: JsonValueKind.Object })
                {
                    return (json, null);
                }
                var said = json is { ValueKind: JsonValueKind.Object } j && j.TryGetProperty("error", out var e) && e.ValueKind == JsonValueKind.String
                    ? e.GetString()!
                    : $"The worker answered {(int)response.StatusCode} without a JSON answer.";
                return (null, said);
            }
        }
        catch (OperationCanceledException) when (deadline.IsCancellationRequested && !_stopping.IsCancellationRequested)
        {
            return (null, $"The request took longer than {timeout.TotalSeconds:0} s; it was cancelled.");
        }
        catch (HttpRequestException)
        {
            return (null, "The worker serving this request went away.");
        }
        catch (IOException)
        {
            return (null, "The worker serving this request went away.");
        }
    }

    private static byte[] Payload(string requestId, long runtimeMs, JsonElement? answer, string? error)
    {
        using var buffer = new MemoryStream();
        using (var json = new Utf8JsonWriter(buffer))
        {
            json.WriteStartObject();
            json.WriteString("request_id", requestId);
            json.WriteStartObject("inference_status");
            json.WriteString("status", answer is null ? "failed" : "succeeded");
            json.WriteNumber("runtime_ms", runtimeMs);
            json.WriteEndObject();
            if (answer is { } a)
            {
                foreach (var property in a.EnumerateObject().Where(p => p.Name is not ("request_id" or "inference_status")))
                {
                    property.WriteTo(json);
                }
            }
            else
            {
                json.WriteString("error", error);
            }
            json.WriteEndObject();
        }
        return buffer.ToArray();
    }

    private async Task DeliverAsync(string requestId, Uri webhook, byte[] payload)
    {
        var client = clients.CreateClient(ClientName);
        using var request = new HttpRequestMessage(HttpMethod.Post, webhook)
        {
            Content = new ByteArrayContent(payload) { Headers = { ContentType = new MediaTypeHeaderValue("application/json") } },
        };
        try
        {
            using var response = await client.SendAsync(request, _stopping.Token);
            if ((int)response.StatusCode >= 400)
            {
                LogGaveUp(requestId, Redact(webhook), $"it answered {(int)response.StatusCode}");
            }
        }
        catch (HttpRequestException e) when (e.InnerException is OutboundRequestRefusedException refused)
        {
            LogRefused(requestId, Redact(webhook), refused.Message);
        }
        catch (Exception e) when (e is HttpRequestException or TimeoutRejectedException or IOException)
        {
            LogGaveUp(requestId, Redact(webhook), e.Message);
        }
        catch (OperationCanceledException) when (_stopping.IsCancellationRequested)
        {
            LogLostAtShutdown(requestId, Redact(webhook));
        }
    }

    /// <summary>Scheme, host and path: a query string may carry the receiver's secret.</summary>
    private static string Redact(Uri uri) => uri.GetLeftPart(UriPartial.Path);

    public Task StartAsync(CancellationToken cancellationToken) => Task.CompletedTask;

    /// <summary>Cancels what is still running and waits for it to end (within the host's shutdown timeout).</summary>
    public async Task StopAsync(CancellationToken cancellationToken)
    {
        await _stopping.CancelAsync();
        try
        {
            await Task.WhenAll(_running.Keys).WaitAsync(cancellationToken);
        }
        catch (OperationCanceledException)
        {
        }
    }

    public void Dispose() => _stopping.Dispose();

    [LoggerMessage(Level = LogLevel.Warning, Message = "Webhook for request {RequestId} to {Webhook} refused by the outbound guard: {Reason}")]
    private partial void LogRefused(string requestId, string webhook, string reason);

    [LoggerMessage(Level = LogLevel.Warning, Message = "Webhook for request {RequestId} to {Webhook} not delivered after every attempt: {Reason}")]
    private partial void LogGaveUp(string requestId, string webhook, string reason);

    [LoggerMessage(Level = LogLevel.Warning, Message = "Webhook for request {RequestId} to {Webhook} lost: the server shut down first")]
    private partial void LogLostAtShutdown(string requestId, string webhook);

    [LoggerMessage(Level = LogLevel.Error, Message = "Webhook request {RequestId} failed unexpectedly")]
    private partial void LogUnexpected(Exception e, string requestId);
}

public static class InferenceWebhooksServiceCollectionExtensions
{
    /// <summary>The webhook sender and its guarded client: SSRF guard at connect, no redirects, one retry policy.</summary>
    public static IServiceCollection AddInferenceWebhooks(this IServiceCollection services, IConfiguration configuration)
    {
        services.AddOptions<WebhookOptions>().Bind(configuration.GetSection(WebhookOptions.Section)).ValidateDataAnnotations().ValidateOnStart();
        services.AddSingleton<InferenceWebhooks>();
        services.AddHostedService(sp => sp.GetRequiredService<InferenceWebhooks>());
        services.AddHttpClient(InferenceWebhooks.ClientName, client =>
            {
                client.DefaultRequestHeaders.UserAgent.Add(SourcesServiceCollectionExtensions.UserAgent);
                client.Timeout = Timeout.InfiniteTimeSpan; // attempts are bounded by the pipeline
            })
            .ConfigurePrimaryHttpMessageHandler(sp => new SocketsHttpHandler
            {
                AllowAutoRedirect = false, // a redirect could point anywhere; the guard checks the first hop only
                UseCookies = false,
                UseProxy = false, // a proxy would connect on our behalf and bypass the address check
                ConnectTimeout = sp.GetRequiredService<IOptions<NetworkOptions>>().Value.ConnectTimeout,
                PooledConnectionLifetime = TimeSpan.FromMinutes(5),
                ConnectCallback = sp.GetRequiredService<OutboundConnectGuard>().ConnectAsync,
            })
            .AddResilienceHandler("webhook-retry", static (pipeline, context) =>
            {
                var options = context.ServiceProvider.GetRequiredService<IOptions<WebhookOptions>>().Value;
                if (options.MaxRetryAttempts > 0)
                {
                    pipeline.AddRetry(new HttpRetryStrategyOptions
                    {
                        MaxRetryAttempts = options.MaxRetryAttempts,
                        BackoffType = DelayBackoffType.Exponential,
                        UseJitter = true,
                        Delay = options.RetryBaseDelay,
                        // DeepInfra retries on any answer ≥ 400; a refused address will not change its mind.
                        ShouldHandle = new PredicateBuilder<HttpResponseMessage>()
                            .Handle<HttpRequestException>(e => e.InnerException is not OutboundRequestRefusedException)
                            .Handle<TimeoutRejectedException>()
                            .HandleResult(r => (int)r.StatusCode >= 400),
                    });
                }
                pipeline.AddTimeout(options.AttemptTimeout);
            });
        return services;
    }
}
