using System.Collections.Concurrent;
using System.Net;
using System.Net.WebSockets;
using System.Text;
using System.Text.Json.Nodes;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.Logging;

namespace LoraDeploy.Tests.Simulator;

/// <summary>What the simulated ComfyUI has installed when it starts.</summary>
public sealed class ComfyUiSimulatorOptions
{
    /// <summary>Files created under <c>models/checkpoints</c> (SD1.5/SDXL single-file checkpoints).</summary>
    public IList<string> Checkpoints { get; init; } = ["sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.safetensors"];
    /// <summary>Files created under <c>models/diffusion_models</c> (FLUX UNets).</summary>
    public IList<string> DiffusionModels { get; init; } = ["flux1-dev.safetensors"];
    /// <summary>Files created under <c>models/text_encoders</c>.</summary>
    public IList<string> TextEncoders { get; init; } = ["clip_l.safetensors", "t5xxl_fp16.safetensors"];
    /// <summary>Files created under <c>models/vae</c>.</summary>
    public IList<string> Vaes { get; init; } = ["ae.safetensors", "sdxl_vae.safetensors"];
    /// <summary>Files created under the first LoRA root (relative names with <c>/</c>).</summary>
    public IList<string> Loras { get; init; } = [];
    /// <summary>An existing folder used as the first LoRA root instead of <c>models/loras</c> (the worker under test writes there).</summary>
    public string? LoraFolder { get; init; }
    /// <summary>More LoRA roots searched after the first, like <c>extra_model_paths.yaml</c> entries; the first root holding a name wins.</summary>
    public IList<string> ExtraLoraRoots { get; init; } = [];
    /// <summary>Node classes this server lacks (for "missing node" checks).</summary>
    public IList<string> RemovedNodeClasses { get; init; } = [];
    /// <summary>Delay between sampler steps; changeable later through <see cref="ComfySimFaults.StepDelay"/>.</summary>
    public TimeSpan StepDelay { get; init; } = TimeSpan.FromMilliseconds(1);
    /// <summary>ComfyUI's classic output cache: a node whose inputs match the previous prompt's is not run again. False = <c>--cache-none</c>.</summary>
    public bool CacheEnabled { get; init; } = true;
    /// <summary>Clock for message timestamps and step delays.</summary>
    public TimeProvider? Time { get; init; }
}

/// <summary>One graph <c>POST /prompt</c> accepted.</summary>
/// <param name="Graph">The API-format graph as validated (ComfyUI writes converted widget values back into it).</param>
public sealed record ComfySimPrompt(string PromptId, string? ClientId, JsonObject Graph, double Number)
{
    /// <summary>When the simulator accepted it (<see cref="System.Diagnostics.Stopwatch"/> ticks; benchmarks time the client around it).</summary>
    public long AcceptedTimestamp { get; } = System.Diagnostics.Stopwatch.GetTimestamp();
}

/// <summary>A node error the simulator adds to prompts it rejects on purpose.</summary>
/// <param name="ClassType">The error is attached to the first node of this class, or to the first node when null or absent.</param>
public sealed record ComfySimNodeError(string Type, string Message, string Details, string? ClassType = null, string? InputName = null);

/// <summary>An exception a node raises when it runs.</summary>
/// <param name="ExceptionType">Python's full type name, e.g. <c>RuntimeError</c>, <c>torch.OutOfMemoryError</c> (which gets ComfyUI's OOM tip).</param>
public sealed record ComfySimExecutionError(string ClassType, string ExceptionType = "RuntimeError", string ExceptionMessage = "simulated failure");

/// <summary>How the simulated server hangs.</summary>
public enum ComfySimStall
{
    None,
    /// <summary>The running job stops at its sampler (no progress, interrupts ignored, like a hung GPU); HTTP still answers.</summary>
    Jobs,
    /// <summary>Every HTTP request and WebSocket upgrade hangs until the stall is lifted or the client gives up.</summary>
    Requests,
}

