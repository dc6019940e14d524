using System.Diagnostics;
using System.Text.Json;
using LoraDeploy.BaseModels;
using LoraDeploy.Inference;
using LoraDeploy.Workers;
using LoraDeploy.Workers.Host;

namespace LoraDeploy.Serving.ComfyUi;

/// <summary>
/// The <c>comfyui</c> engine of a worker: drives the ComfyUI server(s) of each pool over HTTP and WebSocket. At start it
/// checks through <c>/object_info</c> that the family's nodes and the pool's model files exist, and that ComfyUI lists
/// files written to the pool's LoRA folder (learning the name ComfyUI gives them). Loading an adapter places its file
/// there, waits until ComfyUI lists it, and (unless <c>Defaults:warmup=false</c>) runs a one-step 64×64 generation with
/// it, so a file ComfyUI cannot apply fails the deploy with ComfyUI's words rather than a user's request. Requests
/// build the family graph (<see cref="ImageGraphs"/>) and answer DeepInfra's or OpenAI's image body.
/// A ComfyUI that cannot be reached, drops a job or stalls sets <see cref="Problem"/>: the worker leaves routing until
/// <see cref="CheckHealthAsync"/> finds every pool served again.
/// </summary>
public sealed class ComfyUiServingEngine(ILoggerFactory? loggers = null, TimeProvider? time = null) : IServingEngine, IDisposable
{
    /// <summary>The size and steps of the warm-up generation that makes ComfyUI load an adapter.</summary>
    private const int WarmupSide = 64;

    private readonly ILogger _logger = (loggers ?? Microsoft.Extensions.Logging.Abstractions.NullLoggerFactory.Instance).CreateLogger<ComfyUiServingEngine>();
    private readonly TimeProvider _time = time ?? TimeProvider.System;
    private readonly HttpMessageInvoker _http = new(new SocketsHttpHandler
    {
        AllowAutoRedirect = false,
        UseCookies = false,
        UseProxy = false,
        ConnectTimeout = TimeSpan.FromSeconds(5),
        PooledConnectionIdleTimeout = TimeSpan.FromSeconds(30),
    });
    private readonly Dictionary<string, ComfyPool> _pools = new(StringComparer.Ordinal);
    private readonly Dictionary<string, LoraFolder> _folders = new(StringComparer.Ordinal);
    private volatile string? _problem;

    public string Engine => Engines.ComfyUi;

    public string? Problem => _problem;

    public async Task StartAsync(IReadOnlyList<BaseModelEntry> pools, CancellationToken ct)
    {
        var problems = new List<string>();
        foreach (var entry in pools)
        {
            var settings = entry.ComfyUi ?? new ComfyUiSettings(null, null, null, null, null, null, null);
            var key = $"{BaseModelOptions.Section}:{entry.Name}";
            if (!ImageGraphs.Supports(entry.Family))
            {
                problems.Add($"{key}: the comfyui engine builds graphs for sd1, sdxl and flux1, not '{entry.Family}'.");
                continue;
            }
            if (string.IsNullOrWhiteSpace(settings.LoraFolder) || !Directory.Exists(settings.LoraFolder))
            {
                problems.Add($"{key}:ComfyUi:LoraFolder '{settings.LoraFolder}' is not an existing folder: the worker writes adapters there " +
                    "for ComfyUI to read (register it in ComfyUI's extra_model_paths.yaml as a loras path).");
                continue;
            }
            var folderPath = Path.GetFullPath(settings.LoraFolder);
            if (!_folders.TryGetValue(folderPath, out var folder))
            {
                _folders[folderPath] = folder = new LoraFolder(folderPath);
            }
            var servers = new List<ComfyServer>();
            foreach (var url in Urls(settings))
            {
                var client = new ComfyUiClient(url, _http, _time, ComfyPool.StallOf(settings));
                await WaitReachableAsync(client, ct);
                var (missing, loraPrefix) = await CheckAsync(entry, settings, client, folder, ct);
                problems.AddRange(missing.Select(m => $"{key} ({url}): {m}"));
                servers.Add(new ComfyServer(client, loraPrefix ?? ""));
            }
            _pools[entry.Name] = new ComfyPool(entry, settings, folder, servers, ImageRequest.DefaultsOf(entry));
        }
        if (problems.Count > 0)
        {
            throw new InvalidOperationException("ComfyUI cannot serve these pools: " + string.Join(" ", problems));
        }
    }

