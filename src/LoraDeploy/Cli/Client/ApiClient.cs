using System.Net;
using System.Net.Http.Headers;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;

namespace LoraDeploy.Cli.Client;

/// <summary>
/// A thin client over the LoraDeploy HTTP API. One instance per command invocation: it owns its
/// <see cref="HttpClient"/> and disposes it.
/// </summary>
internal sealed class ApiClient : IDisposable
{
    private readonly HttpClient _http;
    private readonly string? _tokenSource;
    private readonly TimeSpan _timeout;

    /// <summary>A client for <paramref name="server"/>; <paramref name="tokenSource"/> names where the token came from
    /// (<c>--token</c> or <c>LORADEPLOY_TOKEN</c>), for a 401's message.</summary>
    public ApiClient(Uri server, string? token, string? tokenSource = null, HttpMessageHandler? handler = null, TimeSpan? timeout = null)
    {
        Server = server;
        _tokenSource = string.IsNullOrWhiteSpace(token) ? null : tokenSource ?? "the token given";
        _http = handler is null ? new HttpClient() : new HttpClient(handler);
        _http.BaseAddress = server;
        // Each request sets its own deadline: an upload lasts as long as its file takes, the others get _timeout.
        _timeout = timeout ?? TimeSpan.FromSeconds(30);
        _http.Timeout = Timeout.InfiniteTimeSpan;
        _http.DefaultRequestHeaders.UserAgent.Add(new ProductInfoHeaderValue("loradeploy-cli", "1.0"));
        if (!string.IsNullOrWhiteSpace(token))
        {
            _http.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", token.Trim());
        }
    }

    public Uri Server { get; }

    public void Dispose() => _http.Dispose();

    public Task<ApiResponse> GetAsync(string path, CancellationToken ct) => SendAsync(HttpMethod.Get, path, null, ct);

    public Task<ApiResponse> PostAsync(string path, JsonNode? body, CancellationToken ct) =>
        SendAsync(HttpMethod.Post, path, body, ct);

    public Task<ApiResponse> PutAsync(string path, JsonNode? body, CancellationToken ct) =>
        SendAsync(HttpMethod.Put, path, body, ct);

    public Task<ApiResponse> DeleteAsync(string path, CancellationToken ct) => SendAsync(HttpMethod.Delete, path, null, ct);

    /// <summary>Sends a request; a non-2xx answer becomes a <see cref="ClientException"/> with a readable message.</summary>
    public Task<ApiResponse> SendAsync(HttpMethod method, string path, JsonNode? body, CancellationToken ct) =>
        SendAsync(method, path, body is null ? null : new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"), _timeout, ct);

    /// <summary>
    /// <c>POST</c> of a multipart form: a <c>json</c> part, then the file at <paramref name="filePath"/> as the <c>file</c>
    /// part, streamed from disk (never read whole). No deadline: it takes as long as the file takes.
    /// </summary>
    public async Task<ApiResponse> PostUploadAsync(string path, JsonNode json, string filePath, CancellationToken ct)
    {
        FileStream file;
        try
        {
            file = new FileStream(filePath, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1024 * 1024, FileOptions.Asynchronous | FileOptions.SequentialScan);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ClientException($"cannot read --file {filePath}: {e.Message}", ExitCodes.Usage);
        }
        await using (file.ConfigureAwait(false))
        {
            using var form = new MultipartFormDataContent();
            form.Add(new StringContent(json.ToJsonString(), Encoding.UTF8, "application/json"), "json");
            var filePart = new StreamContent(file, 1024 * 1024);
            filePart.Headers.ContentType = new MediaTypeHeaderValue("application/octet-stream");
            form.Add(filePart, "file", Path.GetFileName(filePath));
            return await SendAsync(HttpMethod.Post, path, form, Timeout.InfiniteTimeSpan, ct).ConfigureAwait(false);
        }
    }

    private async Task<ApiResponse> SendAsync(HttpMethod method, string path, HttpContent? content, TimeSpan timeout, CancellationToken ct)
    {
        using var request = new HttpRequestMessage(method, path.TrimStart('/')) { Content = content };
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(ct);
        deadline.CancelAfter(timeout);

        HttpResponseMessage response;
        try
        {
            response = await _http.SendAsync(request, deadline.Token).ConfigureAwait(false);
        }
        catch (HttpRequestException ex)
        {
            throw new ClientException($"cannot reach server at {Server}: {Describe(ex)}");
        }
        catch (TaskCanceledException) when (!ct.IsCancellationRequested)
        {
            throw new ClientException($"cannot reach server at {Server}: no answer within {timeout.TotalSeconds:0} s");
        }

        using (response)
        {
            var text = await response.Content.ReadAsStringAsync(deadline.Token).ConfigureAwait(false);
            if (!response.IsSuccessStatusCode)
            {
                throw new ClientException(ErrorFormatter.Format(response.StatusCode, text, _tokenSource), ExitCodes.ServerError,
                    (int)response.StatusCode);
            }

            JsonElement json;
            try
            {
                using var doc = JsonDocument.Parse(string.IsNullOrWhiteSpace(text) ? "null" : text);
                json = doc.RootElement.Clone();
            }
            catch (JsonException)
            {
                throw new ClientException(
                    $"the server at {Server} answered {(int)response.StatusCode} with something that is not JSON");
            }
            return new ApiResponse(json, text);
        }
    }

    /// <summary>
    /// Posts and hands back the answer once its headers are in, its body still to be read (a stream of events); a
    /// non-2xx answer becomes a <see cref="ClientException"/> as in <see cref="SendAsync(HttpMethod, string, JsonNode?, CancellationToken)"/>.
    /// </summary>
    public async Task<HttpResponseMessage> PostStreamingAsync(string path, JsonNode body, CancellationToken ct)
    {
        using var request = new HttpRequestMessage(HttpMethod.Post, path.TrimStart('/'))
        {
            Content = new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"),
        };
        // The deadline covers the headers only; the events then come as slowly as the work goes.
        using var headers = CancellationTokenSource.CreateLinkedTokenSource(ct);
        headers.CancelAfter(_timeout);
        HttpResponseMessage response;
        try
        {
            response = await _http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, headers.Token).ConfigureAwait(false);
        }
        catch (HttpRequestException ex)
        {
            throw new ClientException($"cannot reach server at {Server}: {Describe(ex)}");
        }
        catch (TaskCanceledException) when (!ct.IsCancellationRequested)
        {
            throw new ClientException($"cannot reach server at {Server}: no answer within {_timeout.TotalSeconds:0} s");
        }
        if (!response.IsSuccessStatusCode)
        {
            using (response)
            {
                var text = await response.Content.ReadAsStringAsync(ct).ConfigureAwait(false);
                throw new ClientException(ErrorFormatter.Format(response.StatusCode, text, _tokenSource), ExitCodes.ServerError,
                    (int)response.StatusCode);
            }
        }
        return response;
    }