/// <summary>Faults a test may set at any time; each applies from the next point the server reaches.</summary>
public sealed class ComfySimFaults
{
    private readonly Lock _gate = new();
    private int _rejectCount;
    private ComfySimNodeError? _reject;

    internal ComfySimFaults(TimeSpan stepDelay) => StepDelay = stepDelay;

    /// <summary>Delay between sampler steps (slow steps).</summary>
    public TimeSpan StepDelay { get; set; }
    /// <summary>Nodes of this class raise this exception when they run (not when served from cache); null = none.</summary>
    public ComfySimExecutionError? ExecutionError { get; set; }
    /// <summary>The server dies (as a killed process: sockets and listener close) when a sampler reaches this step (1-based).</summary>
    public int? DieAtStep { get; set; }
    public ComfySimStall Stall { get; set; }

    /// <summary>The next <paramref name="count"/> prompts fail validation with <paramref name="error"/> (400 <c>prompt_outputs_failed_validation</c>).</summary>
    public void RejectNextPrompts(int count, ComfySimNodeError error)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(count);
        lock (_gate)
        {
            _rejectCount = count;
            _reject = error;
        }
    }

    internal ComfySimNodeError? TakeRejection()
    {
        lock (_gate)
        {
            if (_rejectCount <= 0 || _reject is null)
            {
                return null;
            }
            _rejectCount--;
            return _reject;
        }
    }
}

/// <summary>
/// A loopback imitation of a ComfyUI server (HTTP + WebSocket), built from shared/reference/serving.md § B and ComfyUI's
/// <c>server.py</c>/<c>execution.py</c>/<c>folder_paths.py</c>: validation with ComfyUI's error shapes, one FIFO executor
/// with its WebSocket messages, the classic output cache, mtime-cached model lists, real PNG outputs, history and /view.
/// <code>
/// await using var comfy = await ComfyUiSimulator.StartAsync(new() { Loras = ["style.safetensors"] });
/// // POST comfy.BaseUrl + "/prompt"; follow comfy.WebSocketUrl(clientId); GET /history/{id}; GET /view?…
/// </code>
/// </summary>
public sealed partial class ComfyUiSimulator : IAsyncDisposable
{
    private readonly WebApplication _app;
    private readonly ComfyUiSimulatorOptions _options;
    private readonly TimeProvider _time;
    private readonly CancellationTokenSource _life = new();
    private readonly ConcurrentDictionary<HttpContext, byte> _active = new();
    private readonly ConcurrentDictionary<string, int> _requests = new(StringComparer.Ordinal);
    private readonly ConcurrentQueue<ComfySimPrompt> _prompts = new();
    private readonly ConcurrentQueue<string> _queueDeletes = new();
    private readonly Dictionary<string, ModelFolder> _folders;
    private readonly Dictionary<string, NodeClass> _nodeClasses;
    private int _port, _interrupts, _killed;
    private Task _executor = Task.CompletedTask, _publisher = Task.CompletedTask;

    private ComfyUiSimulator(WebApplication app, ComfyUiSimulatorOptions options, string root)
    {
        _app = app;
        _options = options;
        _time = options.Time ?? TimeProvider.System;
        Root = root;
        Faults = new ComfySimFaults(options.StepDelay);
        ModelsRoot = Path.Combine(root, "models");
        OutputRoot = Path.Combine(root, "output");
        LoraRoots = [options.LoraFolder ?? Path.Combine(ModelsRoot, "loras"), .. options.ExtraLoraRoots];
        _folders = new(StringComparer.Ordinal)
        {
            ["checkpoints"] = new([Path.Combine(ModelsRoot, "checkpoints")]),
            ["diffusion_models"] = new([Path.Combine(ModelsRoot, "diffusion_models")]),
            ["text_encoders"] = new([Path.Combine(ModelsRoot, "text_encoders")]),
            ["vae"] = new([Path.Combine(ModelsRoot, "vae")]),
            ["loras"] = new(LoraRoots),
        };
        _nodeClasses = NodeClass.All(this).Where(c => !options.RemovedNodeClasses.Contains(c.Name)).ToDictionary(c => c.Name, StringComparer.Ordinal);
    }

