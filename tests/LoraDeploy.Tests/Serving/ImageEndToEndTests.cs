using System.Buffers.Binary;
using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraDeploy.Auth;
using LoraDeploy.Tests.Pipeline;
using LoraDeploy.Tests.Simulator;
using LoraDeploy.Tests.Workers;
using LoraDeploy.Workers.Host;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Serving;

/// <summary>
/// Image LoRAs end to end through the real ComfyUI engine: a CivitAI import (simulated CivitAI) reaches <c>running</c>
/// on a comfyui pool served by <c>serve</c>'s in-process worker, which drives a simulated ComfyUI over HTTP and
/// WebSocket; DeepInfra's and OpenAI's image routes answer PNGs; ComfyUI's failures become answers a user can act on.
/// </summary>
public sealed class ImageEndToEndTests : IAsyncLifetime
{
    private const string Pool = PipelineHarness.Flux;
    private readonly string _dir = Directory.CreateTempSubdirectory("image-e2e-").FullName;
    private ComfyUiSimulator _comfy = null!;
    private PipelineHarness _h = null!;
    private string _loras = "";
    private readonly List<IAsyncDisposable> _extra = [];

    public static Dictionary<string, string?> PoolSettings(ComfyUiSimulator comfy, string loraFolder, string pool = Pool) => new()
    {
        [$"BaseModels:{pool}:Family"] = "flux1",
        [$"BaseModels:{pool}:Engine"] = "comfyui",
        [$"BaseModels:{pool}:ComfyUi:Url"] = comfy.BaseUrl,
        [$"BaseModels:{pool}:ComfyUi:Unet"] = "flux1-dev.safetensors",
        [$"BaseModels:{pool}:ComfyUi:Clip1"] = "clip_l.safetensors",
        [$"BaseModels:{pool}:ComfyUi:Clip2"] = "t5xxl_fp16.safetensors",
        [$"BaseModels:{pool}:ComfyUi:Vae"] = "ae.safetensors",
        [$"BaseModels:{pool}:ComfyUi:LoraFolder"] = loraFolder,
        [$"BaseModels:{pool}:ComfyUi:StallSeconds"] = "5",
        [$"BaseModels:{pool}:Defaults:steps"] = "4",
    };

    public async ValueTask InitializeAsync()
    {
        _loras = Directory.CreateDirectory(Path.Combine(_dir, "loras")).FullName;
        _comfy = await ComfyUiSimulator.StartAsync(new ComfyUiSimulatorOptions { LoraFolder = _loras });
        var settings = PoolSettings(_comfy, _loras);
        settings["Workers:Embedded"] = "true";
        settings["Workers:HeartbeatSeconds"] = "1";
        settings["Workers:TimeoutSeconds"] = "3";
        settings["Workers:RequestTimeoutSeconds"] = "30";
        settings[$"BaseModels:{Pool}:MaxAdaptersPerWorker"] = "2";
        _h = await PipelineHarness.StartAsync(settings: settings);
    }

    public async ValueTask DisposeAsync()
    {
        foreach (var extra in _extra)
        {
            await extra.DisposeAsync();
        }
        await _h.DisposeAsync();
        await _comfy.DisposeAsync();
        Directory.Delete(_dir, recursive: true);
    }

    private async Task<(string DeployId, string Sha)> DeployAsync(string name, int seed, bool waitRunning = true)
    {
        var version = _h.Simulator.AddLora(AdapterFiles.Flux1(seed: seed), baseModel: "Flux.1 D");
        var id = (await _h.CreateAsync(name, PipelineHarness.ModelUrl(version))).GetProperty("deploy_id").GetString()!;
        if (waitRunning)
        {
            var deploy = await _h.WaitAsync(id, until: "running");
            Assert.True(deploy.GetProperty("status").GetString() == "running", $"not running: {deploy}");
        }
        var sha = await _h.Server.QueryAsync(db => db.Deploys.Where(d => d.Id == id).Select(d => d.Lora!.AdapterSha256!).SingleAsync());
        return (id, sha);
    }

