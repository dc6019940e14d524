using System.Net.Http.Json;
using System.Net.WebSockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace LoraDeploy.Serving.ComfyUi;

/// <summary>ComfyUI refused a graph at <c>POST /prompt</c> (HTTP 400): its error and the per-node errors.</summary>
public sealed class ComfyUiRejectedException(string type, string message, IReadOnlyList<ComfyNodeError> nodeErrors)
    : Exception(message)
{
    /// <summary>ComfyUI's top-level error type (<c>prompt_outputs_failed_validation</c>, <c>missing_node_type</c>, …).</summary>
    public string Type { get; } = type;

    public IReadOnlyList<ComfyNodeError> NodeErrors { get; } = nodeErrors;
}

/// <summary>
/// One entry of ComfyUI's <c>node_errors</c>: the node's class (<c>KSampler</c>), the error type
/// (<c>value_bigger_than_max</c>, <c>value_not_in_list</c>, …), the input it concerns when ComfyUI names one
/// (<c>extra_info.input_name</c>) and ComfyUI's details (<c>steps, 10001 &gt; 10000</c>).
/// </summary>
public sealed record ComfyNodeError(string NodeId, string ClassType, string Type, string Message, string? Input, string Details);

/// <summary>A job failed while running (<c>execution_error</c>): ComfyUI's own words.</summary>
public sealed class ComfyUiExecutionException(string nodeType, string exceptionType, string message)
    : Exception($"ComfyUI failed in {nodeType}: {exceptionType}: {message}")
{
    public string NodeType { get; } = nodeType;
    public string ExceptionType { get; } = exceptionType;
    public string ExceptionMessage { get; } = message;
}

/// <summary>ComfyUI cannot be reached, dropped the connection, or made no progress: the worker cannot serve through it.</summary>
public sealed class ComfyUiUnavailableException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>One saved image of a finished job, as <c>/history</c> lists it.</summary>
public sealed record ComfyImageRef(string Filename, string Subfolder, string Type);

/// <summary>
/// Talks to one ComfyUI server (reference/serving.md § B): <c>/object_info</c>, <c>/prompt</c> with our own
/// <c>prompt_id</c> and <c>client_id</c>, progress and completion from <c>/ws</c>, images from <c>/history</c> and
/// <c>/view</c>, <c>/interrupt</c> and queue delete on cancellation. No retries: a queued prompt is not idempotent.
/// Each job opens its own socket (a fresh client id) before posting, so no message of the job can be missed and
/// nothing has to demultiplex between jobs. One HTTP call (or the socket's handshake) longer than the request timeout
/// counts as ComfyUI not answering.
/// </summary>
public sealed class ComfyUiClient(Uri baseUrl, HttpMessageInvoker invoker, TimeProvider time, TimeSpan requestTimeout)
{
    private static readonly TimeSpan CleanupTimeout = TimeSpan.FromSeconds(5);

    public Uri BaseUrl { get; } = baseUrl;

    /// <summary><c>GET /object_info/{class}</c> (or every class); null for a class ComfyUI does not have.</summary>
    public async Task<JsonObject?> GetObjectInfoAsync(string? classType, CancellationToken ct)
    {
        using var response = await SendAsync(HttpMethod.Get, classType is null ? "object_info" : $"object_info/{Uri.EscapeDataString(classType)}", null, ct);
        response.EnsureSuccessStatusCode();
        var all = await response.Content.ReadFromJsonAsync<JsonObject>(ct) ?? [];
        return classType is null ? all : all[classType] as JsonObject;
    }

    /// <summary>The choices of a combo input (<c>lora_name</c> of <c>LoraLoader</c>), or null when the node or input is missing.</summary>
    public async Task<IReadOnlyList<string>?> GetChoicesAsync(string classType, string input, CancellationToken ct)
    {
        var info = await GetObjectInfoAsync(classType, ct);
        return Choices(info, input);
    }

    internal static IReadOnlyList<string>? Choices(JsonObject? info, string input)
    {
        var spec = info?["input"]?["required"]?[input] ?? info?["input"]?["optional"]?[input];
        // Old form: [["a", "b"], {…}]; newer: ["COMBO", {"options": [...]}].
        if (spec is JsonArray { Count: > 0 } array)
        {
            if (array[0] is JsonArray list)
            {
                return list.Select(n => n?.GetValue<string>() ?? "").ToList();
            }
            if (array.Count > 1 && array[1]?["options"] is JsonArray options)
            {
                return options.Select(n => n?.GetValue<string>() ?? "").ToList();
            }
        }
        return null;
    }