    public async Task<AdapterLoadResult> LoadAdapterAsync(string pool, string sha256, string path, CancellationToken ct)
    {
        var p = Of(pool);
        var placement = await p.Folder.PlaceAsync(sha256, path, ct);
        try
        {
            foreach (var server in p.Servers)
            {
                await WaitListedAsync(server, sha256, ct);
            }
            if (p.Entry.Defaults.GetValueOrDefault("warmup") is not "false")
            {
                var warmup = new ImageRequest("warm-up", "", WarmupSide, WarmupSide, 1, p.Defaults.Guidance, 0, 1, p.Defaults.Sampler, p.Defaults.Scheduler, false);
                foreach (var server in p.Servers)
                {
                    var graph = ImageGraphs.Build(p.Entry.Family, p.Settings, warmup, [(server.LoraName(sha256), 1.0)], $"loradeploy/warmup-{sha256[..12]}");
                    await server.Client.RunAsync(graph.ToJson(), graph.SaveNode!, Guid.NewGuid(), null, p.Stall, ct);
                }
            }
            _logger.LogInformation("Adapter {Sha256} placed for ComfyUI ({Placement}) in {Folder}.", sha256, placement, p.Folder.Path);
            return AdapterLoadResult.Loaded;
        }
        catch (ComfyUiExecutionException e)
        {
            p.Folder.Remove(sha256);
            return AdapterLoadResult.Refused($"ComfyUI could not apply the adapter: {e.ExceptionType}: {e.ExceptionMessage}");
        }
        catch (ComfyUiRejectedException e)
        {
            p.Folder.Remove(sha256);
            return AdapterLoadResult.Refused($"ComfyUI refused the adapter's graph: {Describe(e)}");
        }
        catch
        {
            p.Folder.Remove(sha256);
            throw;
        }
    }

    public Task UnloadAdapterAsync(string pool, string sha256)
    {
        Of(pool).Folder.Remove(sha256);
        return Task.CompletedTask;
    }

    public async Task HandleAsync(InferenceCall call, HttpContext http, CancellationToken ct)
    {
        var started = Stopwatch.GetTimestamp();
        var pool = Of(call.Pool);
        var openAi = call.Operation == Operations.ImagesGenerations;
        var request = ImageRequest.From(call.Operation, call.Body, pool.Defaults);
        var requestId = http.Request.Headers[WorkerProtocol.RequestIdHeader].ToString() is { Length: > 0 } given ? given : Guid.NewGuid().ToString("N");
        var server = pool.Choose(call.Adapters);
        var graph = ImageGraphs.Build(pool.Entry.Family, pool.Settings, request,
            [.. call.Adapters.Select(a => (server.LoraName(a.Sha256), (double)a.Scale))], $"loradeploy/{requestId}");
        var promptId = Guid.NewGuid();
        if (request.Stream)
        {
            http.Response.ContentType = "text/event-stream";
            http.Response.Headers.CacheControl = "no-cache";
        }
        var lastStep = -1;
        Action<int, int>? progress = request.Stream
            ? (step, steps) => Interlocked.Exchange(ref lastStep, step)
            : null;

        List<byte[]> images;
        server.Enter();
        try
        {
            var run = server.Client.RunAsync(graph.ToJson(), graph.SaveNode!, promptId, progress, pool.Stall, ct);
            if (request.Stream)
            {
                await StreamProgressAsync(run, () => Volatile.Read(ref lastStep), request.Steps, http, ct);
            }
            var refs = await run;
            images = [];
            foreach (var image in refs)
            {
                images.Add(await server.Client.ViewAsync(image, ct));
            }
            _ = server.Client.ForgetAsync(promptId);
        }
        catch (ComfyUiRejectedException e)
        {
            var (status, message, param) = MapRejection(e);
            await ErrorAsync(http, openAi, request.Stream, status, message, param, ct);
            return;
        }
        catch (ComfyUiExecutionException e)
        {
            var oom = e.ExceptionMessage.Contains("out of memory", StringComparison.OrdinalIgnoreCase) || e.ExceptionType.Contains("OutOfMemory", StringComparison.Ordinal);
            await ErrorAsync(http, openAi, request.Stream, oom ? StatusCodes.Status503ServiceUnavailable : StatusCodes.Status502BadGateway,
                $"ComfyUI failed while running {e.NodeType}: {e.ExceptionType}: {e.ExceptionMessage}", null, ct);
            return;
        }
        catch (ComfyUiUnavailableException e)
        {
            MarkUnhealthy(server, e.Message);
            await ErrorAsync(http, openAi, request.Stream, StatusCodes.Status503ServiceUnavailable, e.Message, null, ct);
            return;
        }
        finally
        {
            server.Leave();
        }

        var runtime = (long)Stopwatch.GetElapsedTime(started).TotalMilliseconds;
        var body = openAi ? OpenAiBody(images) : NativeBody(images, request.Seed, requestId, runtime);
        if (request.Stream)
        {
            await ImageProgressStream.WriteResultAsync(http.Response, body, ct);
        }
        else
        {
            http.Response.ContentType = "application/json";
            await http.Response.Body.WriteAsync(body, ct);
        }
    }

