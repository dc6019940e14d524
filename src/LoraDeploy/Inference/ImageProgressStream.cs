using System.Buffers;
using System.Runtime.CompilerServices;
using System.Text;
using System.Text.Json;

namespace LoraDeploy.Inference;

/// <summary>
/// Our progress extension to DeepInfra's native text-to-image route: a body with <c>"stream": true</c> is answered
/// <c>text/event-stream</c> with <c>event: progress</c> / <c>data: {"step":3,"steps":20}</c> frames while sampling,
/// then exactly one <c>event: result</c> (data = the full native JSON answer) or <c>event: error</c>
/// (data = <c>{"error":"…","status":502}</c>). The engine writes it, the gateway passes it through unbuffered, the CLI
/// and the dashboard read it. Errors found before the stream starts stay plain JSON answers with their HTTP status.
/// </summary>
public static class ImageProgressStream
{
    public const string ContentType = "text/event-stream";
    public const string ProgressEvent = "progress";
    public const string ResultEvent = "result";
    public const string ErrorEvent = "error";

    /// <summary>One sampling step done: <paramref name="step"/> of <paramref name="steps"/> (1-based).</summary>
    public static Task WriteProgressAsync(HttpResponse response, int step, int steps, CancellationToken ct)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(step);
        ArgumentOutOfRangeException.ThrowIfLessThan(steps, 1);
        return WriteEventAsync(response, ProgressEvent, Encoding.UTF8.GetBytes($"{{\"step\":{step},\"steps\":{steps}}}"), ct);
    }

    /// <summary>The final answer: the native JSON body (<c>images</c>, <c>seed</c>, <c>request_id</c>, …) as one event.</summary>
    public static Task WriteResultAsync(HttpResponse response, ReadOnlyMemory<byte> json, CancellationToken ct) =>
        WriteEventAsync(response, ResultEvent, json, ct);

    /// <summary>The final event when the job failed after the stream started (the HTTP status is 200 by then).</summary>
    public static Task WriteErrorAsync(HttpResponse response, int status, string message, CancellationToken ct)
    {
        var buffer = new ArrayBufferWriter<byte>();
        using (var json = new Utf8JsonWriter(buffer))
        {
            json.WriteStartObject();
            json.WriteString("error", message);
            json.WriteNumber("status", status);
            json.WriteEndObject();
        }
        return WriteEventAsync(response, ErrorEvent, buffer.WrittenMemory, ct);
    }

    private static async Task WriteEventAsync(HttpResponse response, string name, ReadOnlyMemory<byte> data, CancellationToken ct)
    {
        if (!response.HasStarted)
        {
            response.ContentType = ContentType;
            response.Headers.CacheControl = "no-cache";
        }
        var frame = new ArrayBufferWriter<byte>(data.Length + 64);
        frame.Write("event: "u8);
        frame.Write(Encoding.UTF8.GetBytes(name));
        frame.Write("\n"u8);
        // SSE ends a data line at CR or LF: a multi-line (indented) JSON answer becomes several data lines, which the
        // reader joins again with LF (JSON does not care).
        var rest = data.Span;
        while (true)
        {
            var end = rest.IndexOfAny((byte)'\r', (byte)'\n');
            frame.Write("data: "u8);
            frame.Write(end < 0 ? rest : rest[..end]);
            frame.Write("\n"u8);
            if (end < 0)
            {
                break;
            }
            var skip = rest[end] == '\r' && end + 1 < rest.Length && rest[end + 1] == '\n' ? 2 : 1;
            rest = rest[(end + skip)..];
        }
        frame.Write("\n"u8);
        await response.Body.WriteAsync(frame.WrittenMemory, ct);
        await response.Body.FlushAsync(ct);
    }

    /// <summary>
    /// The events of a progress stream, in order, as the SSE rules read them (comments and unknown events skipped,
    /// multi-line data joined). A frame that breaks this protocol throws <see cref="InvalidDataException"/> saying what
    /// was wrong. The enumeration ends at the end of the stream; whether a final event came is the caller's to check.
    /// </summary>
    public static async IAsyncEnumerable<ImageStreamEvent> ReadAsync(Stream stream, [EnumeratorCancellation] CancellationToken ct)
    {
        using var reader = new StreamReader(stream, Encoding.UTF8, detectEncodingFromByteOrderMarks: false, leaveOpen: true);
        var name = "";
        var data = new StringBuilder();
        var hasData = false;
        while (await reader.ReadLineAsync(ct) is { } line)
        {
            if (line.Length == 0)
            {
                if (hasData && Parse(name, data.ToString()) is { } parsed)
                {
                    yield return parsed;
                }
                name = "";
                data.Clear();
                hasData = false;
                continue;
            }
            if (line[0] == ':')
            {
                continue; // comment / keep-alive
            }
            var colon = line.IndexOf(':');
            var field = colon < 0 ? line : line[..colon];
            var value = colon < 0 ? "" : line[(colon + 1)..];
            if (value.StartsWith(' '))
            {
                value = value[1..];
            }
            switch (field)
            {
                case "event":
                    name = value;
                    break;
                case "data":
                    if (hasData)
                    {
                        data.Append('\n');
                    }
                    data.Append(value);
                    hasData = true;
                    break;
            }
        }
        // A final frame without its blank line is still dispatched: the writer always ends frames, so this only
        // matters for other writers.
        if (hasData && Parse(name, data.ToString()) is { } last)
        {
            yield return last;
        }
    }

    private static ImageStreamEvent? Parse(string name, string data)
    {
        switch (name)
        {
            case ProgressEvent:
            {
                using var json = ParseObject(name, data);
                var root = json.RootElement;
                if (!(root.TryGetProperty("step", out var step) && step.ValueKind == JsonValueKind.Number && step.TryGetInt32(out var s) && s >= 0
                    && root.TryGetProperty("steps", out var steps) && steps.ValueKind == JsonValueKind.Number && steps.TryGetInt32(out var n) && n >= 1))
                {
                    throw new InvalidDataException($"A progress event needs integer step (≥ 0) and steps (≥ 1); it read: {Excerpt(data)}");
                }
                return new ImageStreamProgress(s, n);
            }
            case ResultEvent:
            {
                using var json = ParseObject(name, data);
                return new ImageStreamResult(json.RootElement.Clone());
            }
            case ErrorEvent:
            {
                using var json = ParseObject(name, data);
                var root = json.RootElement;
                if (!root.TryGetProperty("error", out var error) || error.ValueKind != JsonValueKind.String)
                {
                    throw new InvalidDataException($"An error event needs a string error; it read: {Excerpt(data)}");
                }
                var status = root.TryGetProperty("status", out var st) && st.ValueKind == JsonValueKind.Number && st.TryGetInt32(out var code) ? code : StatusCodes.Status502BadGateway;
                return new ImageStreamError(status, error.GetString()!);
            }
            default:
                return null; // unknown events are skipped, as SSE says
        }
    }

    private static JsonDocument ParseObject(string name, string data)
    {
        JsonDocument json;
        try
        {
            json = JsonDocument.Parse(data);
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"The {name} event's data is not JSON ({e.Message}): {Excerpt(data)}", e);
        }
        if (json.RootElement.ValueKind != JsonValueKind.Object)
        {
            json.Dispose();
            throw new InvalidDataException($"The {name} event's data must be a JSON object: {Excerpt(data)}");
        }
        return json;
    }

    private static string Excerpt(string data) => data.Length <= 200 ? data : data[..200] + "…";
}

/// <summary>One event of an <see cref="ImageProgressStream"/>.</summary>
public abstract record ImageStreamEvent;

/// <param name="Step">Steps done (1-based; 0 = sampling started).</param>
/// <param name="Steps">Steps in all.</param>
public sealed record ImageStreamProgress(int Step, int Steps) : ImageStreamEvent;

/// <param name="Answer">The native text-to-image answer (<c>images</c>, <c>nsfw_content_detected</c>, <c>seed</c>, <c>request_id</c>, <c>inference_status</c>).</param>
public sealed record ImageStreamResult(JsonElement Answer) : ImageStreamEvent;

/// <param name="Status">The HTTP status the failure would have had.</param>
/// <param name="Message">What went wrong, for the user.</param>
public sealed record ImageStreamError(int Status, string Message) : ImageStreamEvent;
