using System.Buffers;
using System.Diagnostics;
using System.Text.Json;
using LoraDeploy.Serving.LlamaCpp;
using LoraDeploy.Workers;

namespace LoraDeploy.Serving;

/// <summary>
/// OpenAI's chat completions and completions, and DeepInfra's native text generation, on top of
/// <see cref="LlamaCppEngine"/>: the body (already range-checked by the gateway) becomes an engine request, the
/// engine's chunks become the answer — one JSON object, or SSE chunks ending in <c>data: [DONE]</c> when
/// <c>stream</c> is true. Each chunk is flushed as it is produced, so tokens reach the client as they are generated.
/// </summary>
public static class LlamaCppHttp
{
    public static async Task HandleAsync(LlamaCppEngine engine, string operation, IReadOnlyList<LlamaCppAdapterUse> adapters,
        JsonElement body, IReadOnlyDictionary<string, string> defaults, HttpContext http, CancellationToken ct)
    {
        LlamaCppRequest request;
        try
        {
            request = ToRequest(operation, adapters, body, defaults);
        }
        catch (FormatException e)
        {
            await ErrorAsync(http, operation, StatusCodes.Status422UnprocessableEntity, e.Message);
            return;
        }
        var model = body.TryGetProperty("model", out var m) && m.ValueKind == JsonValueKind.String ? m.GetString()! : "";
        var stream = body.TryGetProperty("stream", out var s) && s.ValueKind == JsonValueKind.True;
        var id = (operation == Operations.ChatCompletions ? "chatcmpl-" : "cmpl-") + Guid.NewGuid().ToString("N")[..24];
        var created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        var started = Stopwatch.GetTimestamp();
        var chunks = engine.GenerateAsync(request, ct);

        try
        {
            if (stream)
            {
                var includeUsage = body.TryGetProperty("stream_options", out var so) && so.ValueKind == JsonValueKind.Object
                    && so.TryGetProperty("include_usage", out var iu) && iu.ValueKind == JsonValueKind.True;
                await StreamAsync(http, operation, chunks, id, created, model, includeUsage, ct);
            }
            else
            {
                await WholeAsync(http, operation, chunks, id, created, model, request.Logprobs is not null, started, ct);
            }
        }
        catch (LlamaCppRequestException e) when (!http.Response.HasStarted)
        {
            var status = e.Kind == LlamaCppErrorKind.UnknownAdapter ? StatusCodes.Status404NotFound : StatusCodes.Status422UnprocessableEntity;
            await ErrorAsync(http, operation, status, e.Message);
        }
    }

    /// <summary>The engine request for a body; <see cref="FormatException"/> names what cannot be served.</summary>
    public static LlamaCppRequest ToRequest(string operation, IReadOnlyList<LlamaCppAdapterUse> adapters, JsonElement body, IReadOnlyDictionary<string, string> defaults)
    {
        LlamaCppPrompt prompt;
        int? logprobs = null;
        var echo = false;
        switch (operation)
        {
            case Operations.ChatCompletions:
                prompt = new LlamaCppPrompt.Chat(body.GetProperty("messages").EnumerateArray()
                    .Select(message => new LlamaCppChatMessage(message.GetProperty("role").GetString()!, ContentText(message.GetProperty("content"))))
                    .ToList());
                if (body.TryGetProperty("logprobs", out var lp) && lp.ValueKind == JsonValueKind.True)
                {
                    logprobs = body.TryGetProperty("top_logprobs", out var top) && top.ValueKind == JsonValueKind.Number ? top.GetInt32() : 0;
                }
                break;
            case Operations.Completions:
                var p = body.GetProperty("prompt");
                prompt = p.ValueKind switch
                {
                    JsonValueKind.String => new LlamaCppPrompt.Text(p.GetString()!),
                    JsonValueKind.Array when p[0].ValueKind == JsonValueKind.String => new LlamaCppPrompt.Text(p[0].GetString()!),
                    _ => new LlamaCppPrompt.Tokens(p.EnumerateArray().Select(t => t.GetInt32()).ToList()),
                };
                if (body.TryGetProperty("logprobs", out var n) && n.ValueKind == JsonValueKind.Number)
                {
                    logprobs = n.GetInt32();
                }
                echo = body.TryGetProperty("echo", out var e) && e.ValueKind == JsonValueKind.True;
                break;
            default:
                prompt = new LlamaCppPrompt.Text(body.GetProperty("input").GetString()!);
                break;
        }
        return new LlamaCppRequest
        {
            Prompt = prompt,
            Adapters = adapters,
            MaxTokens = Int(body, "max_tokens") ?? Int(body, "max_completion_tokens") ?? Int(body, "max_new_tokens") ?? DefaultInt(defaults, "max_tokens"),
            Temperature = Float(body, "temperature") ?? DefaultFloat(defaults, "temperature") ?? 1f,
            TopP = Float(body, "top_p") ?? DefaultFloat(defaults, "top_p") ?? 1f,
            Seed = body.TryGetProperty("seed", out var seed) && seed.ValueKind == JsonValueKind.Number ? unchecked((uint)seed.GetInt64()) : null,
            Stop = body.TryGetProperty("stop", out var stop) ? stop.ValueKind switch
            {
                JsonValueKind.String => [stop.GetString()!],
                JsonValueKind.Array => stop.EnumerateArray().Select(x => x.GetString()!).ToList(),
                _ => [],
            } : [],
            Logprobs = logprobs,
            Echo = echo,
        };
    }