    /// <summary>
    /// Queues <paramref name="graph"/> and follows it to the end: <paramref name="progress"/> gets the sampler's steps;
    /// returns the saved images of <paramref name="saveNode"/>. Cancelling interrupts the job (or removes it from the queue).
    /// A silence longer than <paramref name="stall"/> is checked against <c>GET /queue</c>: a job still waiting its turn
    /// keeps waiting; a running job with no progress, or a ComfyUI that does not answer, is a <see cref="ComfyUiUnavailableException"/>.
    /// </summary>
    public async Task<IReadOnlyList<ComfyImageRef>> RunAsync(JsonObject graph, string saveNode, Guid promptId, Action<int, int>? progress,
        TimeSpan stall, CancellationToken ct)
    {
        var id = promptId.ToString("D");
        var clientId = Guid.NewGuid().ToString("N");
        using var socket = new ClientWebSocket();
        try
        {
            var ws = new UriBuilder(BaseUrl) { Scheme = BaseUrl.Scheme == "https" ? "wss" : "ws", Path = BaseUrl.AbsolutePath.TrimEnd('/') + "/ws", Query = $"clientId={clientId}" };
            using var handshake = CancellationTokenSource.CreateLinkedTokenSource(ct);
            handshake.CancelAfter(requestTimeout);
            await socket.ConnectAsync(ws.Uri, invoker, handshake.Token);
        }
        catch (Exception e) when (e is WebSocketException or HttpRequestException or OperationCanceledException && !ct.IsCancellationRequested)
        {
            throw new ComfyUiUnavailableException($"ComfyUI at {BaseUrl} cannot be reached ({e.Message}).", e);
        }

        await QueueAsync(graph, id, clientId, ct);
        try
        {
            await FollowAsync(socket, id, progress, stall, ct);
        }
        catch (OperationCanceledException) when (ct.IsCancellationRequested)
        {
            await CancelAsync(id);
            throw;
        }
        catch (ComfyUiUnavailableException)
        {
            await CancelAsync(id);
            throw;
        }
        finally
        {
            if (socket.State == WebSocketState.Open)
            {
                using var close = new CancellationTokenSource(TimeSpan.FromSeconds(1));
                try
                {
                    await socket.CloseOutputAsync(WebSocketCloseStatus.NormalClosure, null, close.Token);
                }
                catch (Exception e) when (e is WebSocketException or OperationCanceledException)
                {
                    // Going away anyway.
                }
            }
        }
        return await ImagesAsync(id, saveNode, ct);
    }

    /// <summary>An image's bytes (<c>GET /view</c>).</summary>
    public async Task<byte[]> ViewAsync(ComfyImageRef image, CancellationToken ct)
    {
        var query = $"view?filename={Uri.EscapeDataString(image.Filename)}&subfolder={Uri.EscapeDataString(image.Subfolder)}&type={Uri.EscapeDataString(image.Type)}";
        using var response = await SendAsync(HttpMethod.Get, query, null, ct);
        if (!response.IsSuccessStatusCode)
        {
            throw new ComfyUiUnavailableException($"ComfyUI answered {(int)response.StatusCode} for the image {image.Subfolder}/{image.Filename}.");
        }
        return await response.Content.ReadAsByteArrayAsync(ct);
    }

    /// <summary>Forgets a finished job (<c>POST /history {"delete"}</c>): its images stay in ComfyUI's output folder.</summary>
    public async Task ForgetAsync(Guid promptId)
    {
        using var timeout = new CancellationTokenSource(CleanupTimeout);
        try
        {
            using var _ = await SendAsync(HttpMethod.Post, "history", new JsonObject { ["delete"] = new JsonArray(promptId.ToString("D")) }, timeout.Token);
        }
        catch (Exception e) when (e is HttpRequestException or ComfyUiUnavailableException or OperationCanceledException)
        {
            // History is bounded by ComfyUI itself; this is housekeeping.
        }
    }

    /// <summary>Is ComfyUI answering at all (<c>GET /queue</c>), and is <paramref name="promptId"/> running, pending, or neither?</summary>
    public async Task<(bool Running, bool Pending)> QueueStateAsync(string? promptId, CancellationToken ct)
    {
        using var response = await SendAsync(HttpMethod.Get, "queue", null, ct);
        response.EnsureSuccessStatusCode();
        var queue = await response.Content.ReadFromJsonAsync<JsonObject>(ct) ?? [];
        return (Contains(queue["queue_running"], promptId), Contains(queue["queue_pending"], promptId));

        // Queue items are [number, prompt_id, prompt, extra_data, outputs].
        static bool Contains(JsonNode? items, string? id) =>
            id is not null && items is JsonArray list && list.Any(i => i is JsonArray { Count: > 1 } item && item[1]?.GetValue<string>() == id);
    }