    /// <summary>Asks every pool's servers whether they answer again; clears <see cref="Problem"/> when all do.</summary>
    public async Task<string?> CheckHealthAsync(CancellationToken ct)
    {
        foreach (var server in _pools.Values.SelectMany(p => p.Servers).Where(s => s.Down is not null))
        {
            try
            {
                using var timeout = CancellationTokenSource.CreateLinkedTokenSource(ct);
                timeout.CancelAfter(TimeSpan.FromSeconds(5));
                await server.Client.QueueStateAsync(null, timeout.Token);
                server.Down = null;
                _logger.LogInformation("ComfyUI at {Url} answers again.", server.Client.BaseUrl);
            }
            catch (Exception e) when (e is HttpRequestException or ComfyUiUnavailableException or OperationCanceledException && !ct.IsCancellationRequested)
            {
                // Still down.
            }
        }
        return _problem = PoolProblem();
    }

    public void Dispose() => _http.Dispose();

    private void MarkUnhealthy(ComfyServer server, string reason)
    {
        server.Down = reason;
        _problem = PoolProblem();
        _logger.LogWarning("ComfyUI at {Url} is unavailable: {Reason}", server.Client.BaseUrl, reason);
    }

    /// <summary>A pool whose every server is down makes the worker unfit to serve it.</summary>
    private string? PoolProblem() => _pools.Values.FirstOrDefault(p => p.Servers.All(s => s.Down is not null)) is { } down
        ? $"no ComfyUI of {down.Entry.Name} answers: {down.Servers[0].Down}"
        : null;

    /// <summary>Sends a progress event whenever the step moves, until the job ends.</summary>
    private static async Task StreamProgressAsync(Task run, Func<int> step, int steps, HttpContext http, CancellationToken ct)
    {
        await ImageProgressStream.WriteProgressAsync(http.Response, 0, steps, ct);
        var sent = 0;
        while (!run.IsCompleted)
        {
            await Task.WhenAny(run, Task.Delay(50, ct));
            var now = step();
            if (now > sent)
            {
                sent = now;
                await ImageProgressStream.WriteProgressAsync(http.Response, now, steps, ct);
            }
        }
    }