    private static string ContentText(JsonElement content) => content.ValueKind == JsonValueKind.String
        ? content.GetString()!
        : string.Concat(content.EnumerateArray()
            .Select(part => part.TryGetProperty("type", out var t) && t.GetString() == "text" && part.TryGetProperty("text", out var text)
                ? text.GetString()
                : throw new FormatException("only text content parts can be served by a text model")));

    private static async Task WholeAsync(HttpContext http, string operation, IAsyncEnumerable<LlamaCppChunk> chunks, string id, long created,
        string model, bool withLogprobs, long started, CancellationToken ct)
    {
        var text = new System.Text.StringBuilder();
        var tokens = new List<LlamaCppToken>();
        LlamaCppChunk? finish = null;
        await foreach (var chunk in chunks.WithCancellation(ct))
        {
            text.Append(chunk.Text);
            if (chunk.Token is { } token)
            {
                tokens.Add(token);
            }
            if (chunk.Kind == LlamaCppChunkKind.Finish)
            {
                finish = chunk;
            }
        }
        var usage = finish?.Usage ?? new LlamaCppUsage(0, 0);
        var reason = finish?.FinishReason ?? "stop";
        http.Response.ContentType = "application/json";
        // Written whole with its length: the gateway passes a Content-Length through as one write, no chunk framing.
        var answer = new ArrayBufferWriter<byte>(1024);
        using (var json = new Utf8JsonWriter(answer))
        {
            json.WriteStartObject();
            if (operation is Operations.ChatCompletions or Operations.Completions)
            {
                json.WriteString("id", id);
                json.WriteString("object", operation == Operations.ChatCompletions ? "chat.completion" : "text_completion");
                json.WriteNumber("created", created);
                json.WriteString("model", model);
                json.WriteStartArray("choices");
                json.WriteStartObject();
                json.WriteNumber("index", 0);
                if (operation == Operations.ChatCompletions)
                {
                    json.WriteStartObject("message");
                    json.WriteString("role", "assistant");
                    json.WriteString("content", text.ToString());
                    json.WriteEndObject();
                    WriteChatLogprobs(json, withLogprobs ? tokens : null);
                }
                else
                {
                    json.WriteString("text", text.ToString());
                    WriteCompletionLogprobs(json, withLogprobs ? tokens : null);
                }
                json.WriteString("finish_reason", reason);
                json.WriteEndObject();
                json.WriteEndArray();
                WriteUsage(json, usage);
            }
            else
            {
                // DeepInfra's native text generation.
                json.WriteStartArray("results");
                json.WriteStartObject();
                json.WriteString("generated_text", text.ToString());
                json.WriteEndObject();
                json.WriteEndArray();
                json.WriteNumber("num_tokens", usage.CompletionTokens);
                json.WriteNumber("num_input_tokens", usage.PromptTokens);
                json.WriteString("request_id", id);
                json.WriteStartObject("inference_status");
                json.WriteString("status", "succeeded");
                json.WriteNumber("runtime_ms", (long)Stopwatch.GetElapsedTime(started).TotalMilliseconds);
                json.WriteNumber("cost", 0);
                json.WriteNumber("tokens_generated", usage.CompletionTokens);
                json.WriteNumber("tokens_input", usage.PromptTokens);
                json.WriteEndObject();
            }
            json.WriteEndObject();
        }
        http.Response.ContentLength = answer.WrittenCount;
        await http.Response.Body.WriteAsync(answer.WrittenMemory, http.RequestAborted);
    }