    /// <summary>The temp folder this simulator owns (deleted on dispose): <c>models/</c>, <c>output/</c>, <c>input/</c>, <c>temp/</c>.</summary>
    public string Root { get; }
    /// <summary><c>Root/models</c> with <c>checkpoints/ diffusion_models/ text_encoders/ vae/ loras/</c>.</summary>
    public string ModelsRoot { get; }
    /// <summary>Where SaveImage writes (what <c>/view?type=output</c> serves).</summary>
    public string OutputRoot { get; }
    /// <summary>The LoRA roots in search order; <c>LoraRoots[0]</c> is <see cref="ComfyUiSimulatorOptions.LoraFolder"/> or <c>models/loras</c>.</summary>
    public IReadOnlyList<string> LoraRoots { get; }
    /// <summary>e.g. <c>http://127.0.0.1:41234</c> (every route is also under <c>/api</c>).</summary>
    public string BaseUrl => $"http://127.0.0.1:{_port}";
    public ComfySimFaults Faults { get; }

    /// <summary>The socket address a client with <paramref name="clientId"/> connects to.</summary>
    public Uri WebSocketUrl(string clientId) => new($"ws://127.0.0.1:{_port}/ws?clientId={Uri.EscapeDataString(clientId)}");

    /// <summary>Every graph accepted by <c>POST /prompt</c>, in order.</summary>
    public IReadOnlyList<ComfySimPrompt> Prompts => _prompts.ToArray();
    /// <summary>How many <c>POST /interrupt</c> requests arrived.</summary>
    public int InterruptCount => Volatile.Read(ref _interrupts);
    /// <summary>The prompt ids named in <c>POST /queue {"delete": [...]}</c> requests, in order.</summary>
    public IReadOnlyList<string> QueueDeletes => _queueDeletes.ToArray();
    /// <summary>How many <c>POST /queue {"clear": true}</c> requests arrived.</summary>
    public int QueueClears => Volatile.Read(ref _queueClears);
    private int _queueClears;

    /// <summary>GET requests seen for a route template without the /api prefix, e.g. <c>/history/{prompt_id}</c>, <c>/view</c>, <c>/ws</c>, <c>/models/{folder}</c>.</summary>
    public int GetCount(string route) => _requests.GetValueOrDefault("GET " + route);

    /// <summary>When the final <c>executing {node: null}</c> of a prompt was sent (<see cref="System.Diagnostics.Stopwatch"/> ticks), if it was.</summary>
    public long? FinishedTimestamp(string promptId) => _finished.TryGetValue(promptId, out var at) ? at : null;

    private readonly ConcurrentDictionary<string, long> _finished = new(StringComparer.Ordinal);

    /// <summary>POST requests seen for a route without the /api prefix, e.g. <c>/prompt</c>, <c>/free</c>, <c>/queue</c>.</summary>
    public int PostCount(string route) => _requests.GetValueOrDefault("POST " + route);

    /// <summary>True once the server was killed (<see cref="KillAsync"/> or <see cref="ComfySimFaults.DieAtStep"/>).</summary>
    public bool IsDead => Volatile.Read(ref _killed) != 0;