    /// <summary>
    /// ComfyUI's validation errors: a value the user chose (size, steps, guidance, scale, prompt) is a 422 naming our
    /// parameter; anything else is this installation's configuration (a model file, a node, the LoRA folder): 502.
    /// </summary>
    internal static (int Status, string Message, string? Param) MapRejection(ComfyUiRejectedException e)
    {
        foreach (var error in e.NodeErrors)
        {
            var param = (error.ClassType, error.Input) switch
            {
                (_, "width") => "width",
                (_, "height") => "height",
                (_, "batch_size") => "num_images",
                (_, "steps") => "num_inference_steps",
                (_, "cfg") or ("FluxGuidance", "guidance") => "guidance_scale",
                (_, "seed") => "seed",
                (_, "strength_model" or "strength_clip") => "lora_scale",
                ("CLIPTextEncode", "text") => "prompt",
                _ => null,
            };
            if (param is not null && error.Type is "value_bigger_than_max" or "value_smaller_than_min" or "invalid_input_type")
            {
                return (StatusCodes.Status422UnprocessableEntity, $"{param}: ComfyUI refused the value ({error.Message}: {error.Details}).", param);
            }
        }
        return (StatusCodes.Status502BadGateway, $"ComfyUI refused the graph: {Describe(e)}", null);
    }

    private static string Describe(ComfyUiRejectedException e) => e.NodeErrors.Count == 0
        ? $"{e.Type}: {e.Message}"
        : string.Join("; ", e.NodeErrors.Take(5).Select(n => $"{n.ClassType} (node {n.NodeId}): {n.Type}: {n.Details}".TrimEnd(':', ' ')));

    private static Task ErrorAsync(HttpContext http, bool openAi, bool streaming, int status, string message, string? param, CancellationToken ct) => streaming
        ? ImageProgressStream.WriteErrorAsync(http.Response, status, message, ct)
        : InferenceErrors.WriteAsync(http.Response, openAi, status, message, param);

    private static byte[] NativeBody(List<byte[]> images, ulong seed, string requestId, long runtimeMs)
    {
        using var buffer = new MemoryStream();
        using (var json = new Utf8JsonWriter(buffer))
        {
            json.WriteStartObject();
            json.WriteStartArray("images");
            foreach (var image in images)
            {
                json.WriteStringValue("data:image/png;base64," + Convert.ToBase64String(image));
            }
            json.WriteEndArray();
            // No safety checker runs here: nothing is detected, and the answer says so for every image.
            json.WriteStartArray("nsfw_content_detected");
            foreach (var _ in images)
            {
                json.WriteBooleanValue(false);
            }
            json.WriteEndArray();
            json.WriteNumber("seed", seed);
            json.WriteString("request_id", requestId);
            json.WriteStartObject("inference_status");
            json.WriteString("status", "succeeded");
            json.WriteNumber("runtime_ms", runtimeMs);
            json.WriteNumber("cost", 0);
            json.WriteEndObject();
            json.WriteEndObject();
        }
        return buffer.ToArray();
    }

    private byte[] OpenAiBody(List<byte[]> images)
    {
        using var buffer = new MemoryStream();
        using (var json = new Utf8JsonWriter(buffer))
        {
            json.WriteStartObject();
            json.WriteNumber("created", _time.GetUtcNow().ToUnixTimeSeconds());
            json.WriteStartArray("data");
            foreach (var image in images)
            {
                json.WriteStartObject();
                json.WriteBase64String("b64_json", image);
                json.WriteNull("revised_prompt");
                json.WriteNull("url");
                json.WriteEndObject();
            }
            json.WriteEndArray();
            json.WriteEndObject();
        }
        return buffer.ToArray();
    }

    /// <summary>ComfyUI may still be starting (it loads for a while): wait for it, saying so now and then.</summary>
    private async Task WaitReachableAsync(ComfyUiClient client, CancellationToken ct)
    {
        var since = _time.GetTimestamp();
        var told = TimeSpan.Zero;
        while (true)
        {
            try
            {
                using var timeout = CancellationTokenSource.CreateLinkedTokenSource(ct);
                timeout.CancelAfter(TimeSpan.FromSeconds(10));
                await client.QueueStateAsync(null, timeout.Token);
                return;
            }
            catch (Exception e) when (e is HttpRequestException or ComfyUiUnavailableException or OperationCanceledException && !ct.IsCancellationRequested)
            {
                var waited = _time.GetElapsedTime(since);
                if (waited >= told)
                {
                    _logger.LogWarning("Waiting for ComfyUI at {Url} ({Reason}).", client.BaseUrl, e.Message);
                    told = waited + TimeSpan.FromSeconds(30);
                }
                await Task.Delay(TimeSpan.FromSeconds(1), _time, ct);
            }
        }
    }

