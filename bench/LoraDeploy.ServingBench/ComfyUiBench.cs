using System.Diagnostics;
using System.Net.Http.Json;
using System.Net.WebSockets;
using System.Security.Cryptography;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraDeploy.Serving.ComfyUi;
using LoraDeploy.Tests.Simulator;

namespace LoraDeploy.ServingBench;

/// <summary>
/// Issue 15's two measurements around ComfyUI, with the ComfyUI simulator the tests use (a job that takes no time, a
/// 128×128 PNG, so what is left is the protocol):
/// <list type="bullet">
/// <item><b>overhead</b>: sequential native requests through the server and the worker's ComfyUI engine; for each, the
/// time from sending our request to ComfyUI accepting <c>/prompt</c>, and from ComfyUI sending its completion message
/// to our client having the whole answer (history, /view, base64, proxy back). Baseline in the same run: a direct
/// client speaking ComfyUI's protocol itself (socket, /prompt, wait, /history, /view).</item>
/// <item><b>placement</b>: a large adapter from the worker's cache into the LoRA folder, hard link vs copy (.part,
/// fsync, rename) on one filesystem, and the time until ComfyUI lists it.</item>
/// </list>
/// </summary>
public static class ComfyUiBench
{
    private const string Pool = "black-forest-labs/FLUX-1-dev";

