using System.Globalization;
using System.IO.Pipelines;
using System.Text;
using Microsoft.AspNetCore.Http;

namespace LoraDeploy.Tests.Simulator;

/// <summary>
/// Hostile upstream behaviours (issue 16, findings 3/15/16/17/21): each one is how a broken or malicious CivitAI or
/// storage host was seen to answer. They apply to every file and version of the simulator while set.
/// </summary>
public sealed class SimHostile
{
    /// <summary>Storage answers 503 (no Retry-After) to every request.</summary>
    public bool Storage503Forever { get; set; }
    /// <summary>Storage ignores Range and answers 200 with Content-Length = size + 1000, sends <c>size</c> bytes and closes.</summary>
    public bool StorageIgnoresRangeAndClosesEarly { get; set; }
    /// <summary>Storage answers every request with 206 from 1000 bytes past the offset asked for (0 without Range).</summary>
    public bool StorageWrongOffset { get; set; }
    /// <summary>Storage sends the file this many bytes at a time, waiting <see cref="StorageTrickleDelay"/> before each write.</summary>
    public int? StorageTrickleBytes { get; set; }
    public TimeSpan StorageTrickleDelay { get; set; } = TimeSpan.FromMilliseconds(50);

    /// <summary>The JSON endpoints answer 404 with an error body this long (a JSON string that never closes).</summary>
    public long? ApiErrorBodyBytes { get; set; }
    /// <summary>The download endpoint answers 401 with an error body this long.</summary>
    public long? DownloadErrorBodyBytes { get; set; }
    /// <summary>The JSON endpoints answer 200 with a JSON document whose one string is this long.</summary>
    public long? ApiJsonStringBytes { get; set; }
    /// <summary>The JSON endpoints answer 200 and then send one byte of JSON per this interval, never finishing.</summary>
    public TimeSpan? ApiTrickleDelay { get; set; }
    /// <summary>The download endpoint answers 307 with this raw Location header; the empty string sends none.</summary>
    public string? DownloadRedirectLocation { get; set; }
}

public sealed partial class CivitaiSimulator
{
    private static readonly byte[] Filler = Encoding.ASCII.GetBytes(new string('x', 64 * 1024));
    private long _hostileBytesSent;
    private long _apiBytesSent;
    private int _endlessAnswersEnded;

    /// <summary>Hostile behaviours; all off by default.</summary>
    public SimHostile Hostile { get; } = new();

    /// <summary>Body bytes the hostile trickling answers wrote.</summary>
    public long HostileBytesSent => Interlocked.Read(ref _hostileBytesSent);

    /// <summary>
    /// Bytes the API host's connections handed to their transport (headers and bodies). Kestrel stops feeding a
    /// transport whose client is gone, while the response body's writes go on succeeding as no-ops, so this is
    /// the counter that shows how much a client really took in (plus what socket buffers absorbed).
    /// </summary>
    public long ApiBytesSent => Interlocked.Read(ref _apiBytesSent);

    internal void AddApiBytesSent(long bytes) => Interlocked.Add(ref _apiBytesSent, bytes);

    internal IDuplexPipe CountApiBytes(IDuplexPipe transport) => new CountingTransport(transport, this);

    /// <summary>Endless answers that stopped (the client hung up or the whole body went out); read counters after this.</summary>
    public int EndlessAnswersEnded => Volatile.Read(ref _endlessAnswersEnded);

    /// <summary>Answers an API request the hostile way, if one is set for it; false lets the normal handler answer.</summary>
    private async Task<bool> HostileApiAsync(HttpContext ctx)
    {
        var h = Hostile;
        var path = ctx.Request.Path.Value ?? "";
        var jsonApi = path.StartsWith("/api/v1/", StringComparison.Ordinal);
        var download = path.StartsWith("/api/download/", StringComparison.Ordinal);
        if (jsonApi && h.ApiErrorBodyBytes is { } errorBytes)
        {
            await EndlessAsync(ctx, 404, "{\"error\":\""u8.ToArray(), errorBytes);
            return true;
        }
        if (download && h.DownloadErrorBodyBytes is { } probeBytes)
        {
            await EndlessAsync(ctx, 401, "{\"error\":\"Unauthorized\",\"message\":\""u8.ToArray(), probeBytes);
            return true;
        }
        if (jsonApi && h.ApiJsonStringBytes is { } stringBytes)
        {
            await EndlessAsync(ctx, 200, "{\"id\":1,\"name\":\""u8.ToArray(), stringBytes);
            return true;
        }
        if (jsonApi && h.ApiTrickleDelay is { } delay)
        {
            await TrickleJsonAsync(ctx, delay);
            return true;
        }
        if (download && h.DownloadRedirectLocation is { } location)
        {
            ctx.Response.StatusCode = 307;
            if (location.Length > 0)
            {
                ctx.Response.Headers.Location = location;
            }
            return true;
        }
        return false;
    }