    private async Task QueueAsync(JsonObject graph, string promptId, string clientId, CancellationToken ct)
    {
        var body = new JsonObject { ["prompt"] = graph, ["client_id"] = clientId, ["prompt_id"] = promptId };
        var response = await SendAsync(HttpMethod.Post, "prompt", body, ct);
        using (response)
        {
            if (response.IsSuccessStatusCode)
            {
                return;
            }
            var text = await response.Content.ReadAsStringAsync(ct);
            if ((int)response.StatusCode == 400 && TryParseRejection(text) is { } rejected)
            {
                throw rejected;
            }
            throw new ComfyUiUnavailableException($"ComfyUI answered POST /prompt with {(int)response.StatusCode}: {Shorten(text)}");
        }
    }

    internal static ComfyUiRejectedException? TryParseRejection(string text)
    {
        JsonObject? body;
        try
        {
            body = JsonNode.Parse(text) as JsonObject;
        }
        catch (JsonException)
        {
            return null;
        }
        if (body?["error"] is not JsonObject error)
        {
            return null;
        }
        var nodes = new List<ComfyNodeError>();
        if (body["node_errors"] is JsonObject nodeErrors)
        {
            foreach (var (nodeId, node) in nodeErrors)
            {
                var classType = node?["class_type"]?.GetValue<string>() ?? "?";
                foreach (var e in node?["errors"] as JsonArray ?? [])
                {
                    nodes.Add(new ComfyNodeError(nodeId, classType, Text(e?["type"]), Text(e?["message"]),
                        e?["extra_info"]?["input_name"]?.GetValue<string>(), Text(e?["details"])));
                }
            }
        }
        return new ComfyUiRejectedException(Text(error["type"]), Text(error["message"]), nodes);

        static string Text(JsonNode? node) => node is JsonValue value && value.TryGetValue<string>(out var s) ? s : "";
    }

    private async Task FollowAsync(ClientWebSocket socket, string promptId, Action<int, int>? progress, TimeSpan stall, CancellationToken ct)
    {
        var buffer = new byte[64 * 1024];
        using var message = new MemoryStream();
        while (true)
        {
            message.SetLength(0);
            WebSocketReceiveResult received;
            do
            {
                var receive = socket.ReceiveAsync(new ArraySegment<byte>(buffer), ct);
                try
                {
                    // A silence is not an error by itself (the job may wait behind others): ask the queue, keep the socket.
                    while (!await ArrivesWithinAsync(receive, stall, ct))
                    {
                        await StalledAsync(promptId, stall, ct);
                    }
                    received = await receive;
                }
                catch (WebSocketException e) when (!ct.IsCancellationRequested)
                {
                    throw new ComfyUiUnavailableException($"ComfyUI at {BaseUrl} dropped the connection mid-job ({e.Message}); it may have stopped.", e);
                }
                if (received.MessageType == WebSocketMessageType.Close)
                {
                    throw new ComfyUiUnavailableException($"ComfyUI at {BaseUrl} closed the connection mid-job; it may have stopped.");
                }
                message.Write(buffer, 0, received.Count);
            }
            while (!received.EndOfMessage);

            if (received.MessageType != WebSocketMessageType.Text)
            {
                continue; // previews: a 4-byte event type and image bytes
            }
            var frame = JsonNode.Parse(message.GetBuffer().AsSpan(0, (int)message.Length)) as JsonObject;
            var data = frame?["data"] as JsonObject;
            if (data?["prompt_id"]?.GetValue<string>() != promptId)
            {
                continue;
            }
            switch (frame!["type"]?.GetValue<string>())
            {
                case "progress":
                    progress?.Invoke(data["value"]?.GetValue<int>() ?? 0, data["max"]?.GetValue<int>() ?? 0);
                    break;
                case "execution_error":
                    throw new ComfyUiExecutionException(Text(data["node_type"]), Text(data["exception_type"]), Text(data["exception_message"]).Trim());
                case "execution_interrupted":
                    throw new ComfyUiUnavailableException("ComfyUI interrupted the job (someone called /interrupt on that server).");
                case "executing" when data["node"] is null:
                    return; // the job is over; history was written before this message
            }
        }

        static string Text(JsonNode? node) => node is JsonValue value && value.TryGetValue<string>(out var s) ? s : "?";
    }

    /// <summary>Whether <paramref name="receive"/> completes within <paramref name="wait"/>; the timer is cancelled when it does (one per message).</summary>
    private async Task<bool> ArrivesWithinAsync(Task receive, TimeSpan wait, CancellationToken ct)
    {
        using var timer = CancellationTokenSource.CreateLinkedTokenSource(ct);
        var delay = Task.Delay(wait, time, timer.Token);
        var first = await Task.WhenAny(receive, delay);
        await timer.CancelAsync();
        ct.ThrowIfCancellationRequested();
        return first == receive;
    }