    private static async Task StreamAsync(HttpContext http, string operation, IAsyncEnumerable<LlamaCppChunk> chunks, string id, long created,
        string model, bool includeUsage, CancellationToken ct)
    {
        var chat = operation == Operations.ChatCompletions;
        var started = false;
        await foreach (var chunk in chunks.WithCancellation(ct))
        {
            if (!started)
            {
                // Headers go out with the first chunk, so an error found before it can still be a plain error answer.
                http.Response.ContentType = "text/event-stream";
                http.Response.Headers.CacheControl = "no-cache";
                started = true;
                if (chat)
                {
                    await EventAsync(http, json => Chunk(json, id, created, model, chat, delta: null, role: true, finish: null), ct);
                }
            }
            if (chunk.Text.Length > 0 || chunk.Kind == LlamaCppChunkKind.Finish)
            {
                var finish = chunk.Kind == LlamaCppChunkKind.Finish ? chunk.FinishReason ?? "stop" : null;
                await EventAsync(http, json => Chunk(json, id, created, model, chat, chunk.Text, role: false, finish), ct);
            }
            if (chunk.Kind == LlamaCppChunkKind.Finish && includeUsage && chunk.Usage is { } usage)
            {
                await EventAsync(http, json =>
                {
                    json.WriteStartObject();
                    json.WriteString("id", id);
                    json.WriteString("object", chat ? "chat.completion.chunk" : "text_completion");
                    json.WriteNumber("created", created);
                    json.WriteString("model", model);
                    json.WriteStartArray("choices");
                    json.WriteEndArray();
                    WriteUsage(json, usage);
                    json.WriteEndObject();
                }, ct);
            }
        }
        await http.Response.WriteAsync("data: [DONE]\n\n", ct);
        await http.Response.Body.FlushAsync(ct);
    }

    private static void Chunk(Utf8JsonWriter json, string id, long created, string model, bool chat, string? delta, bool role, string? finish)
    {
        json.WriteStartObject();
        json.WriteString("id", id);
        json.WriteString("object", chat ? "chat.completion.chunk" : "text_completion");
        json.WriteNumber("created", created);
        json.WriteString("model", model);
        json.WriteStartArray("choices");
        json.WriteStartObject();
        json.WriteNumber("index", 0);
        if (chat)
        {
            json.WriteStartObject("delta");
            if (role)
            {
                json.WriteString("role", "assistant");
                json.WriteString("content", "");
            }
            else if (delta is { Length: > 0 })
            {
                json.WriteString("content", delta);
            }
            json.WriteEndObject();
        }
        else
        {
            json.WriteString("text", delta ?? "");
        }
        json.WriteNull("logprobs");
        if (finish is null)
        {
            json.WriteNull("finish_reason");
        }
        else
        {
            json.WriteString("finish_reason", finish);
        }
        json.WriteEndObject();
        json.WriteEndArray();
        json.WriteEndObject();
    }

    private static async Task EventAsync(HttpContext http, Action<Utf8JsonWriter> write, CancellationToken ct)
    {
        var buffer = new ArrayBufferWriter<byte>();
        buffer.Write("data: "u8);
        using (var json = new Utf8JsonWriter(buffer))
        {
            write(json);
        }
        buffer.Write("\n\n"u8);
        await http.Response.Body.WriteAsync(buffer.WrittenMemory, ct);
        await http.Response.Body.FlushAsync(ct);
    }

