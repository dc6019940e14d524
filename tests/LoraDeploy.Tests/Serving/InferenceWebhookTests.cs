using System.Collections.Concurrent;
using System.Net;
using System.Text.Json;
using System.Threading.Channels;
using LoraDeploy.Auth;
using LoraDeploy.Tests.Pipeline;
using LoraDeploy.Tests.Workers;
using LoraDeploy.Workers;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;

namespace LoraDeploy.Tests.Serving;

/// <summary>
/// DeepInfra's webhooks on the native route, against a real server, a <see cref="FakeWorker"/> and a webhook receiver
/// on loopback: the queued answer, the delivery with the same request id, retries on ≥ 400, bad URLs, and the SSRF guard.
/// </summary>
public sealed class InferenceWebhookTests : IAsyncLifetime
{
    private const string Pool = PipelineHarness.Flux;
    private readonly List<IAsyncDisposable> _owned = [];

    public ValueTask InitializeAsync() => ValueTask.CompletedTask;

    public async ValueTask DisposeAsync()
    {
        foreach (var owned in Enumerable.Reverse(_owned))
        {
            await owned.DisposeAsync();
        }
    }

    private async Task<(LoraDeployServer Server, TestUser User, FakeWorker Worker, CapturedLog Log)> StartAsync(bool allowLoopback = true, int timeoutSeconds = 5)
    {
        var settings = ServingCoreTests.PoolSettings();
        settings["Workers:RequestTimeoutSeconds"] = timeoutSeconds.ToString(System.Globalization.CultureInfo.InvariantCulture);
        settings["Webhooks:RetryBaseDelay"] = "00:00:00.050";
        settings["Webhooks:MaxRetryAttempts"] = "3";
        if (allowLoopback)
        {
            settings["Network:AllowedPrivateRanges:0"] = "127.0.0.0/8";
        }
        var log = new CapturedLog();
        var server = await LoraDeployServer.StartAsync(settings: settings, configure: b => b.Logging.AddProvider(log));
        _owned.Add(server);
        var token = await server.QueryAsync(db => WorkerTokens.CreateAsync(db, "gpu-box", DateTime.UtcNow, CancellationToken.None));
        var worker = await FakeWorker.StartAsync(server.BaseUrl, token, "w1", Pool);
        _owned.Add(worker);
        return (server, await server.CreateUserAsync("hooker"), worker, log);
    }

    /// <summary>Posts until a worker is routable (it registers asynchronously), then returns the answer.</summary>
    private static async Task<HttpResponseMessage> InferAsync(TestUser user, object body)
    {
        var deadline = DateTime.UtcNow.AddSeconds(10);
        while (true)
        {
            var response = await user.Client.PostJsonAsync($"/v1/inference/{Pool}", body);
            if (response.StatusCode != HttpStatusCode.ServiceUnavailable || DateTime.UtcNow > deadline)
            {
                return response;
            }
            await Task.Delay(50);
        }
    }

    private static Func<HttpContext, Task> ImageAnswer(Task? release = null, ConcurrentQueue<string>? seenIds = null) => async http =>
    {
        var id = http.Request.Headers[WorkerProtocol.RequestIdHeader].ToString();
        seenIds?.Enqueue(id);
        if (release is not null)
        {
            await release.WaitAsync(TimeSpan.FromSeconds(10));
        }
        await http.Response.WriteAsJsonAsync(new
        {
            images = new[] { "data:image/png;base64,iVBORw0KGgo=" },
            nsfw_content_detected = new[] { false },
            seed = 1234,
            request_id = id,
            inference_status = new { status = "succeeded", runtime_ms = 5 },
        });
    };

