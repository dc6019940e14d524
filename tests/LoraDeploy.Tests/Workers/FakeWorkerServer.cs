using System.Collections.Concurrent;
using System.Net.Http.Headers;
using System.Security.Cryptography;
using System.Text.Json;
using LoraDeploy.Workers;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;

namespace LoraDeploy.Tests.Workers;

/// <summary>
/// The server side of the worker protocol, minimal: the three worker → server routes of <see cref="WorkerProtocol"/>
/// on loopback Kestrel, recording every call, answering heartbeats with <see cref="Assignments"/>, and serving blobs
/// with Range (optionally dropping the first connection midway, or serving bytes that do not match their hash).
/// </summary>
public sealed class FakeWorkerServer : IAsyncDisposable
{
    /// <summary>A well-formed worker token (this fake checks only that the worker presents it).</summary>
    public const string Token = "ldw_abcdefghijkl_0123456789abcdefghijklmnopqrstuvwxyzABCDEFG";

    private readonly WebApplication _app;
    private readonly ConcurrentDictionary<string, byte[]> _blobs = new();
    private int _forgetNextHeartbeat;
    private int _dropNextBlobAfter = -1;

    private FakeWorkerServer(WebApplication app) => _app = app;

    public string Url => _app.Urls.First();

    public ConcurrentQueue<WorkerRegistration> Registrations { get; } = new();

    public ConcurrentQueue<(string Id, WorkerHeartbeat Beat)> Heartbeats { get; } = new();

    /// <summary>Workers that said they stop (<see cref="WorkerProtocol.LeavePathFormat"/>).</summary>
    public ConcurrentQueue<string> Left { get; } = new();

    /// <summary>The Range header (or null) of every blob request, in order.</summary>
    public ConcurrentQueue<string?> BlobRanges { get; } = new();

    public ConcurrentQueue<string?> Unauthorized { get; } = new();

    /// <summary>While set, heartbeats are answered 503 (and counted in <see cref="RefusedHeartbeats"/>).</summary>
    public bool Unavailable { get; set; }

    public int RefusedHeartbeats => Volatile.Read(ref _refusedHeartbeats);

    private int _refusedHeartbeats;

    /// <summary>What every heartbeat is answered with.</summary>
    public WorkerAssignments Assignments { get; set; } = new([], []);

    private readonly Dictionary<string, WorkerAssignments> _answered = [];
    private readonly HashSet<WorkerAssignments> _delivered = new(ReferenceEqualityComparer.Instance);

    /// <summary>
    /// Whether a worker has applied <paramref name="assignments"/> (this instance, as set on <see cref="Assignments"/>):
    /// it heartbeated again after an answer that carried them.
    /// </summary>
    public bool Applied(WorkerAssignments assignments)
    {
        lock (_answered)
        {
            return _delivered.Contains(assignments);
        }
    }

    /// <summary>The heartbeat period the registration answer gives (seconds).</summary>
    public int HeartbeatSeconds { get; set; } = 1;