    /// <summary>What this pool's graph needs that ComfyUI lacks (one sentence each), and the name prefix ComfyUI gives the LoRA folder's files.</summary>
    private async Task<(List<string> Missing, string? LoraPrefix)> CheckAsync(BaseModelEntry entry, ComfyUiSettings settings, ComfyUiClient client,
        LoraFolder folder, CancellationToken ct)
    {
        var missing = new List<string>();
        var info = await client.GetObjectInfoAsync(null, ct) ?? [];
        foreach (var node in ImageGraphs.NodeClasses(entry.Family).Where(n => info[n] is null))
        {
            missing.Add($"ComfyUI has no node '{node}' (a core node: is this ComfyUI too old?).");
        }
        void Need(string node, string input, string? value, string setting)
        {
            if (info[node] is null || value is null)
            {
                return;
            }
            var choices = ComfyUiClient.Choices(info[node] as System.Text.Json.Nodes.JsonObject, input) ?? [];
            if (!choices.Contains(value, StringComparer.Ordinal))
            {
                missing.Add($"{setting} '{value}' is not among ComfyUI's {node}.{input} choices " +
                    $"({(choices.Count == 0 ? "none" : string.Join(", ", choices.Take(10)) + (choices.Count > 10 ? ", …" : ""))}).");
            }
        }
        var defaults = ImageRequest.DefaultsOf(entry);
        if (entry.Family == "flux1")
        {
            Need("UNETLoader", "unet_name", settings.Unet, "ComfyUi:Unet");
            Need("DualCLIPLoader", "clip_name1", settings.Clip1, "ComfyUi:Clip1");
            Need("DualCLIPLoader", "clip_name2", settings.Clip2, "ComfyUi:Clip2");
            Need("DualCLIPLoader", "type", "flux", "the CLIP type");
            Need("VAELoader", "vae_name", settings.Vae, "ComfyUi:Vae");
        }
        else
        {
            Need("CheckpointLoaderSimple", "ckpt_name", settings.Checkpoint, "ComfyUi:Checkpoint");
        }
        Need("KSampler", "sampler_name", defaults.Sampler, "Defaults:sampler");
        Need("KSampler", "scheduler", defaults.Scheduler, "Defaults:scheduler");
        const string loraNode = "LoraLoader"; // its lora_name choices are the loras folders' files, for every family
        if (info[loraNode] is null)
        {
            missing.Add($"ComfyUI has no node '{loraNode}': its LoRA list cannot be read.");
            return (missing, null);
        }
        // Which name does ComfyUI give a file in our folder? Write one (invisible until complete), and look.
        var probe = $"loradeploy-probe-{Guid.NewGuid():N}.safetensors";
        var probePath = Path.Combine(folder.Path, probe);
        try
        {
            await File.WriteAllBytesAsync(probePath, [2, 0, 0, 0, 0, 0, 0, 0, (byte)'{', (byte)'}'], ct);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            missing.Add($"ComfyUi:LoraFolder '{folder.Path}' is not writable by this worker ({e.Message}).");
            return (missing, null);
        }
        try
        {
            var deadline = _time.GetTimestamp();
            while (true)
            {
                var names = await client.GetChoicesAsync(loraNode, "lora_name", ct) ?? [];
                var seen = names.FirstOrDefault(n => n == probe || n.EndsWith("/" + probe, StringComparison.Ordinal) || n.EndsWith("\\" + probe, StringComparison.Ordinal));
                if (seen is not null)
                {
                    return (missing, seen[..^probe.Length]);
                }
                if (_time.GetElapsedTime(deadline) > TimeSpan.FromSeconds(5))
                {
                    missing.Add($"ComfyUI does not list files written to ComfyUi:LoraFolder '{folder.Path}': add it to ComfyUI's " +
                        $"extra_model_paths.yaml (loradeploy:\\n  loras: {folder.Path}) and restart ComfyUI.");
                    return (missing, null);
                }
                await Task.Delay(TimeSpan.FromMilliseconds(100), _time, ct);
            }
        }
        finally
        {
            File.Delete(probePath);
        }
    }

