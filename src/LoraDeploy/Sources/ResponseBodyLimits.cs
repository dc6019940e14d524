using System.Text.Json;
using System.Text.Json.Serialization.Metadata;

namespace LoraDeploy.Sources;

/// <summary>An upstream answer could not be used (too large, too slow, unusable redirect); the message names the problem.</summary>
public sealed class UpstreamAnswerException(string message, string reasonClass) : Exception(message)
{
    public string ReasonClass { get; } = reasonClass;
}

/// <summary>
/// Every upstream body is read with a byte limit and a whole-body deadline, so an endless or trickling answer
/// costs neither memory nor a stuck caller.
/// </summary>
internal static class ResponseBodyLimits
{
    /// <summary>Error bodies only carry a short message; anything longer is not one worth reading.</summary>
    public const int ErrorBodyBytes = 64 * 1024;

    /// <summary>The body's bytes, or null when it is longer than <paramref name="maxBytes"/> or not complete within <paramref name="timeout"/>.</summary>
    public static async Task<byte[]?> ReadAtMostAsync(HttpContent content, int maxBytes, TimeSpan timeout, TimeProvider time, CancellationToken ct)
    {
        if (content.Headers.ContentLength > maxBytes)
        {
            return null;
        }
        using var deadline = new CancellationTokenSource(timeout, time);
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(ct, deadline.Token);
        var buffer = new byte[Math.Min(maxBytes + 1, (int)(content.Headers.ContentLength ?? 16 * 1024) + 1)];
        var length = 0;
        try
        {
            await using var stream = await content.ReadAsStreamAsync(linked.Token).ConfigureAwait(false);
            int n;
            while ((n = await stream.ReadAsync(buffer.AsMemory(length), linked.Token).ConfigureAwait(false)) > 0)
            {
                length += n;
                if (length > maxBytes)
                {
                    return null;
                }
                if (length == buffer.Length)
                {
                    Array.Resize(ref buffer, Math.Min(maxBytes + 1, buffer.Length * 2));
                }
            }
        }
        catch (OperationCanceledException) when (deadline.IsCancellationRequested && !ct.IsCancellationRequested)
        {
            return null;
        }
        return buffer.AsSpan(0, length).ToArray();
    }

    /// <summary>
    /// Deserializes a JSON body of at most <paramref name="maxBytes"/> that must arrive whole within <paramref name="timeout"/>;
    /// <paramref name="what"/> names the answer in messages (e.g. the API path).
    /// </summary>
    public static async Task<T?> ReadJsonAsync<T>(HttpContent content, JsonTypeInfo<T> typeInfo, long maxBytes, TimeSpan timeout, TimeProvider time, string what, CancellationToken ct)
    {
        if (content.Headers.ContentLength is { } declared && declared > maxBytes)
        {
            throw TooLarge(what, maxBytes);
        }
        using var deadline = new CancellationTokenSource(timeout, time);
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(ct, deadline.Token);
        try
        {
            await using var stream = new LimitedReadStream(await content.ReadAsStreamAsync(linked.Token).ConfigureAwait(false), maxBytes);
            return await JsonSerializer.DeserializeAsync(stream, typeInfo, linked.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (deadline.IsCancellationRequested && !ct.IsCancellationRequested)
        {
            throw new UpstreamAnswerException(
                $"CivitAI's answer for {what} did not arrive whole within Import:ApiBodyTimeout ({timeout}); CivitAI is slow or the connection is bad, try again later",
                ReasonClass.Network);
        }
        catch (BodyLimitExceededException)
        {
            throw TooLarge(what, maxBytes);
        }
    }

    private static UpstreamAnswerException TooLarge(string what, long maxBytes) => new(
        $"CivitAI's answer for {what} is larger than Import:MaxApiBodyBytes ({maxBytes} bytes); check Civitai:BaseUrl, or raise the limit if CivitAI's answers really grew",
        ReasonClass.Upstream);

    private sealed class BodyLimitExceededException() : IOException("the body is larger than its limit");

    /// <summary>A read-only stream that throws once more than <c>limit</c> bytes came through.</summary>
    private sealed class LimitedReadStream(Stream inner, long limit) : Stream
    {
        private long _read;

        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => false;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => _read; set => throw new NotSupportedException(); }

        public override int Read(byte[] buffer, int offset, int count) => Count(inner.Read(buffer, offset, count));

        public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default) =>
            Count(await inner.ReadAsync(buffer, cancellationToken).ConfigureAwait(false));

        public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
            ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

        private int Count(int n)
        {
            _read += n;
            return _read > limit ? throw new BodyLimitExceededException() : n;
        }

        public override void Flush() { }
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();

        protected override void Dispose(bool disposing)
        {
            if (disposing)
            {
                inner.Dispose();
            }
            base.Dispose(disposing);
        }

        public override ValueTask DisposeAsync() => inner.DisposeAsync();
    }
}
