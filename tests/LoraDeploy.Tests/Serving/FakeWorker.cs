using System.Collections.Concurrent;
using System.Net;
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Security.Cryptography;
using System.Text.Json;
using LoraDeploy.Workers;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;

namespace LoraDeploy.Tests.Serving;

/// <summary>
/// A test worker speaking the worker protocol to a real server over loopback, with no engine: holding an adapter is
/// fetching its blob (checked against its hash), and answering a request is echoing what the server sent. It checks
/// the server's side — placement, routing, proxying, visibility — without a model; the real worker and engine have
/// their own tests.
/// </summary>
public sealed class FakeWorker : IAsyncDisposable
{
    private readonly WebApplication _app;
    private readonly HttpClient _server;
    private readonly CancellationTokenSource _stop = new();
    private readonly string _callKey = Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(24));
    private Task _agent = Task.CompletedTask;

    /// <summary>Adapters it holds, by sha: state and reason.</summary>
    public ConcurrentDictionary<string, (string Pool, string State, string? Reason)> Resident { get; } = new();
    /// <summary>Adapters the engine "refuses", with the reason it gives.</summary>
    public ConcurrentDictionary<string, string> Refuse { get; } = new();
    public ConcurrentQueue<string> Drops { get; } = new();
    /// <summary>When set, answers inference requests instead of the echo (after auth and adapter loading).</summary>
    public Func<HttpContext, Task>? Answer { get; set; }
    public int Requests => _requests;
    public int Cancelled => _cancelled;
    public string Id { get; }
    public string Url { get; private set; } = "";

    private int _requests;
    private int _cancelled;

    private FakeWorker(string id, WebApplication app, HttpClient server)
    {
        Id = id;
        _app = app;
        _server = server;
    }

    public static async Task<FakeWorker> StartAsync(Uri server, string workerToken, string id, string pool, string engine = "comfyui", int slots = 2)
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.WebHost.UseUrls("http://127.0.0.1:0");
        builder.Logging.ClearProviders();
        var app = builder.Build();
        var client = new HttpClient { BaseAddress = server };
        client.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", workerToken);
        var worker = new FakeWorker(id, app, client);
        app.MapPost(WorkerProtocol.InferPath, worker.InferAsync);
        await app.StartAsync();
        worker.Url = app.Urls.First();
        worker._registration = new WorkerRegistration(id, engine, [pool], slots, worker.Url, "test", worker._callKey);
        await worker.RegisterAsync();
        worker._agent = worker.HeartbeatLoopAsync();
        return worker;
    }

    /// <summary>A graceful stop, in the real worker's order: heartbeats end, the worker says it leaves, then stops.</summary>
    public async Task<HttpStatusCode> LeaveAsync()
    {
        // A heartbeat after the leave would be answered 404 and register the worker again.
        await _stop.CancelAsync();
        await _agent;
        var response = await _server.PostAsync(string.Format(WorkerProtocol.LeavePathFormat, Id), null);
        await _app.StopAsync(TimeSpan.Zero);
        return response.StatusCode;
    }

    /// <summary>What SIGKILL does to a worker: no more heartbeats, and open connections reset.</summary>
    public async Task KillAsync()
    {
        await _stop.CancelAsync();
        await _app.StopAsync(TimeSpan.Zero);
        await _agent;
    }

    public async ValueTask DisposeAsync()
    {
        if (!_stop.IsCancellationRequested)
        {
            await KillAsync();
        }
        await _app.DisposeAsync();
        _server.Dispose();
    }

    private WorkerRegistration _registration = null!;

    private async Task RegisterAsync() =>
        (await _server.PostAsJsonAsync(WorkerProtocol.RegisterPath, _registration, WorkerJsonContext.Default.WorkerRegistration)).EnsureSuccessStatusCode();

    private async Task HeartbeatLoopAsync()
    {
        while (!_stop.IsCancellationRequested)
        {
            try
            {
                var report = Resident.Select(r => new ResidentAdapter(r.Key, r.Value.Pool, r.Value.State, r.Value.Reason)).ToList();
                var response = await _server.PostAsJsonAsync(string.Format(WorkerProtocol.HeartbeatPathFormat, Id),
                    new WorkerHeartbeat(0, 0, report), WorkerJsonContext.Default.WorkerHeartbeat, _stop.Token);
                if (response.StatusCode == HttpStatusCode.NotFound)
                {
                    // Forgotten (a heartbeat came later than Workers:TimeoutSeconds on a busy machine): register
                    // again, as the real worker does.
                    await RegisterAsync();
                }
                else if (response.IsSuccessStatusCode)
                {
                    var assignments = (await response.Content.ReadFromJsonAsync(WorkerJsonContext.Default.WorkerAssignments, _stop.Token))!;
                    foreach (var sha in assignments.Drop)
                    {
                        // Recorded first: a test that sees the adapter gone may look for its drop at once.
                        Drops.Enqueue(sha);
                        Resident.TryRemove(sha, out _);
                    }
                    foreach (var hold in assignments.Hold.Where(h => !Resident.ContainsKey(h.Sha256)))
                    {
                        await LoadAsync(hold.Sha256, hold.Pool);
                    }
                }
                await Task.Delay(150, _stop.Token);
            }
            catch (OperationCanceledException)
            {
                return;
            }
            catch (HttpRequestException)
            {
                await Task.Delay(150);
            }
        }
    }

    private async Task LoadAsync(string sha, string pool)
    {
        var bytes = await _server.GetByteArrayAsync(string.Format(WorkerProtocol.BlobPathFormat, sha));
        var actual = Convert.ToHexStringLower(SHA256.HashData(bytes));
        Resident[sha] = actual != sha
            ? (pool, "failed", $"the bytes served for {sha} hash to {actual}")
            : Refuse.TryGetValue(sha, out var reason) ? (pool, "failed", reason) : (pool, "ready", null);
    }

    private async Task InferAsync(HttpContext http)
    {
        if (http.Request.Headers.Authorization.ToString() != $"Bearer {_callKey}")
        {
            http.Response.StatusCode = 401;
            return;
        }
        Interlocked.Increment(ref _requests);
        var pool = Uri.UnescapeDataString(http.Request.Headers[WorkerProtocol.PoolHeader].ToString());
        var adapters = http.Request.Headers[WorkerProtocol.AdaptersHeader].ToString();
        var loaded = new List<string>();
        foreach (var sha in adapters.Split(',', StringSplitOptions.RemoveEmptyEntries).Select(a => a.Split(':')[0]))
        {
            if (!Resident.ContainsKey(sha))
            {
                await LoadAsync(sha, pool);
                loaded.Add(sha);
            }
        }
        http.Response.Headers[WorkerProtocol.LoadedHeader] = string.Join(',', loaded);
        if (Answer is { } answer)
        {
            await answer(http);
            return;
        }
        using var body = await JsonDocument.ParseAsync(http.Request.Body);
        var sleep = body.RootElement.TryGetProperty("sleep_ms", out var ms) ? ms.GetInt32() : 0;
        try
        {
            if (body.RootElement.TryGetProperty("stream", out var stream) && stream.GetBoolean())
            {
                http.Response.ContentType = "text/event-stream";
                for (var i = 0; i < 3; i++)
                {
                    await http.Response.WriteAsync($"data: {{\"chunk\":{i}}}\n\n", http.RequestAborted);
                    await http.Response.Body.FlushAsync(http.RequestAborted);
                    await Task.Delay(sleep, http.RequestAborted);
                }
                await http.Response.WriteAsync("data: [DONE]\n\n", http.RequestAborted);
                return;
            }
            await Task.Delay(sleep, http.RequestAborted);
        }
        catch (OperationCanceledException)
        {
            Interlocked.Increment(ref _cancelled);
            return;
        }
        await http.Response.WriteAsJsonAsync(new Dictionary<string, string>
        {
            ["worker"] = Id,
            ["operation"] = http.Request.Headers[WorkerProtocol.OperationHeader].ToString(),
            ["pool"] = pool,
            ["adapters"] = adapters,
        });
    }
}