    public static async Task<ComfyUiSimulator> StartAsync(ComfyUiSimulatorOptions? options = null, CancellationToken cancellationToken = default)
    {
        options ??= new();
        var root = Directory.CreateTempSubdirectory("loradeploy-comfy-").FullName;
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        ListenOptions? listen = null;
        builder.WebHost.ConfigureKestrel(k => k.Listen(IPAddress.Loopback, 0, lo => listen = lo));
        var app = builder.Build();
        var sim = new ComfyUiSimulator(app, options, root);
        sim.CreateFolders();
        app.UseWebSockets();
        app.Run(sim.HandleAsync);
        await app.StartAsync(cancellationToken);
        sim._port = listen!.IPEndPoint!.Port;
        sim._executor = Task.Run(() => sim.ExecutorLoopAsync(sim._life.Token), CancellationToken.None);
        sim._publisher = Task.Run(() => sim.PublishLoopAsync(sim._life.Token), CancellationToken.None);
        return sim;
    }

    private void CreateFolders()
    {
        foreach (var dir in new[] { "checkpoints", "diffusion_models", "text_encoders", "vae", "loras" })
        {
            Directory.CreateDirectory(Path.Combine(ModelsRoot, dir));
        }
        foreach (var dir in new[] { OutputRoot, Path.Combine(Root, "input"), Path.Combine(Root, "temp") })
        {
            Directory.CreateDirectory(dir);
        }
        void Create(string folder, IEnumerable<string> names)
        {
            foreach (var name in names)
            {
                WriteDummy(Path.Combine(folder, name));
            }
        }
        Create(Path.Combine(ModelsRoot, "checkpoints"), _options.Checkpoints);
        Create(Path.Combine(ModelsRoot, "diffusion_models"), _options.DiffusionModels);
        Create(Path.Combine(ModelsRoot, "text_encoders"), _options.TextEncoders);
        Create(Path.Combine(ModelsRoot, "vae"), _options.Vaes);
        Create(LoraRoots[0], _options.Loras);
    }

    /// <summary>Writes a small dummy LoRA file into the first LoRA root (which changes its folder's mtime, as a copy would); returns its path.</summary>
    public string AddLora(string relativeName) => WriteDummy(Path.Combine(LoraRoots[0], relativeName));

    private static string WriteDummy(string path)
    {
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        File.WriteAllBytes(path, Encoding.ASCII.GetBytes("simulated model file: " + Path.GetFileName(path)));
        return path;
    }

    /// <summary>Dies like a killed process: open sockets and in-flight requests are cut, the listener closes, the executor stops.</summary>
    public Task KillAsync()
    {
        lock (_killGate)
        {
            // Every caller (a test, the DieAtStep fault, disposal) waits for the one shutdown.
            _killing ??= KillOnceAsync();
            return _killing;
        }
    }

    private readonly Lock _killGate = new();
    private Task? _killing;

    private async Task KillOnceAsync()
    {
        Volatile.Write(ref _killed, 1);
        // Stopping with a cancelled token unbinds the listener and aborts connections at once (started first, so clients
        // rarely see a socket cut while the port still answers); cutting the sockets and requests ourselves as well makes
        // sure nothing lingers. Awaiting a kill returns once the port refuses connections.
        var stopping = _app.StopAsync(new CancellationToken(canceled: true));
        await _life.CancelAsync();
        foreach (var ws in _sockets.Values)
        {
            ws.Socket.Abort();
        }
        foreach (var ctx in _active.Keys)
        {
            try
            {
                ctx.Abort();
            }
            catch (ObjectDisposedException)
            {
                // That request finished between the snapshot and now.
            }
        }
        await stopping;
    }

    public async ValueTask DisposeAsync()
    {
        await KillAsync();
        try
        {
            await Task.WhenAll(_executor, _publisher);
        }
        catch (OperationCanceledException)
        {
            // Stopped on purpose.
        }
        await _app.DisposeAsync();
        _life.Dispose();
        try
        {
            Directory.Delete(Root, recursive: true);
        }
        catch (IOException)
        {
            // A file a test still holds open; the temp folder is harmless.
        }
    }

    // ---- HTTP dispatch ----------------------------------------------------------------------