    private static void WriteUsage(Utf8JsonWriter json, LlamaCppUsage usage)
    {
        json.WriteStartObject("usage");
        json.WriteNumber("prompt_tokens", usage.PromptTokens);
        json.WriteNumber("completion_tokens", usage.CompletionTokens);
        json.WriteNumber("total_tokens", usage.TotalTokens);
        json.WriteEndObject();
    }

    /// <summary>Chat's shape: <c>logprobs.content[]</c> of {token, logprob, bytes, top_logprobs[]}.</summary>
    private static void WriteChatLogprobs(Utf8JsonWriter json, List<LlamaCppToken>? tokens)
    {
        if (tokens is null)
        {
            json.WriteNull("logprobs");
            return;
        }
        json.WriteStartObject("logprobs");
        json.WriteStartArray("content");
        foreach (var token in tokens)
        {
            json.WriteStartObject();
            json.WriteString("token", token.Piece);
            json.WriteNumber("logprob", token.Logprob ?? 0);
            WriteBytes(json, token.Bytes);
            json.WriteStartArray("top_logprobs");
            foreach (var top in token.TopLogprobs ?? [])
            {
                json.WriteStartObject();
                json.WriteString("token", top.Piece);
                json.WriteNumber("logprob", top.Logprob);
                WriteBytes(json, top.Bytes);
                json.WriteEndObject();
            }
            json.WriteEndArray();
            json.WriteEndObject();
        }
        json.WriteEndArray();
        json.WriteEndObject();
    }

    /// <summary>Completions' legacy shape: parallel lists tokens / token_logprobs / top_logprobs (maps) / text_offset.</summary>
    private static void WriteCompletionLogprobs(Utf8JsonWriter json, List<LlamaCppToken>? tokens)
    {
        if (tokens is null)
        {
            json.WriteNull("logprobs");
            return;
        }
        json.WriteStartObject("logprobs");
        json.WriteStartArray("tokens");
        tokens.ForEach(t => json.WriteStringValue(t.Piece));
        json.WriteEndArray();
        json.WriteStartArray("token_logprobs");
        foreach (var t in tokens)
        {
            if (t.Logprob is { } lp)
            {
                json.WriteNumberValue(lp);
            }
            else
            {
                json.WriteNullValue(); // the first prompt token of an echo has no context
            }
        }
        json.WriteEndArray();
        json.WriteStartArray("top_logprobs");
        foreach (var t in tokens)
        {
            if (t.TopLogprobs is null)
            {
                json.WriteNullValue();
                continue;
            }
            json.WriteStartObject();
            foreach (var top in t.TopLogprobs.DistinctBy(x => x.Piece))
            {
                json.WriteNumber(top.Piece, top.Logprob);
            }
            json.WriteEndObject();
        }
        json.WriteEndArray();
        json.WriteStartArray("text_offset");
        var offset = 0;
        foreach (var t in tokens)
        {
            json.WriteNumberValue(offset);
            offset += t.Piece.Length;
        }
        json.WriteEndArray();
        json.WriteEndObject();
    }

    private static void WriteBytes(Utf8JsonWriter json, byte[] bytes)
    {
        json.WriteStartArray("bytes");
        foreach (var b in bytes)
        {
            json.WriteNumberValue(b);
        }
        json.WriteEndArray();
    }

    private static Task ErrorAsync(HttpContext http, string operation, int status, string message) =>
        Inference.InferenceErrors.WriteAsync(http.Response, operation != Operations.Native, status, message, null);

    private static int? Int(JsonElement body, string name) =>
        body.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetInt32() : null;

    private static float? Float(JsonElement body, string name) =>
        body.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number ? v.GetSingle() : null;

    private static int? DefaultInt(IReadOnlyDictionary<string, string> defaults, string name) =>
        defaults.TryGetValue(name, out var v) && int.TryParse(v, System.Globalization.CultureInfo.InvariantCulture, out var n) ? n : null;

    private static float? DefaultFloat(IReadOnlyDictionary<string, string> defaults, string name) =>
        defaults.TryGetValue(name, out var v) && float.TryParse(v, System.Globalization.CultureInfo.InvariantCulture, out var f) ? f : null;
}