    public static async Task RunAsync(int rounds, int requests, int adapterMiB)
    {
        var dir = Path.Combine(BenchPaths.Scratch, "comfy-" + Guid.NewGuid().ToString("N")[..8]);
        var loras = Directory.CreateDirectory(Path.Combine(dir, "loras")).FullName;
        try
        {
            await using var comfy = await ComfyUiSimulator.StartAsync(new ComfyUiSimulatorOptions { LoraFolder = loras, StepDelay = TimeSpan.Zero });
            await OverheadAsync(comfy, loras, rounds, requests);
            await PlacementAsync(comfy, loras, rounds, adapterMiB);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    private static Dictionary<string, string?> PoolSettings(ComfyUiSimulator comfy, string loras) => new()
    {
        [$"BaseModels:{Pool}:Family"] = "flux1",
        [$"BaseModels:{Pool}:Engine"] = "comfyui",
        [$"BaseModels:{Pool}:ComfyUi:Url"] = comfy.BaseUrl,
        [$"BaseModels:{Pool}:ComfyUi:LoraFolder"] = loras,
        [$"BaseModels:{Pool}:ComfyUi:Unet"] = "flux1-dev.safetensors",
        [$"BaseModels:{Pool}:ComfyUi:Clip1"] = "clip_l.safetensors",
        [$"BaseModels:{Pool}:ComfyUi:Clip2"] = "t5xxl_fp16.safetensors",
        [$"BaseModels:{Pool}:ComfyUi:Vae"] = "ae.safetensors",
        [$"BaseModels:{Pool}:Defaults:steps"] = "1",
    };

    private static async Task OverheadAsync(ComfyUiSimulator comfy, string loras, int rounds, int requests)
    {
        await using var harness = await Harness.StartAsync(PoolSettings(comfy, loras), new Dictionary<string, string?>(), withHub: false);
        await harness.StartWorkerAsync("comfy-1", slots: 1, engine: new ComfyUiServingEngine());
        var (_, user) = await harness.CreateUserAsync("bench", connections: 1);
        using var direct = new HttpClient(Harness.LoadHandler(1)) { BaseAddress = new Uri(comfy.BaseUrl) };

        var rows = new List<IReadOnlyList<string>>();
        var gatewayBefore = new List<double>();
        var gatewayAfter = new List<double>();
        var directBefore = new List<double>();
        var directAfter = new List<double>();
        for (var round = 0; round < rounds; round++)
        {
            var (gb, ga) = await MeasureAsync(comfy, requests, () => ThroughServerAsync(user));
            var (db, da) = await MeasureAsync(comfy, requests, () => DirectAsync(comfy, direct));
            gatewayBefore.Add(Stats.Median(gb));
            gatewayAfter.Add(Stats.Median(ga));
            directBefore.Add(Stats.Median(db));
            directAfter.Add(Stats.Median(da));
            rows.Add([$"{round + 1}", Stats.F(Stats.Median(db)), Stats.F(Stats.Median(gb)), Stats.F(Stats.Percentile(gb, 0.9)),
                Stats.F(Stats.Median(da)), Stats.F(Stats.Median(ga)), Stats.F(Stats.Percentile(ga, 0.9))]);
        }
        Stats.Table($"ComfyUI overhead, ms ({requests} sequential requests per round, 128×128, 1 step)",
            ["round", "to /prompt: direct p50", "via LoraDeploy p50", "p90", "completion → answer: direct p50", "via LoraDeploy p50", "p90"], rows);
        Stats.Note($"to /prompt, via LoraDeploy p50 across rounds: {Stats.Spread(gatewayBefore)} ms (direct {Stats.Spread(directBefore)})");
        Stats.Note($"completion → answer, via LoraDeploy p50 across rounds: {Stats.Spread(gatewayAfter)} ms (direct {Stats.Spread(directAfter)})");
    }

    /// <summary>Runs <paramref name="requests"/> one at a time; per request, ms from send to ComfyUI's accept and from ComfyUI's completion to the answer read.</summary>
    private static async Task<(List<double> Before, List<double> After)> MeasureAsync(ComfyUiSimulator comfy, int requests, Func<Task> send)
    {
        await send(); // warm: connections, JIT
        var before = new List<double>();
        var after = new List<double>();
        for (var i = 0; i < requests; i++)
        {
            var seen = comfy.Prompts.Count;
            var start = Stopwatch.GetTimestamp();
            await send();
            var end = Stopwatch.GetTimestamp();
            var prompt = comfy.Prompts[seen];
            var finished = comfy.FinishedTimestamp(prompt.PromptId) ?? throw new InvalidOperationException("ComfyUI never finished the job");
            before.Add(Stopwatch.GetElapsedTime(start, prompt.AcceptedTimestamp).TotalMilliseconds);
            after.Add(Stopwatch.GetElapsedTime(finished, end).TotalMilliseconds);
        }
        return (before, after);
    }

    private static async Task ThroughServerAsync(HttpClient user)
    {
        using var response = await user.PostAsJsonAsync($"/v1/inference/{Pool}", new { prompt = "a lighthouse", width = 128, height = 128, seed = 1 });
        var body = await response.Content.ReadAsByteArrayAsync();
        if (!response.IsSuccessStatusCode)
        {
            throw new InvalidOperationException($"inference → {(int)response.StatusCode}: {System.Text.Encoding.UTF8.GetString(body)}");
        }
    }

    /// <summary>What any ComfyUI client must do for one image: the floor LoraDeploy's numbers are read against.</summary>
    private static async Task DirectAsync(ComfyUiSimulator comfy, HttpClient http)
    {
        var clientId = Guid.NewGuid().ToString("N");
        using var socket = new ClientWebSocket();
        await socket.ConnectAsync(comfy.WebSocketUrl(clientId), CancellationToken.None);
        var graph = ImageGraphs.Build("flux1", new("x", "x", null, "flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"),
            new ImageRequest("a lighthouse", "", 128, 128, 1, 3.5, 1, 1, "euler", "simple", false), [], $"direct/{clientId}");
        var promptId = Guid.NewGuid().ToString("D");
        using (var queued = await http.PostAsJsonAsync("/prompt", new JsonObject { ["prompt"] = graph.ToJson(), ["client_id"] = clientId, ["prompt_id"] = promptId }))
        {
            queued.EnsureSuccessStatusCode();
        }
        var buffer = new byte[64 * 1024];
        while (true)
        {
            var received = await socket.ReceiveAsync(buffer, CancellationToken.None);
            if (received.MessageType != WebSocketMessageType.Text)
            {
                continue;
            }
            var frame = JsonNode.Parse(buffer.AsSpan(0, received.Count))!;
            if (frame["type"]?.GetValue<string>() == "executing" && frame["data"]?["node"] is null && frame["data"]?["prompt_id"]?.GetValue<string>() == promptId)
            {
                break;
            }
        }
        var history = JsonNode.Parse(await http.GetStringAsync($"/history/{promptId}"))!;
        var image = history[promptId]!["outputs"]![graph.SaveNode!]!["images"]![0]!;
        await http.GetByteArrayAsync($"/view?filename={image["filename"]}&subfolder={image["subfolder"]}&type=output");
        await socket.CloseOutputAsync(WebSocketCloseStatus.NormalClosure, null, CancellationToken.None);
    }

    private static async Task PlacementAsync(ComfyUiSimulator comfy, string loras, int rounds, int adapterMiB)
    {
        var cache = Path.Combine(Path.GetDirectoryName(loras)!, "cache.bin");
        await using (var file = File.Create(cache))
        {
            var chunk = RandomNumberGenerator.GetBytes(1 << 20);
            for (var i = 0; i < adapterMiB; i++)
            {
                await file.WriteAsync(chunk);
            }
        }
        using var http = new HttpClient { BaseAddress = new Uri(comfy.BaseUrl) };
        var rows = new List<IReadOnlyList<string>>();
        var linked = new List<double>();
        var copied = new List<double>();
        var listed = new List<double>();
        for (var round = 0; round < rounds; round++)
        {
            foreach (var hardLink in new[] { true, false })
            {
                var folder = new LoraFolder(loras) { AllowHardLink = hardLink };
                var sha = Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(32));
                var start = Stopwatch.GetTimestamp();
                var placement = await folder.PlaceAsync(sha, cache, CancellationToken.None);
                var placed = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
                var name = LoraFolder.FileName(sha);
                while (!(await http.GetStringAsync("/object_info/LoraLoader")).Contains(name, StringComparison.Ordinal))
                {
                    await Task.Delay(1);
                }
                var visible = Stopwatch.GetElapsedTime(start).TotalMilliseconds;
                (hardLink ? linked : copied).Add(placed);
                listed.Add(visible - placed);
                rows.Add([$"{round + 1}", placement.ToString(), Stats.F(placed), Stats.F(visible)]);
                folder.Remove(sha);
            }
        }
        File.Delete(cache);
        Stats.Table($"Adapter placement, {adapterMiB} MiB, same filesystem, ms", ["round", "how", "placed", "listed by ComfyUI"], rows);
        Stats.Note($"hard link {Stats.Spread(linked)} ms; copy {Stats.Spread(copied)} ms; ratio copy/link {Stats.F(Stats.Median(copied) / Stats.Median(linked), 0)}×; " +
            $"listed after placing {Stats.Spread(listed)} ms");
    }
}