    private async Task HandleAsync(HttpContext ctx)
    {
        _active[ctx] = 0;
        try
        {
            if (Faults.Stall == ComfySimStall.Requests)
            {
                await WaitWhileAsync(() => Faults.Stall == ComfySimStall.Requests, ctx.RequestAborted);
            }
            var path = ctx.Request.Path.Value ?? "/";
            if (path.StartsWith("/api/", StringComparison.Ordinal))
            {
                path = path["/api".Length..];
            }
            var segments = path.Split('/', StringSplitOptions.RemoveEmptyEntries).Select(Uri.UnescapeDataString).ToArray();
            var get = HttpMethods.IsGet(ctx.Request.Method);
            var post = HttpMethods.IsPost(ctx.Request.Method);
            var (route, handler) = segments switch
            {
                ["ws"] when get => ("/ws", (Func<Task>)(() => WebSocketAsync(ctx))),
                ["object_info"] when get => ("/object_info", () => Json(ctx, 200, ObjectInfo(null))),
                ["object_info", var cls] when get => ("/object_info/{node_class}", () => Json(ctx, 200, ObjectInfo(cls))),
                ["models"] when get => ("/models", () => Json(ctx, 200, new JsonArray([.. _folders.Keys.Select(k => (JsonNode)k)]))),
                ["models", var folder] when get => ("/models/{folder}", () => ModelsAsync(ctx, folder)),
                ["system_stats"] when get => ("/system_stats", () => Json(ctx, 200, SystemStats())),
                ["prompt"] when post => ("/prompt", () => PostPromptAsync(ctx)),
                ["prompt"] when get => ("/prompt", () => Json(ctx, 200, QueueInfo())),
                ["queue"] when get => ("/queue", () => Json(ctx, 200, QueueJson())),
                ["queue"] when post => ("/queue", () => PostQueueAsync(ctx)),
                ["history"] when get => ("/history", () => Json(ctx, 200, HistoryJson(null, ctx.Request.Query["max_items"]))),
                ["history", var id] when get => ("/history/{prompt_id}", () => Json(ctx, 200, HistoryJson(id, default))),
                ["history"] when post => ("/history", () => PostHistoryAsync(ctx)),
                ["view"] when get => ("/view", () => ViewAsync(ctx)),
                ["interrupt"] when post => ("/interrupt", () => PostInterruptAsync(ctx)),
                ["free"] when post => ("/free", () => PostFreeAsync(ctx)),
                _ => ("", () => Text(ctx, 404, "404: Not Found")),
            };
            if (route.Length > 0)
            {
                _requests.AddOrUpdate($"{ctx.Request.Method} {route}", 1, (_, n) => n + 1);
            }
            try
            {
                await handler();
            }
            catch (PythonError ex) when (!ctx.Response.HasStarted)
            {
                // What aiohttp answers when a handler raises (bad JSON body, a node that is not an object, …).
                await Text(ctx, 500, "500 Internal Server Error\n\nServer got itself in trouble: " + ex.Message);
            }
        }
        catch (OperationCanceledException) when (ctx.RequestAborted.IsCancellationRequested || _life.IsCancellationRequested)
        {
            ctx.Abort();
        }
        finally
        {
            _active.TryRemove(ctx, out _);
        }
    }