    private Task<HttpResponseMessage> NativeAsync(string model, object body, TestUser? user = null) =>
        (user ?? _h.User).Client.PostJsonAsync($"/v1/inference/{model}", body);

    private async Task<HttpClient> AdminAsync() => _h.Server.CreateClient(await _h.Server.QueryAsync(db =>
        ApiTokens.CreateForUserAsync(db, "ops", isAdmin: true, "test", DateTime.UtcNow, CancellationToken.None)));

    /// <summary>The user-visible prompts ComfyUI received (the engine's warm-up runs excluded).</summary>
    private List<ComfySimPrompt> UserPrompts(ComfyUiSimulator? comfy = null) =>
        [.. (comfy ?? _comfy).Prompts.Where(p => !Nodes(p.Graph, "SaveImage").Single()["inputs"]!["filename_prefix"]!.GetValue<string>().Contains("warmup"))];

    private static IEnumerable<JsonObject> Nodes(JsonObject graph, string classType) =>
        graph.Select(kv => kv.Value!.AsObject()).Where(n => n["class_type"]!.GetValue<string>() == classType);

    /// <summary>Checks a PNG's signature and header and returns its size.</summary>
    private static (int Width, int Height) Png(byte[] png)
    {
        Assert.Equal([0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A], png[..8]);
        Assert.Equal("IHDR", System.Text.Encoding.ASCII.GetString(png, 12, 4));
        return (BinaryPrimitives.ReadInt32BigEndian(png.AsSpan(16)), BinaryPrimitives.ReadInt32BigEndian(png.AsSpan(20)));
    }

    private static byte[] DataUrl(JsonElement image)
    {
        var url = image.GetString()!;
        Assert.StartsWith("data:image/png;base64,", url);
        return Convert.FromBase64String(url["data:image/png;base64,".Length..]);
    }

    [Fact]
    public async Task A_civitai_lora_runs_on_comfyui_and_the_native_route_answers_pngs_made_with_the_adapter_and_scale_asked_for()
    {
        var (id, sha) = await DeployAsync("neon", seed: 1);
        // Placed under its hash name, visible to ComfyUI, then warmed up once (ComfyUI actually applied it).
        Assert.True(File.Exists(Path.Combine(_loras, $"{sha}.safetensors")));
        Assert.Single(_comfy.Prompts);

        var answer = await (await NativeAsync($"{_h.User.Name}/neon",
            new { prompt = "a neon city", width = 512, height = 384, num_images = 2, seed = 1234, lora_scale = 0.7 })).ExpectAsync(HttpStatusCode.OK);

        var images = answer.GetProperty("images").EnumerateArray().Select(DataUrl).ToList();
        Assert.Equal(2, images.Count);
        Assert.All(images, png => Assert.Equal((512, 384), Png(png)));
        Assert.Equal([false, false], answer.GetProperty("nsfw_content_detected").EnumerateArray().Select(e => e.GetBoolean()));
        Assert.Equal(1234, answer.GetProperty("seed").GetInt64());
        Assert.False(string.IsNullOrEmpty(answer.GetProperty("request_id").GetString()));
        Assert.Equal("succeeded", answer.GetProperty("inference_status").GetProperty("status").GetString());

        var graph = Assert.Single(UserPrompts()).Graph;
        var lora = Assert.Single(Nodes(graph, "LoraLoaderModelOnly"))["inputs"]!;
        Assert.Equal($"{sha}.safetensors", lora["lora_name"]!.GetValue<string>());
        Assert.Equal(0.7, lora["strength_model"]!.GetValue<double>());
        Assert.Equal("a neon city", Assert.Single(Nodes(graph, "CLIPTextEncode"))["inputs"]!["text"]!.GetValue<string>());
        Assert.Equal(4, Assert.Single(Nodes(graph, "KSampler"))["inputs"]!["steps"]!.GetValue<int>()); // the pool's default

        // The same request by deploy id reaches the same adapter.
        var byId = await (await _h.User.Client.PostJsonAsync($"/v1/inference/deploy/{id}", new { prompt = "a neon city", seed = 5 })).ExpectAsync(HttpStatusCode.OK);
        Assert.Single(byId.GetProperty("images").EnumerateArray());
    }