    private static string Describe(HttpRequestException ex)
    {
        for (Exception? e = ex; e is not null; e = e.InnerException)
        {
            if (e is SocketException socket)
            {
                return socket.SocketErrorCode switch
                {
                    SocketError.ConnectionRefused => "connection refused",
                    SocketError.HostNotFound or SocketError.NoData => "host not found",
                    SocketError.TimedOut => "connection timed out",
                    _ => socket.Message,
                };
            }
        }
        return ex.HttpRequestError switch
        {
            HttpRequestError.ConnectionError => "connection failed",
            HttpRequestError.NameResolutionError => "host not found",
            HttpRequestError.SecureConnectionError => "TLS handshake failed",
            _ => ex.Message,
        };
    }
}

/// <summary>A successful answer: the parsed JSON and the exact text the server sent.</summary>
internal sealed record ApiResponse(JsonElement Json, string Text);

/// <summary>Turns the server's error bodies into one line: <c>{"error":…}</c> or 422 <c>detail</c> items with their <c>loc</c>.</summary>
internal static partial class ErrorFormatter
{
    /// <summary>One line for an error answer; <paramref name="tokenSource"/> is where the token sent came from (<c>--token</c>,
    /// <c>LORADEPLOY_TOKEN</c>), or null when none was sent.</summary>
    public static string Format(HttpStatusCode status, string body, string? tokenSource = null)
    {
        var code = (int)status;
        if (code == 401)
        {
            // A refused token and a missing one need different fixes; the server says "Not authenticated" for both.
            return tokenSource is null
                ? "not authenticated: no token given; use --token TOKEN or set LORADEPLOY_TOKEN"
                : $"not authenticated: the server refused the token from {tokenSource}; check it, or create one with 'loradeploy token create --user NAME'";
        }

        string? message = null;
        try
        {
            using var doc = JsonDocument.Parse(body);
            var root = doc.RootElement;
            if (root.ValueKind == JsonValueKind.Object)
            {
                if (root.TryGetProperty("detail", out var detail))
                {
                    message = FormatDetail(detail);
                }
                else if (root.TryGetProperty("error", out var error) && error.ValueKind == JsonValueKind.String)
                {
                    message = Clean(error.GetString() ?? "");
                }
                else if (root.TryGetProperty("title", out var title) && title.ValueKind == JsonValueKind.String)
                {
                    message = title.GetString();
                }
            }
        }
        catch (JsonException)
        {
            // Not JSON: fall through to the status line.
        }

        message = string.IsNullOrWhiteSpace(message) ? status.ToString() : OneLine(message);
        // A 4xx is the user's to fix and the server's sentence says how; only a 5xx is the server's own failure.
        var prefix = code switch
        {
            422 => "invalid request: ",
            403 => "forbidden: ",
            404 => "not found: ",
            409 => "conflict: ",
            429 => "too many requests: ",
            >= 400 and < 500 => "",
            _ => $"server error {code}: ",
        };
        return prefix + message;
    }

    /// <summary>
    /// The server's messages carry pydantic's "Value error, " prefix (DeepInfra's clients expect it in 422 bodies); a
    /// person reading the CLI does not need it.
    /// </summary>
    public static string Clean(string message) => PydanticPrefix().Replace(message, "");

    [GeneratedRegex(@"^(Value error|Assertion failed), ")]
    private static partial Regex PydanticPrefix();

    private static string FormatDetail(JsonElement detail)
    {
        if (detail.ValueKind == JsonValueKind.String)
        {
            return Clean(detail.GetString() ?? "");
        }
        if (detail.ValueKind != JsonValueKind.Array)
        {
            return detail.ToString();
        }

        var parts = new List<string>();
        foreach (var item in detail.EnumerateArray())
        {
            var msg = Clean(item.TryGetProperty("msg", out var m) ? m.ToString() : item.ToString());
            if (item.TryGetProperty("loc", out var loc) && loc.ValueKind == JsonValueKind.Array)
            {
                var path = string.Join('.', loc.EnumerateArray().Select(static l => l.ToString()));
                parts.Add($"{path}: {msg}");
            }
            else
            {
                parts.Add(msg);
            }
        }
        return string.Join("; ", parts);
    }

    private static string OneLine(string s) => s.ReplaceLineEndings(" ").Trim();
}