    [Fact]
    public async Task Queued_at_once_then_the_result_reaches_the_webhook_with_the_same_request_id()
    {
        var (_, user, worker, _) = await StartAsync();
        await using var receiver = await WebhookReceiver.StartAsync();
        var release = new TaskCompletionSource();
        var seenIds = new ConcurrentQueue<string>();
        worker.Answer = ImageAnswer(release.Task, seenIds);

        // The worker holds its answer until the queued answer is in: "at once" is not a matter of timing.
        var queued = await (await InferAsync(user, new { prompt = "a cat", webhook = receiver.Url + "?secret=s3" })).ExpectAsync(HttpStatusCode.OK);
        var requestId = queued.GetProperty("request_id").GetString()!;
        Assert.False(string.IsNullOrEmpty(requestId));
        Assert.Equal("queued", queued.GetProperty("inference_status").GetProperty("status").GetString());
        Assert.Equal(0, queued.GetProperty("inference_status").GetProperty("runtime_ms").GetInt64());
        release.SetResult();

        var delivered = await receiver.NextAsync();
        Assert.Equal(requestId, delivered.GetProperty("request_id").GetString());
        Assert.Equal("succeeded", delivered.GetProperty("inference_status").GetProperty("status").GetString());
        Assert.True(delivered.GetProperty("inference_status").GetProperty("runtime_ms").GetInt64() >= 0);
        Assert.Equal("data:image/png;base64,iVBORw0KGgo=", delivered.GetProperty("images")[0].GetString());
        Assert.Equal(1234, delivered.GetProperty("seed").GetInt64());
        Assert.Equal([requestId], seenIds);
        Assert.Equal("s3", receiver.LastQuery["secret"]);
        Assert.Equal(1, receiver.Attempts);
    }

    [Fact]
    public async Task A_receiver_answering_500_twice_gets_a_third_attempt_that_is_delivered()
    {
        var (_, user, worker, _) = await StartAsync();
        await using var receiver = await WebhookReceiver.StartAsync(500, 500, 200);
        worker.Answer = ImageAnswer();

        var queued = await (await InferAsync(user, new { prompt = "a cat", webhook = receiver.Url })).ExpectAsync(HttpStatusCode.OK);
        var delivered = await receiver.NextAsync(skipFailed: true);
        Assert.Equal(queued.GetProperty("request_id").GetString(), delivered.GetProperty("request_id").GetString());
        Assert.Equal(3, receiver.Attempts);
        await Task.Delay(300); // no fourth attempt after the 200
        Assert.Equal(3, receiver.Attempts);
    }

    [Fact]
    public async Task A_failing_worker_is_delivered_as_failed_with_its_error()
    {
        var (_, user, worker, _) = await StartAsync();
        await using var receiver = await WebhookReceiver.StartAsync();
        worker.Answer = async http =>
        {
            http.Response.StatusCode = 502;
            await http.Response.WriteAsJsonAsync(new { error = "ComfyUI rejected the graph: value_not_in_list" });
        };

        var queued = await (await InferAsync(user, new { prompt = "a cat", webhook = receiver.Url })).ExpectAsync(HttpStatusCode.OK);
        var delivered = await receiver.NextAsync();
        Assert.Equal(queued.GetProperty("request_id").GetString(), delivered.GetProperty("request_id").GetString());
        Assert.Equal("failed", delivered.GetProperty("inference_status").GetProperty("status").GetString());
        Assert.Equal("ComfyUI rejected the graph: value_not_in_list", delivered.GetProperty("error").GetString());
        Assert.False(delivered.TryGetProperty("images", out _));
    }

    [Fact]
    public async Task A_worker_past_the_request_timeout_is_cancelled_and_delivered_as_failed()
    {
        var (_, user, worker, _) = await StartAsync(timeoutSeconds: 1);
        await using var receiver = await WebhookReceiver.StartAsync();
        var cancelled = new TaskCompletionSource();
        worker.Answer = async http =>
        {
            try
            {
                await Task.Delay(TimeSpan.FromSeconds(30), http.RequestAborted);
            }
            catch (OperationCanceledException)
            {
                cancelled.TrySetResult();
            }
        };

        var queued = await (await InferAsync(user, new { prompt = "a cat", webhook = receiver.Url })).ExpectAsync(HttpStatusCode.OK);
        var delivered = await receiver.NextAsync();
        Assert.Equal(queued.GetProperty("request_id").GetString(), delivered.GetProperty("request_id").GetString());
        Assert.Equal("failed", delivered.GetProperty("inference_status").GetProperty("status").GetString());
        Assert.Equal("The request took longer than 1 s; it was cancelled.", delivered.GetProperty("error").GetString());
        await cancelled.Task.WaitAsync(TimeSpan.FromSeconds(10)); // the worker was told
    }