    [Fact]
    public async Task The_same_seed_gives_the_same_image_and_another_seed_or_scale_another()
    {
        await DeployAsync("repeat", seed: 2);
        var model = $"{_h.User.Name}/repeat";
        async Task<byte[]> ImageAsync(object body) =>
            DataUrl((await (await NativeAsync(model, body)).ExpectAsync(HttpStatusCode.OK)).GetProperty("images")[0]);

        var first = await ImageAsync(new { prompt = "a fox", seed = 77, width = 256, height = 256 });
        var again = await ImageAsync(new { prompt = "a fox", seed = 77, width = 256, height = 256 });
        var otherSeed = await ImageAsync(new { prompt = "a fox", seed = 78, width = 256, height = 256 });
        var otherScale = await ImageAsync(new { prompt = "a fox", seed = 77, width = 256, height = 256, lora_scale = 0.3 });

        Assert.Equal(first, again);
        Assert.NotEqual(first, otherSeed);
        Assert.NotEqual(first, otherScale);

        // Without a seed, the answer says which one was used; sending it back reproduces the image.
        var random = await (await NativeAsync(model, new { prompt = "a fox", width = 256, height = 256 })).ExpectAsync(HttpStatusCode.OK);
        var seed = random.GetProperty("seed").GetInt64();
        Assert.Equal(DataUrl(random.GetProperty("images")[0]), await ImageAsync(new { prompt = "a fox", seed, width = 256, height = 256 }));
    }

    [Fact]
    public async Task OpenAi_images_answer_b64_json_and_the_base_model_generates_without_an_adapter()
    {
        var (_, sha) = await DeployAsync("openai", seed: 3);
        var answer = await (await _h.User.Client.PostJsonAsync("/v1/openai/images/generations",
            new { model = $"{_h.User.Name}/openai", prompt = "a boat", n = 2, size = "256x512", response_format = "b64_json" })).ExpectAsync(HttpStatusCode.OK);
        Assert.True(answer.GetProperty("created").GetInt64() > 1_700_000_000);
        var data = answer.GetProperty("data").EnumerateArray().ToList();
        Assert.Equal(2, data.Count);
        Assert.All(data, d => Assert.Equal((256, 512), Png(Convert.FromBase64String(d.GetProperty("b64_json").GetString()!))));
        Assert.Equal($"{sha}.safetensors", Nodes(UserPrompts()[^1].Graph, "LoraLoaderModelOnly").Single()["inputs"]!["lora_name"]!.GetValue<string>());

        var plain = await (await _h.User.Client.PostJsonAsync("/v1/images/generations", new { model = Pool, prompt = "a boat", size = "256x256" })).ExpectAsync(HttpStatusCode.OK);
        Assert.Single(plain.GetProperty("data").EnumerateArray());
        Assert.Empty(Nodes(UserPrompts()[^1].Graph, "LoraLoaderModelOnly"));
    }

    [Fact]
    public async Task Two_loras_are_stacked_in_request_order_with_their_own_scales()
    {
        var (_, first) = await DeployAsync("style", seed: 4);
        var (_, second) = await DeployAsync("detail", seed: 5);
        await (await NativeAsync($"{_h.User.Name}/style", new
        {
            prompt = "a castle",
            width = 256,
            height = 256,
            lora_scale = 0.9,
            loras = new[] { new { model = $"{_h.User.Name}/detail", scale = 0.4 } },
        })).ExpectAsync(HttpStatusCode.OK);

        var loras = Nodes(UserPrompts().Single().Graph, "LoraLoaderModelOnly").Select(n => n["inputs"]!).ToList();
        Assert.Equal([$"{first}.safetensors", $"{second}.safetensors"], loras.Select(l => l["lora_name"]!.GetValue<string>()));
        Assert.Equal([0.9, 0.4], loras.Select(l => l["strength_model"]!.GetValue<double>()));
    }