    private async Task WaitWhileAsync(Func<bool> condition, CancellationToken cancellationToken)
    {
        using var both = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken, _life.Token);
        while (condition())
        {
            await Task.Delay(TimeSpan.FromMilliseconds(10), _time, both.Token);
        }
    }

    private static async Task Json(HttpContext ctx, int status, JsonNode body)
    {
        ctx.Response.StatusCode = status;
        ctx.Response.ContentType = "application/json; charset=utf-8";
        await ctx.Response.WriteAsync(body.ToJsonString(), ctx.RequestAborted);
    }

    private static async Task Text(HttpContext ctx, int status, string body)
    {
        ctx.Response.StatusCode = status;
        ctx.Response.ContentType = "text/plain; charset=utf-8";
        await ctx.Response.WriteAsync(body, ctx.RequestAborted);
    }

    /// <summary><c>await request.json()</c>: malformed JSON raises (aiohttp then answers 500).</summary>
    private static async Task<JsonNode?> ReadJsonAsync(HttpContext ctx)
    {
        using var reader = new StreamReader(ctx.Request.Body, Encoding.UTF8);
        var text = await reader.ReadToEndAsync(ctx.RequestAborted);
        try
        {
            return JsonNode.Parse(text);
        }
        catch (System.Text.Json.JsonException ex)
        {
            throw new PythonError("json.decoder.JSONDecodeError", ex.Message);
        }
    }

    private Task ModelsAsync(HttpContext ctx, string folder) =>
        _folders.TryGetValue(folder, out var f)
            ? Json(ctx, 200, new JsonArray([.. f.List().Select(n => (JsonNode)n)]))
            : Text(ctx, 404, "");

    private JsonObject ObjectInfo(string? only)
    {
        var result = new JsonObject();
        foreach (var cls in _nodeClasses.Values)
        {
            if (only is null || only == cls.Name)
            {
                result[cls.Name] = cls.Info();
            }
        }
        return result;
    }

    private static JsonObject SystemStats() => new()
    {
        ["system"] = new JsonObject
        {
            ["os"] = "linux", ["ram_total"] = 34359738368L, ["ram_free"] = 17179869184L, ["comfyui_version"] = "0.3.64",
            ["python_version"] = "3.12.3 (simulated)", ["pytorch_version"] = "2.8.0+cu128", ["embedded_python"] = false,
            ["argv"] = new JsonArray("main.py", "--listen", "127.0.0.1"),
        },
        ["devices"] = new JsonArray(new JsonObject
        {
            ["name"] = "cuda:0 Simulated GPU : cudaMallocAsync", ["type"] = "cuda", ["index"] = 0,
            ["vram_total"] = 25769803776L, ["vram_free"] = 23622320128L, ["torch_vram_total"] = 0, ["torch_vram_free"] = 0,
        }),
    };

    private async Task ViewAsync(HttpContext ctx)
    {
        var query = ctx.Request.Query;
        if (!query.TryGetValue("filename", out var filenameValues))
        {
            await Text(ctx, 404, "");
            return;
        }
        var filename = filenameValues.ToString();
        if (filename.Length == 0 || filename[0] == '/' || filename.Contains("..", StringComparison.Ordinal))
        {
            await Text(ctx, 400, "");
            return;
        }
        var type = query.TryGetValue("type", out var t) ? t.ToString() : "output";
        string? dir = type switch
        {
            "output" => OutputRoot,
            "input" => Path.Combine(Root, "input"),
            "temp" => Path.Combine(Root, "temp"),
            _ => null,
        };
        if (dir is null)
        {
            await Text(ctx, 400, "");
            return;
        }
        if (query.TryGetValue("subfolder", out var subfolder))
        {
            var full = Path.GetFullPath(Path.Combine(dir, subfolder.ToString()));
            if (full != dir && !full.StartsWith(dir + Path.DirectorySeparatorChar, StringComparison.Ordinal))
            {
                await Text(ctx, 403, "");
                return;
            }
            dir = full;
        }
        var file = Path.Combine(dir, Path.GetFileName(filename));
        if (!File.Exists(file))
        {
            await Text(ctx, 404, "");
            return;
        }
        ctx.Response.StatusCode = 200;
        ctx.Response.ContentType = file.EndsWith(".png", StringComparison.OrdinalIgnoreCase) ? "image/png" : "application/octet-stream";
        ctx.Response.Headers.ContentDisposition = $"filename=\"{Path.GetFileName(file)}\"";
        await ctx.Response.SendFileAsync(file, ctx.RequestAborted);
    }

    private async Task PostInterruptAsync(HttpContext ctx)
    {
        Interlocked.Increment(ref _interrupts);
        JsonNode? body;
        try
        {
            body = await ReadJsonAsync(ctx);
        }
        catch (PythonError)
        {
            body = new JsonObject(); // an empty or malformed body is a global interrupt
        }
        if (body is not JsonObject)
        {
            throw new PythonError("AttributeError", "the body has no attribute 'get'");
        }
        var promptId = body is JsonObject o && o["prompt_id"] is JsonValue v && v.TryGetValue<string>(out var s) && s.Length > 0 ? s : null;
        Interrupt(promptId);
        ctx.Response.StatusCode = 200;
    }

    private async Task PostFreeAsync(HttpContext ctx)
    {
        var body = await ReadJsonAsync(ctx) as JsonObject ?? throw new PythonError("AttributeError", "the body has no attribute 'get'");
        if (IsTruthy(body["free_memory"]))
        {
            _freeMemory = true;
            _queueSignal.Release(); // an idle executor acts on it at once, as ComfyUI's wakes from q.get
        }
        ctx.Response.StatusCode = 200;
    }

    private async Task PostQueueAsync(HttpContext ctx)
    {
        var body = await ReadJsonAsync(ctx) as JsonObject ?? throw new PythonError("AttributeError", "body is not an object");
        if (body.ContainsKey("clear") && IsTruthy(body["clear"]))
        {
            Interlocked.Increment(ref _queueClears);
            WipeQueue();
        }
        if (body["delete"] is JsonArray ids)
        {
            foreach (var id in ids)
            {
                var text = id?.ToString() ?? "";
                _queueDeletes.Enqueue(text);
                DeleteQueueItem(text);
            }
        }
        ctx.Response.StatusCode = 200;
    }

    private async Task PostHistoryAsync(HttpContext ctx)
    {
        var body = await ReadJsonAsync(ctx) as JsonObject ?? throw new PythonError("AttributeError", "body is not an object");
        lock (_queueGate)
        {
            if (body.ContainsKey("clear") && IsTruthy(body["clear"]))
            {
                _history.Clear();
                _historyOrder.Clear();
            }
            if (body["delete"] is JsonArray ids)
            {
                foreach (var id in ids)
                {
                    var key = id?.ToString() ?? "";
                    _history.Remove(key);
                    _historyOrder.Remove(key);
                }
            }
        }
        ctx.Response.StatusCode = 200;
    }

    /// <summary>Python truthiness of a JSON value.</summary>
    private static bool IsTruthy(JsonNode? node) => node switch
    {
        null => false,
        JsonValue v when v.TryGetValue<bool>(out var b) => b,
        JsonValue v when v.TryGetValue<double>(out var d) => d != 0,
        JsonValue v when v.TryGetValue<string>(out var s) => s.Length > 0,
        JsonArray a => a.Count > 0,
        JsonObject o => o.Count > 0,
        _ => true,
    };

    // ---- WebSocket --------------------------------------------------------------------------

    private sealed class Client(string sid, WebSocket socket)
    {
        public string Sid { get; } = sid;
        public WebSocket Socket { get; } = socket;
        public SemaphoreSlim SendLock { get; } = new(1, 1);
    }

    private readonly ConcurrentDictionary<string, Client> _sockets = new(StringComparer.Ordinal);

    private async Task WebSocketAsync(HttpContext ctx)
    {
        if (!ctx.WebSockets.IsWebSocketRequest)
        {
            await Text(ctx, 400, "No WebSocket UPGRADE hdr: None\n Can \"Upgrade\" only to \"WebSocket\".");
            return;
        }
        var socket = await ctx.WebSockets.AcceptWebSocketAsync();
        var sid = ctx.Request.Query["clientId"].ToString();
        if (sid.Length == 0)
        {
            sid = Guid.NewGuid().ToString("N");
        }
        // A reconnect with the same clientId replaces the old socket (which is left open but no longer addressed).
        var client = new Client(sid, socket);
        _sockets[sid] = client;
        try
        {
            await SendToAsync(client, Message("status", new JsonObject { ["status"] = QueueInfo(), ["sid"] = sid }));
            // A client reconnecting while its prompt runs is told the node being executed.
            if (CurrentNodeFor(sid) is { } node)
            {
                await SendToAsync(client, Message("executing", new JsonObject { ["node"] = node }));
            }
            var buffer = new byte[4096];
            using var text = new MemoryStream();
            var first = true;
            while (socket.State == WebSocketState.Open)
            {
                var received = await socket.ReceiveAsync(buffer, _life.Token);
                if (received.MessageType == WebSocketMessageType.Close)
                {
                    await socket.CloseOutputAsync(WebSocketCloseStatus.NormalClosure, null, CancellationToken.None);
                    break;
                }
                text.Write(buffer, 0, received.Count);
                if (!received.EndOfMessage)
                {
                    continue;
                }
                // Only a first message {"type": "feature_flags"} is answered (with the server's flags); anything else is ignored.
                if (first && received.MessageType == WebSocketMessageType.Text && IsFeatureFlags(text.ToArray()))
                {
                    await SendToAsync(client, Message("feature_flags", new JsonObject { ["supports_preview_metadata"] = true, ["max_upload_size"] = 104857600 }));
                }
                first = false;
                text.SetLength(0);
            }
        }
        catch (Exception ex) when (ex is WebSocketException or OperationCanceledException or IOException)
        {
            // The client went away or the server was killed.
        }
        finally
        {
            _sockets.TryRemove(new KeyValuePair<string, Client>(sid, client));
        }
    }

    private static bool IsFeatureFlags(byte[] message)
    {
        try
        {
            return JsonNode.Parse(message) is JsonObject o && o["type"]?.ToString() == "feature_flags";
        }
        catch (System.Text.Json.JsonException)
        {
            return false;
        }
    }

    private static byte[] Message(string type, JsonNode data) =>
        Encoding.UTF8.GetBytes(new JsonObject { ["type"] = type, ["data"] = data }.ToJsonString());

    private static async Task SendToAsync(Client client, byte[] message)
    {
        await client.SendLock.WaitAsync();
        try
        {
            if (client.Socket.State == WebSocketState.Open)
            {
                await client.Socket.SendAsync(message, WebSocketMessageType.Text, endOfMessage: true, CancellationToken.None);
            }
        }
        catch (Exception ex) when (ex is WebSocketException or IOException or ObjectDisposedException)
        {
            // send_socket_catch_exception: a dead socket only logs a warning.
        }
        finally
        {
            client.SendLock.Release();
        }
    }

    private readonly System.Threading.Channels.Channel<(string Event, JsonNode Data, string? Sid)> _outbox =
        System.Threading.Channels.Channel.CreateUnbounded<(string, JsonNode, string?)>(new() { SingleReader = true });

    /// <summary><c>send_sync</c>: queued and sent in order by one publisher; a null sid is a broadcast to every socket.</summary>
    private void Send(string type, JsonNode data, string? sid) => _outbox.Writer.TryWrite((type, data, sid));

    private async Task PublishLoopAsync(CancellationToken cancellationToken)
    {
        await foreach (var (type, data, sid) in _outbox.Reader.ReadAllAsync(cancellationToken))
        {
            var bytes = Message(type, data);
            if (sid is null)
            {
                foreach (var client in _sockets.Values)
                {
                    await SendToAsync(client, bytes);
                }
            }
            else if (_sockets.TryGetValue(sid, out var client))
            {
                await SendToAsync(client, bytes);
            }
        }
    }
}

/// <summary>A Python exception inside the simulated server; <see cref="Exception.Message"/> is what <c>str(ex)</c> gives.</summary>
internal sealed class PythonError(string pythonType, string message) : Exception(message)
{
    public string PythonType { get; } = pythonType;
}