    public static async Task<FakeWorkerServer> StartAsync()
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.WebHost.UseUrls("http://127.0.0.1:0");
        builder.Logging.ClearProviders();
        var app = builder.Build();
        var server = new FakeWorkerServer(app);
        app.Use(async (http, next) =>
        {
            if (http.Request.Headers.Authorization != $"Bearer {Token}")
            {
                server.Unauthorized.Enqueue(http.Request.Path);
                http.Response.StatusCode = StatusCodes.Status401Unauthorized;
                return;
            }
            await next(http);
        });
        app.MapPost(WorkerProtocol.RegisterPath, async (HttpContext http) =>
        {
            var registration = await JsonSerializer.DeserializeAsync(http.Request.Body, WorkerJsonContext.Default.WorkerRegistration);
            server.Registrations.Enqueue(registration!);
            return Results.Json(new WorkerRegistered(registration!.Id, server.HeartbeatSeconds), WorkerJsonContext.Default.WorkerRegistered);
        });
        app.MapPost("/internal/v1/workers/{id}/heartbeat", async (string id, HttpContext http) =>
        {
            var beat = await JsonSerializer.DeserializeAsync(http.Request.Body, WorkerJsonContext.Default.WorkerHeartbeat);
            if (server.Unavailable)
            {
                Interlocked.Increment(ref server._refusedHeartbeats);
                return Results.StatusCode(StatusCodes.Status503ServiceUnavailable);
            }
            if (Interlocked.Exchange(ref server._forgetNextHeartbeat, 0) == 1)
            {
                return Results.NotFound();
            }
            // Read before the heartbeat is counted, so a test that counts heartbeats knows which answers can be the old one.
            var assignments = server.Assignments;
            lock (server._answered)
            {
                // A worker applies an answer before it sends its next heartbeat: this one proves the last answer arrived.
                if (server._answered.TryGetValue(id, out var previous))
                {
                    server._delivered.Add(previous);
                }
                server._answered[id] = assignments;
            }
            server.Heartbeats.Enqueue((id, beat!));
            return Results.Json(assignments, WorkerJsonContext.Default.WorkerAssignments);
        });
        app.MapGet("/internal/v1/workers/blobs/{sha}", (Func<string, HttpContext, Task>)server.ServeBlobAsync);
        app.MapPost("/internal/v1/workers/{id}/leave", (string id) =>
        {
            server.Left.Enqueue(id);
            return Results.NoContent();
        });
        await app.StartAsync();
        return server;
    }

    /// <summary>Serves <paramref name="bytes"/> under their own SHA-256, which is returned.</summary>
    public string AddBlob(byte[] bytes)
    {
        var sha = Convert.ToHexStringLower(SHA256.HashData(bytes));
        _blobs[sha] = bytes;
        return sha;
    }

    /// <summary>Serves <paramref name="served"/> under the hash of <paramref name="claimed"/>: a damaged blob.</summary>
    public string AddDamagedBlob(byte[] claimed, byte[] served)
    {
        var sha = Convert.ToHexStringLower(SHA256.HashData(claimed));
        _blobs[sha] = served;
        return sha;
    }

    /// <summary>The next heartbeat is answered 404, as a server that forgot this worker does.</summary>
    public void ForgetWorkerOnce() => Interlocked.Exchange(ref _forgetNextHeartbeat, 1);

    /// <summary>The next blob response breaks its connection after <paramref name="bytes"/> bytes.</summary>
    public void DropNextBlobAfter(int bytes) => Interlocked.Exchange(ref _dropNextBlobAfter, bytes);

    public WorkerHeartbeat? LastHeartbeat => Heartbeats.LastOrDefault().Beat;

    private async Task ServeBlobAsync(string sha, HttpContext http)
    {
        var range = http.Request.Headers.Range.ToString();
        BlobRanges.Enqueue(range.Length == 0 ? null : range);
        if (!_blobs.TryGetValue(sha, out var bytes))
        {
            http.Response.StatusCode = StatusCodes.Status404NotFound;
            return;
        }
        long start = 0;
        if (range.Length > 0 && RangeHeaderValue.TryParse(range, out var parsed) && parsed.Ranges.First().From is { } from)
        {
            if (from >= bytes.Length)
            {
                http.Response.StatusCode = StatusCodes.Status416RangeNotSatisfiable;
                return;
            }
            start = from;
            http.Response.StatusCode = StatusCodes.Status206PartialContent;
            http.Response.Headers.ContentRange = new ContentRangeHeaderValue(start, bytes.Length - 1, bytes.Length).ToString();
        }
        http.Response.ContentLength = bytes.Length - start;
        http.Response.ContentType = "application/octet-stream";
        var drop = Interlocked.Exchange(ref _dropNextBlobAfter, -1);
        if (drop >= 0)
        {
            await http.Response.Body.WriteAsync(bytes.AsMemory((int)start, drop));
            await http.Response.Body.FlushAsync();
            await Task.Delay(200); // let the bytes reach the worker before the connection breaks
            http.Abort();
            return;
        }
        await http.Response.Body.WriteAsync(bytes.AsMemory((int)start));
    }

    public async ValueTask DisposeAsync()
    {
        await _app.StopAsync();
        await _app.DisposeAsync();
    }
}