    [Fact]
    public async Task The_stream_reports_comfyuis_steps_then_the_result()
    {
        await DeployAsync("stream", seed: 6);
        _comfy.Faults.StepDelay = TimeSpan.FromMilliseconds(30);
        using var request = new HttpRequestMessage(HttpMethod.Post, $"/v1/inference/{_h.User.Name}/stream")
        {
            Content = JsonContent.Create(new { prompt = "a wave", width = 256, height = 256, num_inference_steps = 6, stream = true }),
        };
        using var response = await _h.User.Client.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        Assert.Equal("text/event-stream", response.Content.Headers.ContentType?.MediaType);
        var events = new List<Inference.ImageStreamEvent>();
        await foreach (var e in Inference.ImageProgressStream.ReadAsync(await response.Content.ReadAsStreamAsync(), CancellationToken.None))
        {
            events.Add(e);
        }
        var steps = events.OfType<Inference.ImageStreamProgress>().Select(e => e.Step).ToList();
        Assert.True(steps.Count >= 3, $"progress events: {string.Join(",", steps)}");
        Assert.Equal(steps.Order(), steps);
        Assert.Equal(6, steps[^1]);
        var result = Assert.IsType<Inference.ImageStreamResult>(events[^1]);
        Assert.Equal((256, 256), Png(DataUrl(result.Answer.GetProperty("images")[0])));
    }

    [Fact]
    public async Task A_webhook_gets_the_images_comfyui_made_under_the_request_id_answered_at_once()
    {
        await DeployAsync("hooked", seed: 16);
        await using var receiver = await WebhookReceiver.StartAsync();
        var queued = await (await NativeAsync($"{_h.User.Name}/hooked",
            new { prompt = "a kite", width = 256, height = 256, seed = 3, webhook = receiver.Url })).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal("queued", queued.GetProperty("inference_status").GetProperty("status").GetString());

        var delivered = await receiver.NextAsync();
        Assert.Equal(queued.GetProperty("request_id").GetString(), delivered.GetProperty("request_id").GetString());
        Assert.Equal("succeeded", delivered.GetProperty("inference_status").GetProperty("status").GetString());
        Assert.Equal((256, 256), Png(DataUrl(delivered.GetProperty("images")[0])));
        Assert.Equal(3, delivered.GetProperty("seed").GetInt64());
        // ComfyUI saved the image under the same id.
        Assert.Contains($"loradeploy/{delivered.GetProperty("request_id").GetString()}", UserPrompts().Single().Graph.ToJsonString());
    }

    [Fact]
    public async Task Loradeploy_generate_shows_comfyuis_steps_and_writes_the_png()
    {
        await DeployAsync("cli", seed: 17);
        var output = Path.Combine(_dir, "cli.png");
        var result = await Dashboard.LoraDeployExe.RunAsync(["generate", $"{_h.User.Name}/cli", "a red fox", "-o", output, "--seed", "9", "--steps", "3",
            "--scale", "0.6", "--width", "256", "--height", "256", "--server", _h.Server.BaseUrl.ToString(), "--token", _h.User.Token]);

        Assert.True(result.ExitCode == 0, result.ToString());
        Assert.Equal((256, 256), Png(await File.ReadAllBytesAsync(output)));
        Assert.Contains("step 3/3", result.StdOut);
        Assert.EndsWith("seed 9", result.StdOut.Trim());
        Assert.Equal(0.6, Nodes(UserPrompts().Single().Graph, "LoraLoaderModelOnly").Single()["inputs"]!["strength_model"]!.GetValue<double>());
    }

    [Fact]
    public async Task Stopping_a_deploy_removes_its_file_from_the_lora_folder_and_inference_answers_423()
    {
        var (id, sha) = await DeployAsync("evict", seed: 7);
        var file = Path.Combine(_loras, $"{sha}.safetensors");
        Assert.True(File.Exists(file));
        (await _h.User.Client.PostAsync($"/deploy/{id}/stop", null)).EnsureSuccessStatusCode();
        await Eventually.TrueAsync(() => !File.Exists(file), "the adapter file is removed from ComfyUI's LoRA folder");
        Assert.Equal(HttpStatusCode.Locked, (await NativeAsync($"{_h.User.Name}/evict", new { prompt = "x" })).StatusCode);
    }