    [Theory]
    [InlineData("\"ftp://example.com/hook\"", "webhook")]
    [InlineData("\"not a url\"", "webhook")]
    [InlineData("\"/relative/hook\"", "webhook")]
    [InlineData("42", "webhook")]
    [InlineData("\"LONG\"", "webhook")]
    [InlineData("\"http://10.1.2.3/hook\"", "webhook")]
    [InlineData("\"http://[fd00::1]/hook\"", "webhook")]
    public async Task A_bad_webhook_is_422_naming_it(string webhook, string named)
    {
        var (_, user, worker, _) = await StartAsync();
        webhook = webhook.Replace("LONG", "https://example.com/" + new string('a', 2000));
        var response = await InferAsync(user, JsonDocument.Parse($$"""{"prompt":"a cat","webhook":{{webhook}}}""").RootElement);
        var error = await response.ExpectErrorAsync(HttpStatusCode.UnprocessableEntity);
        Assert.StartsWith(named, error);
        Assert.Equal(0, worker.Requests);
    }

    [Fact]
    public async Task Stream_with_a_webhook_is_422_naming_stream()
    {
        var (_, user, worker, _) = await StartAsync();
        var response = await InferAsync(user, new { prompt = "a cat", stream = true, webhook = "https://example.com/hook" });
        Assert.StartsWith("stream", await response.ExpectErrorAsync(HttpStatusCode.UnprocessableEntity));
        Assert.Equal(0, worker.Requests);
    }

    [Fact]
    public async Task The_guard_refuses_a_private_webhook_at_request_time_or_at_delivery()
    {
        var (_, user, worker, log) = await StartAsync(allowLoopback: false);
        await using var receiver = await WebhookReceiver.StartAsync();
        worker.Answer = ImageAnswer();

        // A literal loopback address is refused before anything runs.
        var literal = await InferAsync(user, new { prompt = "a cat", webhook = receiver.Url });
        Assert.Contains("loopback", await literal.ExpectErrorAsync(HttpStatusCode.UnprocessableEntity));

        // A name is only resolved at delivery, where the guard refuses it and says so in the log.
        var byName = receiver.Url.Replace("127.0.0.1", "localhost");
        var queued = await (await InferAsync(user, new { prompt = "a cat", webhook = byName })).ExpectAsync(HttpStatusCode.OK);
        var requestId = queued.GetProperty("request_id").GetString()!;
        var deadline = DateTime.UtcNow.AddSeconds(10);
        while (!log.Entries.Any(e => e.Message.Contains(requestId) && e.Message.Contains("refused by the outbound guard")))
        {
            Assert.True(DateTime.UtcNow < deadline, "No refusal logged: " + string.Join("\n", log.Entries.Select(e => e.Message)));
            await Task.Delay(50);
        }
        Assert.Equal(1, worker.Requests);
        Assert.Equal(0, receiver.Attempts);
    }
}

/// <summary>A webhook receiver on loopback answering the statuses it was given in turn (then 200), keeping what came.</summary>
internal sealed class WebhookReceiver : IAsyncDisposable
{
    private readonly WebApplication _app;
    private readonly Channel<(int Status, JsonElement Body)> _received = Channel.CreateUnbounded<(int, JsonElement)>();
    private readonly int[] _statuses;
    private int _attempts;

    private WebhookReceiver(WebApplication app, int[] statuses)
    {
        _app = app;
        _statuses = statuses;
    }

    public string Url { get; private set; } = "";
    public int Attempts => _attempts;
    public IQueryCollection LastQuery { get; private set; } = QueryCollection.Empty;

    public static async Task<WebhookReceiver> StartAsync(params int[] statuses)
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.WebHost.UseUrls("http://127.0.0.1:0");
        builder.Logging.ClearProviders();
        var app = builder.Build();
        var receiver = new WebhookReceiver(app, statuses);
        app.MapPost("/hook", receiver.ReceiveAsync);
        await app.StartAsync();
        receiver.Url = app.Urls.First() + "/hook";
        return receiver;
    }

    private async Task ReceiveAsync(HttpContext http)
    {
        var attempt = Interlocked.Increment(ref _attempts);
        var status = attempt <= _statuses.Length ? _statuses[attempt - 1] : 200;
        LastQuery = http.Request.Query;
        using var body = await JsonDocument.ParseAsync(http.Request.Body);
        await _received.Writer.WriteAsync((status, body.RootElement.Clone()));
        http.Response.StatusCode = status;
    }

    /// <summary>The next body received (with <paramref name="skipFailed"/>, the next one answered 2xx).</summary>
    public async Task<JsonElement> NextAsync(bool skipFailed = false)
    {
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(15));
        while (true)
        {
            var (status, body) = await _received.Reader.ReadAsync(timeout.Token);
            if (!skipFailed || status < 400)
            {
                return body;
            }
        }
    }

    public async ValueTask DisposeAsync() => await _app.DisposeAsync();
}