    /// <summary>ComfyUI rescans a folder when its mtime changes; wait until the placed file is among its choices.</summary>
    private async Task WaitListedAsync(ComfyServer server, string sha256, CancellationToken ct)
    {
        var name = server.LoraName(sha256);
        var since = _time.GetTimestamp();
        var delay = TimeSpan.FromMilliseconds(10);
        while (true)
        {
            var names = await server.Client.GetChoicesAsync("LoraLoader", "lora_name", ct) ?? [];
            if (names.Contains(name, StringComparer.Ordinal))
            {
                return;
            }
            if (_time.GetElapsedTime(since) > TimeSpan.FromSeconds(10))
            {
                throw new ComfyUiUnavailableException($"ComfyUI at {server.Client.BaseUrl} does not list {name} 10 s after it was placed.");
            }
            await Task.Delay(delay, _time, ct);
            delay = TimeSpan.FromMilliseconds(Math.Min(500, delay.TotalMilliseconds * 2));
        }
    }

    private ComfyPool Of(string pool) =>
        _pools.TryGetValue(pool, out var p) ? p : throw new InvalidOperationException($"pool {pool} is not served by this worker's ComfyUI engine");

    /// <summary><c>ComfyUi:Url</c>: one URL, or several separated by commas (one ComfyUI per GPU, say).</summary>
    internal static IReadOnlyList<Uri> Urls(ComfyUiSettings settings) =>
        [.. (settings.Url ?? "").Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries)
            .Select(u => new Uri(u.EndsWith('/') ? u : u + "/"))];

    private sealed class ComfyPool(BaseModelEntry entry, ComfyUiSettings settings, LoraFolder folder, List<ComfyServer> servers, ImageDefaults defaults)
    {
        public BaseModelEntry Entry => entry;
        public ComfyUiSettings Settings => settings;
        public LoraFolder Folder => folder;
        public IReadOnlyList<ComfyServer> Servers => servers;
        public ImageDefaults Defaults => defaults;
        public TimeSpan Stall { get; } = StallOf(settings);

        public static TimeSpan StallOf(ComfyUiSettings settings) => TimeSpan.FromSeconds(settings.StallSeconds ?? 60);

        /// <summary>An up server with the fewest jobs; among equals the one that last ran these adapters (its patched model is warm).</summary>
        public ComfyServer Choose(IReadOnlyList<AdapterScale> adapters)
        {
            var key = string.Join(',', adapters.Select(a => $"{a.Sha256}:{a.Scale}"));
            var up = servers.Where(s => s.Down is null).ToList();
            var candidates = up.Count > 0 ? up : servers;
            var least = candidates.Min(s => s.Running);
            var best = candidates.Where(s => s.Running == least).ToList();
            var chosen = best.FirstOrDefault(s => s.LastAdapters == key) ?? best[0];
            chosen.LastAdapters = key;
            return chosen;
        }
    }

    private sealed class ComfyServer(ComfyUiClient client, string loraPrefix)
    {
        private int _running;

        public ComfyUiClient Client => client;
        public volatile string? Down;
        public volatile string? LastAdapters;
        public int Running => Volatile.Read(ref _running);

        /// <summary>The name ComfyUI lists an adapter's file under (the LoRA folder may be a subfolder of one of its roots).</summary>
        public string LoraName(string sha256) => loraPrefix + LoraFolder.FileName(sha256);

        public void Enter() => Interlocked.Increment(ref _running);
        public void Leave() => Interlocked.Decrement(ref _running);
    }
}