    [Fact]
    public async Task Past_max_adapters_per_worker_the_least_recently_used_file_leaves_the_lora_folder_and_comes_back_when_asked_for()
    {
        // MaxAdaptersPerWorker is 2 here. Unpinned (min_instances 0) deploys stay cached on the worker until a third
        // adapter needs the room: then the least recently used one is evicted, and its file with it.
        async Task<(string Id, string File)> UnpinnedAsync(string name, int seed)
        {
            var (id, sha) = await DeployAsync(name, seed);
            (await _h.User.Client.PutAsJsonAsync($"/deploy/{id}", new { settings = new { min_instances = 0, max_instances = 1 } })).EnsureSuccessStatusCode();
            await Eventually.TrueAsync(() => _h.Server.QueryAsync(db => db.Instances.AllAsync(i => i.DeployId != id)), $"{name} unpinned");
            return (id, Path.Combine(_loras, $"{sha}.safetensors"));
        }
        async Task GenerateAsync(string name) =>
            await (await NativeAsync($"{_h.User.Name}/{name}", new { prompt = name, width = 128, height = 128 })).ExpectAsync(HttpStatusCode.OK);

        var (_, first) = await UnpinnedAsync("lru-a", seed: 21);
        var (_, second) = await UnpinnedAsync("lru-b", seed: 22);
        await GenerateAsync("lru-a"); // b is now the least recently used
        Assert.True(File.Exists(first) && File.Exists(second));

        var (_, third) = await UnpinnedAsync("lru-c", seed: 23);
        await Eventually.TrueAsync(() => !File.Exists(second), "the least recently used adapter's file is removed");
        Assert.True(File.Exists(first) && File.Exists(third));

        // Asked for again, b is placed again (evicting a, now the least recently used) and generates with its file.
        await GenerateAsync("lru-c");
        await GenerateAsync("lru-b");
        Assert.True(File.Exists(second));
        await Eventually.TrueAsync(() => !File.Exists(first), "the next least recently used adapter's file is removed");
        var last = UserPrompts().Last().Graph;
        Assert.Equal(Path.GetFileName(second), Path.GetFileName(Nodes(last, "LoraLoaderModelOnly").Single()["inputs"]!["lora_name"]!.GetValue<string>()));
    }

    [Fact]
    public async Task A_private_adapter_is_invisible_to_another_user()
    {
        await DeployAsync("secret", seed: 8);
        var other = await _h.Server.CreateUserAsync("mallory");
        var answer = await NativeAsync($"{_h.User.Name}/secret", new { prompt = "x" }, other);
        Assert.Equal(HttpStatusCode.NotFound, answer.StatusCode);
        var openAi = await other.Client.PostJsonAsync("/v1/openai/images/generations", new { model = $"{_h.User.Name}/secret", prompt = "x" });
        Assert.Equal(HttpStatusCode.NotFound, openAi.StatusCode);
        Assert.Empty(UserPrompts());
    }