    /// <summary>After a silence: returns when the job is still waiting behind others; throws when it runs without progress, is gone, or ComfyUI does not answer.</summary>
    private async Task StalledAsync(string promptId, TimeSpan stall, CancellationToken ct)
    {
        (bool Running, bool Pending) state;
        try
        {
            using var timeout = CancellationTokenSource.CreateLinkedTokenSource(ct);
            timeout.CancelAfter(CleanupTimeout);
            state = await QueueStateAsync(promptId, timeout.Token);
        }
        catch (Exception e) when (e is HttpRequestException or ComfyUiUnavailableException or OperationCanceledException && !ct.IsCancellationRequested)
        {
            throw new ComfyUiUnavailableException($"ComfyUI at {BaseUrl} stopped answering (nothing for {stall.TotalSeconds:0} s, and GET /queue failed).", e);
        }
        if (state.Running)
        {
            throw new ComfyUiUnavailableException($"ComfyUI made no progress on the job for {stall.TotalSeconds:0} s; it was interrupted.");
        }
        if (!state.Pending)
        {
            throw new ComfyUiUnavailableException($"ComfyUI no longer has the job and sent no result for {stall.TotalSeconds:0} s.");
        }
    }

    private async Task<IReadOnlyList<ComfyImageRef>> ImagesAsync(string promptId, string saveNode, CancellationToken ct)
    {
        using var response = await SendAsync(HttpMethod.Get, $"history/{promptId}", null, ct);
        response.EnsureSuccessStatusCode();
        var history = await response.Content.ReadFromJsonAsync<JsonObject>(ct);
        var entry = history?[promptId];
        if (entry?["status"]?["status_str"]?.GetValue<string>() is "error")
        {
            throw new ComfyUiUnavailableException("ComfyUI recorded the job as failed without saying why.");
        }
        var images = entry?["outputs"]?[saveNode]?["images"] as JsonArray;
        if (images is null || images.Count == 0)
        {
            throw new ComfyUiUnavailableException($"ComfyUI finished the job but its history lists no image for node {saveNode}.");
        }
        return images.Select(i => new ComfyImageRef(i?["filename"]?.GetValue<string>() ?? "", i?["subfolder"]?.GetValue<string>() ?? "",
            i?["type"]?.GetValue<string>() ?? "output")).ToList();
    }

    /// <summary>Best effort, after the caller gave up: stop the job if it runs, drop it if it waits.</summary>
    private async Task CancelAsync(string promptId)
    {
        using var timeout = new CancellationTokenSource(CleanupTimeout);
        try
        {
            using var interrupt = await SendAsync(HttpMethod.Post, "interrupt", new JsonObject { ["prompt_id"] = promptId }, timeout.Token);
            using var delete = await SendAsync(HttpMethod.Post, "queue", new JsonObject { ["delete"] = new JsonArray(promptId) }, timeout.Token);
        }
        catch (Exception e) when (e is HttpRequestException or ComfyUiUnavailableException or OperationCanceledException)
        {
            // ComfyUI is gone or slow; nothing else to do.
        }
    }

    /// <summary>One call; a ComfyUI that does not answer within the request timeout is <see cref="ComfyUiUnavailableException"/>.</summary>
    private async Task<HttpResponseMessage> SendAsync(HttpMethod method, string path, JsonNode? body, CancellationToken ct)
    {
        using var request = new HttpRequestMessage(method, new Uri(BaseUrl, path));
        if (body is not null)
        {
            request.Content = new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json");
        }
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(ct);
        timeout.CancelAfter(requestTimeout);
        try
        {
            var response = await invoker.SendAsync(request, timeout.Token);
            // The body is read by the caller: give it the same bound, the timeout's token ends with this method.
            await response.Content.LoadIntoBufferAsync(timeout.Token);
            return response;
        }
        catch (OperationCanceledException e) when (!ct.IsCancellationRequested)
        {
            throw new ComfyUiUnavailableException($"ComfyUI at {BaseUrl} did not answer {method} /{path.Split('?')[0]} within {requestTimeout.TotalSeconds:0} s.", e);
        }
        catch (HttpRequestException e)
        {
            throw new ComfyUiUnavailableException($"ComfyUI at {BaseUrl} cannot be reached ({e.Message}).", e);
        }
    }

    private static string Shorten(string text) => text.Length > 300 ? text[..300] + "…" : text;
}