    /// <summary>Answers 200 with JSON that never ends: one more byte every <paramref name="delay"/> until the client goes away.</summary>
    private async Task TrickleJsonAsync(HttpContext ctx, TimeSpan delay)
    {
        ctx.Response.StatusCode = 200;
        ctx.Response.ContentType = "application/json; charset=utf-8";
        await ctx.Response.Body.WriteAsync("{\"id\":1,\"name\":\""u8.ToArray(), ctx.RequestAborted);
        while (!ctx.RequestAborted.IsCancellationRequested)
        {
            await ctx.Response.Body.FlushAsync(ctx.RequestAborted);
            await Task.Delay(delay, ctx.RequestAborted);
            await ctx.Response.Body.WriteAsync(Filler.AsMemory(0, 1), ctx.RequestAborted);
            Interlocked.Increment(ref _hostileBytesSent);
        }
    }

    /// <summary>Answers a storage GET of a valid signed link the hostile way, if one is set; false serves the file normally.</summary>
    private async Task<bool> HostileStorageAsync(HttpContext ctx, SimFile file)
    {
        var h = Hostile;
        var content = file.Content;
        var asked = ctx.Request.Headers.Range.ToString() is { } r && r.StartsWith("bytes=", StringComparison.Ordinal)
            ? long.Parse(r["bytes=".Length..].Split('-')[0], CultureInfo.InvariantCulture)
            : 0;
        if (h.Storage503Forever)
        {
            await XmlAsync(ctx, 503, "SlowDown", "Please reduce your request rate.");
            return true;
        }
        if (h.StorageIgnoresRangeAndClosesEarly)
        {
            ctx.Response.StatusCode = 200;
            ctx.Response.ContentType = "application/octet-stream";
            ctx.Response.ContentLength = content.Length + 1000;
            await ctx.Response.Body.WriteAsync(content, ctx.RequestAborted);
            await ctx.Response.Body.FlushAsync(ctx.RequestAborted);
            ctx.Abort();
            return true;
        }
        if (h.StorageWrongOffset)
        {
            var from = Math.Min(asked + 1000, content.Length - 1);
            ctx.Response.StatusCode = 206;
            ctx.Response.ContentType = "application/octet-stream";
            ctx.Response.Headers.ContentRange = $"bytes {from}-{content.Length - 1}/{content.Length}";
            ctx.Response.ContentLength = content.Length - from;
            await ctx.Response.Body.WriteAsync(content.AsMemory((int)from), ctx.RequestAborted);
            return true;
        }
        if (h.StorageTrickleBytes is { } step)
        {
            ctx.Response.StatusCode = 200;
            ctx.Response.ContentType = "application/octet-stream";
            ctx.Response.ContentLength = content.Length;
            for (var offset = 0; offset < content.Length; offset += step)
            {
                await Task.Delay(h.StorageTrickleDelay, ctx.RequestAborted);
                await ctx.Response.Body.WriteAsync(content.AsMemory(offset, Math.Min(step, content.Length - offset)), ctx.RequestAborted);
                await ctx.Response.Body.FlushAsync(ctx.RequestAborted);
                Interlocked.Add(ref _hostileBytesSent, Math.Min(step, content.Length - offset));
            }
            return true;
        }
        return false;
    }

    /// <summary>A body of <paramref name="total"/> bytes (the prefix, then filler) streamed without ever holding it in memory.</summary>
    private async Task EndlessAsync(HttpContext ctx, int status, byte[] prefix, long total)
    {
        ctx.Response.StatusCode = status;
        ctx.Response.ContentType = "application/json; charset=utf-8";
        try
        {
            await ctx.Response.Body.WriteAsync(prefix, ctx.RequestAborted);
            for (var sent = (long)prefix.Length; sent < total;)
            {
                var n = (int)Math.Min(Filler.Length, total - sent);
                await ctx.Response.Body.WriteAsync(Filler.AsMemory(0, n), ctx.RequestAborted);
                sent += n;
            }
        }
        catch (Exception ex) when (ex is OperationCanceledException or IOException)
        {
            // The client hung up, which is what a client with a byte limit does.
        }
        finally
        {
            Interlocked.Increment(ref _endlessAnswersEnded);
        }
    }
}

file sealed class CountingTransport(IDuplexPipe inner, CivitaiSimulator sim) : IDuplexPipe
{
    public PipeReader Input => inner.Input;
    public PipeWriter Output { get; } = new CountingWriter(inner.Output, sim);

    private sealed class CountingWriter(PipeWriter inner, CivitaiSimulator sim) : PipeWriter
    {
        public override void Advance(int bytes)
        {
            sim.AddApiBytesSent(bytes);
            inner.Advance(bytes);
        }

        public override Memory<byte> GetMemory(int sizeHint = 0) => inner.GetMemory(sizeHint);
        public override Span<byte> GetSpan(int sizeHint = 0) => inner.GetSpan(sizeHint);
        public override ValueTask<FlushResult> FlushAsync(CancellationToken cancellationToken = default) => inner.FlushAsync(cancellationToken);
        public override void CancelPendingFlush() => inner.CancelPendingFlush();
        public override void Complete(Exception? exception = null) => inner.Complete(exception);
        public override ValueTask CompleteAsync(Exception? exception = null) => inner.CompleteAsync(exception);
    }
}