    [Fact]
    public async Task ComfyUis_validation_errors_become_a_422_naming_the_parameter_or_a_502_for_the_installation()
    {
        await DeployAsync("errors", seed: 9);
        var model = $"{_h.User.Name}/errors";

        _comfy.Faults.RejectNextPrompts(1, new ComfySimNodeError("value_bigger_than_max", "Value bigger than max", "steps, 200 > 100", "KSampler", "steps"));
        var tooMany = await NativeAsync(model, new { prompt = "x", num_inference_steps = 120 });
        Assert.Equal(HttpStatusCode.UnprocessableEntity, tooMany.StatusCode);
        var body = await tooMany.Content.ReadFromJsonAsync<JsonElement>();
        Assert.StartsWith("num_inference_steps", body.GetProperty("error").GetString());

        _comfy.Faults.RejectNextPrompts(1, new ComfySimNodeError("value_not_in_list", "Value not in list", "unet_name: 'flux1-dev.safetensors' not in []", "UNETLoader", "unet_name"));
        var openAi = await _h.User.Client.PostJsonAsync("/v1/openai/images/generations", new { model, prompt = "x" });
        Assert.Equal(HttpStatusCode.BadGateway, openAi.StatusCode);
        var error = (await openAi.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("error");
        Assert.Contains("UNETLoader", error.GetProperty("message").GetString());
        Assert.Equal("server_error", error.GetProperty("type").GetString());

        _comfy.Faults.ExecutionError = new ComfySimExecutionError("KSampler", "RuntimeError", "mat1 and mat2 shapes cannot be multiplied");
        var failed = await NativeAsync(model, new { prompt = "x", seed = 99 });
        Assert.Equal(HttpStatusCode.BadGateway, failed.StatusCode);
        Assert.Contains("mat1 and mat2 shapes cannot be multiplied", (await failed.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("error").GetString());

        _comfy.Faults.ExecutionError = null;
        await (await NativeAsync(model, new { prompt = "x", seed = 100 })).ExpectAsync(HttpStatusCode.OK); // the worker still serves
    }

    [Fact]
    public async Task An_adapter_comfyui_cannot_apply_fails_the_deploy_with_comfyuis_words()
    {
        _comfy.Faults.ExecutionError = new ComfySimExecutionError("LoraLoaderModelOnly", "safetensors_rust.SafetensorError", "Error while deserializing header: InvalidHeaderDeserialization");
        var (id, sha) = await DeployAsync("broken", seed: 10, waitRunning: false);
        var deploy = await _h.WaitAsync(id, until: "running");
        var reason = deploy.AssertFailed();
        Assert.Contains("Error while deserializing header", reason);
        Assert.False(File.Exists(Path.Combine(_loras, $"{sha}.safetensors")));
    }

    [Fact]
    public async Task A_client_that_goes_away_interrupts_its_comfyui_job()
    {
        await DeployAsync("leaver", seed: 11);
        _comfy.Faults.StepDelay = TimeSpan.FromMilliseconds(500);
        using var cts = new CancellationTokenSource();
        var request = NativeAsync($"{_h.User.Name}/leaver", new { prompt = "slow", num_inference_steps = 40 });
        await Eventually.TrueAsync(() => UserPrompts().Count == 1, "the job reached ComfyUI");
        _h.User.Client.CancelPendingRequests();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => request);
        await Eventually.TrueAsync(() => _comfy.InterruptCount > 0 || _comfy.QueueDeletes.Count > 0, "ComfyUI was told to stop the job");
    }

    [Fact]
    public async Task A_stalled_comfyui_answers_503_within_the_stall_time_and_the_worker_leaves_routing()
    {
        await DeployAsync("stall", seed: 12);
        _comfy.Faults.Stall = ComfySimStall.Jobs;
        var started = DateTime.UtcNow;
        var stalled = await NativeAsync($"{_h.User.Name}/stall", new { prompt = "x" });
        Assert.Equal(HttpStatusCode.ServiceUnavailable, stalled.StatusCode);
        Assert.Contains("no progress", (await stalled.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("error").GetString());
        Assert.True(DateTime.UtcNow - started < TimeSpan.FromSeconds(25), "answered before the request timeout");
        Assert.True(_comfy.InterruptCount > 0, "the stalled job was interrupted");
    }

    [Fact]
    public async Task A_comfyui_that_dies_mid_job_answers_503_and_the_worker_leaves_routing()
    {
        var (id, _) = await DeployAsync("dies", seed: 13);
        _comfy.Faults.StepDelay = TimeSpan.FromMilliseconds(20);
        _comfy.Faults.DieAtStep = 2;
        var died = await NativeAsync($"{_h.User.Name}/dies", new { prompt = "x" });
        Assert.Equal(HttpStatusCode.ServiceUnavailable, died.StatusCode);
        Assert.Contains("ComfyUI", (await died.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("error").GetString());

        var admin = await AdminAsync();
        await Eventually.TrueAsync(async () =>
            (await (await admin.GetAsync("/v1/workers")).ExpectAsync(HttpStatusCode.OK)).GetArrayLength() == 0, "the worker left routing");
        // The pool has no worker left: the deploy goes back to deploying, and says so to callers.
        await _h.WaitAsync(id, until: "deploying");
        Assert.Equal(HttpStatusCode.Locked, (await NativeAsync($"{_h.User.Name}/dies", new { prompt = "x" })).StatusCode);
    }

    [Fact]
    public async Task A_comfyui_that_stops_answering_takes_the_worker_out_of_routing_until_it_answers_again()
    {
        var (id, _) = await DeployAsync("hangs", seed: 15);
        _comfy.Faults.Stall = ComfySimStall.Requests;
        var hung = await NativeAsync($"{_h.User.Name}/hangs", new { prompt = "x" });
        Assert.Equal(HttpStatusCode.ServiceUnavailable, hung.StatusCode);
        var why = (await hung.Content.ReadFromJsonAsync<JsonElement>()).GetProperty("error").GetString();
        Assert.True(why!.Contains("did not answer") || why.Contains("cannot be reached"), why);
        await _h.WaitAsync(id, until: "deploying");

        _comfy.Faults.Stall = ComfySimStall.None;
        await _h.WaitAsync(id, until: "running");
        await (await NativeAsync($"{_h.User.Name}/hangs", new { prompt = "x", width = 128, height = 128 })).ExpectAsync(HttpStatusCode.OK);
    }

    [Fact]
    public async Task Requests_for_one_adapter_stay_on_the_worker_that_holds_it()
    {
        // A second worker with its own ComfyUI and folder, on the same pool.
        var folder = Directory.CreateDirectory(Path.Combine(_dir, "loras-2")).FullName;
        var comfy2 = await ComfyUiSimulator.StartAsync(new ComfyUiSimulatorOptions { LoraFolder = folder });
        _extra.Add(comfy2);
        var token = await _h.Server.QueryAsync(db => WorkerTokens.CreateAsync(db, "gpu-2", DateTime.UtcNow, CancellationToken.None));
        var args = new List<string>
        {
            "--urls", "http://127.0.0.1:0", $"--DataDir={Path.Combine(_dir, "worker-2")}", $"--Worker:Server={_h.Server.BaseUrl}",
            $"--Worker:Token={token}", "--Worker:Id=gpu-2",
        };
        args.AddRange(PoolSettings(comfy2, folder).Select(kv => $"--{kv.Key}={kv.Value}"));
        var engine = new LoraDeploy.Serving.ComfyUi.ComfyUiServingEngine();
        var worker = WorkerHost.Build([.. args], [engine], builder => builder.Logging.ClearProviders());
        await worker.StartAsync();
        _extra.Add(new Stopping(worker));
        var admin = await AdminAsync();
        await Eventually.TrueAsync(async () =>
            (await (await admin.GetAsync("/v1/workers")).ExpectAsync(HttpStatusCode.OK)).GetArrayLength() == 2, "both workers registered");

        var (_, sha) = await DeployAsync("sticky", seed: 14);
        for (var i = 0; i < 6; i++)
        {
            await (await NativeAsync($"{_h.User.Name}/sticky", new { prompt = $"p{i}", width = 128, height = 128 })).ExpectAsync(HttpStatusCode.OK);
        }
        bool Holds(ComfyUiSimulator c) => UserPrompts(c).Any(p => Nodes(p.Graph, "LoraLoaderModelOnly").Any());
        var counts = new[] { UserPrompts(_comfy).Count, UserPrompts(comfy2).Count };
        Assert.True(counts.Contains(6) && counts.Contains(0), $"requests per ComfyUI: {string.Join("/", counts)}");
        Assert.True(Holds(_comfy) ^ Holds(comfy2));
        var holderFolder = Holds(_comfy) ? _loras : folder;
        Assert.True(File.Exists(Path.Combine(holderFolder, $"{sha}.safetensors")));
    }

    /// <summary>Stops a worker app (it leaves the server) before disposing it.</summary>
    private sealed class Stopping(Microsoft.AspNetCore.Builder.WebApplication app) : IAsyncDisposable
    {
        public async ValueTask DisposeAsync()
        {
            await app.StopAsync();
            await app.DisposeAsync();
        }
    }
}
