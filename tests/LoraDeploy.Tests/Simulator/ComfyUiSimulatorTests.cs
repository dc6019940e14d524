using System.Diagnostics;
using System.Net;
using System.Text.Json.Nodes;
using static LoraDeploy.Tests.Simulator.ComfyTestClient;

namespace LoraDeploy.Tests.Simulator;

public class ComfyUiSimulatorTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static Task<ComfyUiSimulator> StartAsync(ComfyUiSimulatorOptions? options = null) =>
        ComfyUiSimulator.StartAsync(options ?? new() { Loras = ["style.safetensors", "flux/style.safetensors"] }, Ct);

    private static async Task<byte[]> ViewAsync(ComfyTestClient client, JsonNode image)
    {
        var url = $"view?filename={Uri.EscapeDataString(image["filename"]!.ToString())}&subfolder={Uri.EscapeDataString(image["subfolder"]!.ToString())}&type={image["type"]}";
        return await client.Http.GetByteArrayAsync(url, Ct);
    }

    private static async Task<JsonObject> HistoryAsync(ComfyTestClient client, string promptId) =>
        (JsonObject)(await client.GetJsonAsync($"history/{promptId}"))[promptId]!;

    /// <summary>Runs a graph to its end and returns the history entry and the bytes of each image.</summary>
    private static async Task<(JsonObject History, List<byte[]> Images)> RunAsync(ComfyTestClient client, JsonObject graph)
    {
        var id = Guid.NewGuid().ToString();
        var (status, body) = await client.PostPromptAsync(graph, id);
        Assert.True(status == 200, body.ToJsonString());
        await client.ReadJobAsync(id);
        var history = await HistoryAsync(client, id);
        var images = new List<byte[]>();
        foreach (var output in history["outputs"]!.AsObject())
        {
            foreach (var image in output.Value!["images"]!.AsArray())
            {
                images.Add(await ViewAsync(client, image!));
            }
        }
        return (history, images);
    }

    [Fact]
    public async Task An_sdxl_graph_runs_with_comfyuis_message_order_and_gives_a_decodable_png()
    {
        await using var sim = await StartAsync();
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);
        var id = Guid.NewGuid().ToString();

        var (status, body) = await client.PostPromptAsync(ComfyGraphs.Sdxl(steps: 5), id);
        var messages = await client.ReadJobAsync(id);

        Assert.Equal(200, status);
        Assert.Equal(id, body["prompt_id"]!.ToString());
        Assert.Empty(body["node_errors"]!.AsObject());
        Assert.Equal("status", Type(messages[0]));
        Assert.Equal(client.ClientId, messages[0]["data"]!["sid"]!.ToString());
        var job = messages.Where(m => Type(m) is not ("status" or "progress_state")).Select(m => Type(m) switch
        {
            "executing" => $"executing:{m["data"]!["node"]?.ToString() ?? "null"}",
            "progress" => $"progress:{m["data"]!["value"]}/{m["data"]!["max"]}",
            var t => t,
        }).ToList();
        Assert.Equal(
        [
            "execution_start", "execution_cached",
            // graph.py's pick order: the checkpoint loader first (two links from SaveImage), then the first ready node.
            "executing:1", "executing:5", "executing:2", "executing:4", "executing:3", "executing:6",
            "progress:1/5", "progress:2/5", "progress:3/5", "progress:4/5", "progress:5/5",
            "executing:7", "executing:8", "executed", "execution_success", "executing:null",
        ], job);
        // task_done writes history and announces the emptied queue before the final executing(null).
        var success = messages.FindIndex(m => Type(m) == "execution_success");
        Assert.Contains(messages[success..^1], m => Type(m) == "status" && (int)m["data"]!["status"]!["exec_info"]!["queue_remaining"]! == 0);
        Assert.All(messages.Where(m => Type(m) == "progress"), m => Assert.Equal(id, m["data"]!["prompt_id"]!.ToString()));
        var states = messages.Last(m => Type(m) == "progress_state")["data"]!["nodes"]!.AsObject();
        Assert.Equal(["1", "2", "3", "4", "5", "6", "7", "8"], states.Select(n => n.Key).Order());
        Assert.All(states, n => Assert.Equal("finished", n.Value!["state"]!.ToString()));
        Assert.Equal(5.0, (double)states["6"]!["value"]!);

        var history = await HistoryAsync(client, id);
        Assert.Equal("success", history["status"]!["status_str"]!.ToString());
        Assert.True((bool)history["status"]!["completed"]!);
        Assert.Equal(["execution_start", "execution_cached", "execution_success"], history["status"]!["messages"]!.AsArray().Select(m => m![0]!.ToString()));
        Assert.Equal(id, history["prompt"]![1]!.ToString());
        Assert.Equal("8", history["prompt"]![4]![0]!.ToString());
        var image = history["outputs"]!["8"]!["images"]![0]!;
        Assert.Equal("req1_00001_.png", image["filename"]!.ToString());
        Assert.Equal("loradeploy", image["subfolder"]!.ToString());
        Assert.Equal("output", image["type"]!.ToString());
        Assert.Equal(image.ToJsonString(), messages.Single(m => Type(m) == "executed")["data"]!["output"]!["images"]![0]!.ToJsonString());
        Assert.Equal("8", history["meta"]!["8"]!["node_id"]!.ToString());
        var (width, height, _) = PngReader.Decode(await ViewAsync(client, image));
        Assert.Equal((64, 48), (width, height));
        Assert.True(File.Exists(Path.Combine(sim.OutputRoot, "loradeploy", "req1_00001_.png")));

        var recorded = Assert.Single(sim.Prompts);
        Assert.Equal((id, client.ClientId), (recorded.PromptId, recorded.ClientId));
        Assert.Equal("style.safetensors", recorded.Graph.Inputs("2")["lora_name"]!.ToString());
    }

    [Fact]
    public async Task A_flux_graph_runs_and_saves_one_png_per_batch_image_at_the_latent_size()
    {
        await using var sim = await StartAsync();
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);

        var id = Guid.NewGuid().ToString();
        await client.PostPromptAsync(ComfyGraphs.Flux(width: 80, height: 40, batch: 2), id);
        var messages = await client.ReadJobAsync(id);
        var history = await HistoryAsync(client, id);
        var images = new List<byte[]>();
        foreach (var image in history["outputs"]!["11"]!["images"]!.AsArray())
        {
            images.Add(await ViewAsync(client, image!));
        }

        // graph.py's order for this graph: VAELoader first (two links from SaveImage), then the first ready node each time.
        Assert.Equal(["3", "8", "2", "5", "7", "6", "1", "4", "9", "10", "11"],
            messages.Where(m => Type(m) == "executing" && m["data"]!["node"] is not null).Select(m => m["data"]!["node"]!.ToString()));

        Assert.Equal("success", history["status"]!["status_str"]!.ToString());
        Assert.Equal(["flux1_00001_.png", "flux1_00002_.png"], history["outputs"]!["11"]!["images"]!.AsArray().Select(i => i!["filename"]!.ToString()));
        Assert.Equal(2, images.Count);
        Assert.All(images, png => Assert.Equal((80, 40), (PngReader.Decode(png).Width, PngReader.Decode(png).Height)));
        Assert.NotEqual(images[0], images[1]);
    }

    [Fact]
    public async Task The_same_inputs_give_identical_bytes_and_a_different_seed_lora_strength_or_text_change_them()
    {
        await using var sim = await StartAsync(new() { Loras = ["style.safetensors", "other.safetensors"], CacheEnabled = false });
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);

        var first = (await RunAsync(client, ComfyGraphs.Sdxl(prefix: "a/one"))).Images.Single();
        var again = (await RunAsync(client, ComfyGraphs.Sdxl(prefix: "b/two"))).Images.Single();
        var seed = (await RunAsync(client, ComfyGraphs.Sdxl(seed: 43))).Images.Single();
        var lora = (await RunAsync(client, ComfyGraphs.Sdxl(lora: "other.safetensors"))).Images.Single();
        var strength = (await RunAsync(client, ComfyGraphs.Sdxl(strength: 0.5))).Images.Single();
        var text = (await RunAsync(client, ComfyGraphs.Sdxl(text: "a blue fox"))).Images.Single();
        var none = (await RunAsync(client, ComfyGraphs.Sdxl(lora: null))).Images.Single();
        var zero = (await RunAsync(client, ComfyGraphs.Sdxl(strength: 0))).Images.Single();

        Assert.Equal(first, again);
        Assert.Equal(6, new[] { first, seed, lora, strength, text, none }.Select(Convert.ToHexString).Distinct().Count());
        Assert.Equal(none, zero); // a LoRA node with both strengths 0 is a no-op
    }

    [Fact]
    public async Task An_identical_prompt_runs_nothing_and_reports_the_earlier_images_again()
    {
        await using var sim = await StartAsync();
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);
        var (firstHistory, _) = await RunAsync(client, ComfyGraphs.Sdxl());
        var id = Guid.NewGuid().ToString();

        await client.PostPromptAsync(ComfyGraphs.Sdxl(), id);
        var messages = await client.ReadJobAsync(id);

        var cached = messages.Single(m => Type(m) == "execution_cached")["data"]!["nodes"]!.AsArray().Select(n => n!.ToString()).Order();
        Assert.Equal(["1", "2", "3", "4", "5", "6", "7", "8"], cached);
        Assert.DoesNotContain(messages, m => Type(m) == "progress" || (Type(m) == "executing" && m["data"]!["node"] is not null));
        Assert.Contains(messages, m => Type(m) == "executed");
        Assert.Equal(firstHistory["outputs"]!.ToJsonString(), (await HistoryAsync(client, id))["outputs"]!.ToJsonString());

        // A new prefix re-runs only SaveImage; a new seed re-runs the sampler too, and the counter continues in the folder.
        var other = Guid.NewGuid().ToString();
        await client.PostPromptAsync(ComfyGraphs.Sdxl(prefix: "loradeploy/other"), other);
        var rerun = await client.ReadJobAsync(other);
        Assert.Equal(["1", "2", "3", "4", "5", "6", "7"], rerun.Single(m => Type(m) == "execution_cached")["data"]!["nodes"]!.AsArray().Select(n => n!.ToString()).Order());
        Assert.Equal("other_00001_.png", (await HistoryAsync(client, other))["outputs"]!["8"]!["images"]![0]!["filename"]!.ToString());
        var (fourth, _) = await RunAsync(client, ComfyGraphs.Sdxl(seed: 1));
        Assert.Equal("req1_00002_.png", fourth["outputs"]!["8"]!["images"]![0]!["filename"]!.ToString());
    }

    [Fact]
    public async Task Object_info_lists_the_graph_nodes_in_comfyuis_shape_and_the_lora_files()
    {
        await using var sim = await StartAsync();
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);

        var all = (await client.GetJsonAsync("object_info")).AsObject();
        var lora = (await client.GetJsonAsync("api/object_info/LoraLoader"))["LoraLoader"]!;
        var loras = (await client.GetJsonAsync("models/loras")).AsArray().Select(n => n!.ToString());

        Assert.Equal(
            ["CLIPTextEncode", "CheckpointLoaderSimple", "ConditioningZeroOut", "DualCLIPLoader", "EmptyLatentImage", "EmptySD3LatentImage", "FluxGuidance",
             "KSampler", "LoraLoader", "LoraLoaderModelOnly", "SaveImage", "UNETLoader", "VAEDecode", "VAELoader"],
            all.Select(p => p.Key).Order(StringComparer.Ordinal));
        Assert.Equal(["flux/style.safetensors", "style.safetensors"], lora["input"]!["required"]!["lora_name"]![0]!.AsArray().Select(n => n!.ToString()));
        Assert.Equal("""["FLOAT",{"default":1,"min":-100,"max":100,"step":0.01}]""", lora["input"]!["required"]!["strength_model"]!.ToJsonString());
        Assert.Equal("""["MODEL","CLIP"]""", lora["output"]!.ToJsonString());
        Assert.False((bool)lora["output_node"]!);
        Assert.True((bool)all["SaveImage"]!["output_node"]!);
        var sampler = all["KSampler"]!["input"]!["required"]!;
        Assert.Superset(new HashSet<string> { "euler", "euler_ancestral", "dpmpp_2m" }, sampler["sampler_name"]![0]!.AsArray().Select(n => n!.ToString()).ToHashSet());
        Assert.Superset(new HashSet<string> { "normal", "karras", "simple" }, sampler["scheduler"]![0]!.AsArray().Select(n => n!.ToString()).ToHashSet());
        Assert.Equal(["flux/style.safetensors", "style.safetensors"], loras);
        Assert.Equal(1, sim.GetCount("/object_info"));
        Assert.Equal(1, sim.GetCount("/object_info/{node_class}"));
        Assert.Equal(1, sim.GetCount("/models/{folder}"));
        Assert.Equal(1, sim.GetCount("/ws"));
    }

    [Fact]
    public async Task A_removed_node_class_is_missing_from_object_info_and_fails_validation_as_missing_node_type()
    {
        await using var sim = await StartAsync(new() { Loras = ["flux/style.safetensors"], RemovedNodeClasses = ["LoraLoaderModelOnly"] });
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);

        var info = await client.GetJsonAsync("object_info/LoraLoaderModelOnly");
        var (status, body) = await client.PostPromptAsync(ComfyGraphs.Flux());

        Assert.Equal("{}", info.ToJsonString());
        Assert.Equal(400, status);
        Assert.Equal("missing_node_type", body["error"]!["type"]!.ToString());
        Assert.Equal("Node 'LoraLoaderModelOnly' not found. The custom node may not be installed.", body["error"]!["message"]!.ToString());
        Assert.Equal("Node ID '#4'", body["error"]!["details"]!.ToString());
        Assert.Empty(sim.Prompts);
    }

    public static TheoryData<string, string, string, string> NodeErrorCases => new()
    {
        // case, node, type, details
        { "lora_not_in_list", "2", "value_not_in_list", "lora_name: 'missing.safetensors' not in ['flux/style.safetensors', 'style.safetensors']" },
        { "required_input_missing", "3", "required_input_missing", "text" },
        { "return_type_mismatch", "6", "return_type_mismatch", "model, received_type(CONDITIONING) mismatch input_type(MODEL)" },
        { "invalid_input_type", "6", "invalid_input_type", "steps, many, invalid literal for int() with base 10: 'many'" },
        { "value_smaller_than_min", "6", "value_smaller_than_min", "steps" },
        { "value_bigger_than_max", "2", "value_bigger_than_max", "strength_model" },
        { "bad_linked_input", "7", "bad_linked_input", "vae" },
        { "link_to_missing_node", "6", "exception_during_inner_validation", "'99'" },
        { "link_to_bad_slot", "6", "exception_during_inner_validation", "tuple index out of range" },
        { "numeric_link_on_output", "8", "exception_during_validation", "7" },
        { "sampler_not_in_list", "6", "value_not_in_list", "sampler_name: 'euler_magic' not in (list of length 34)" },
    };

    [Theory]
    [MemberData(nameof(NodeErrorCases))]
    public async Task Validation_reports_comfyuis_node_error(string scenario, string node, string type, string details)
    {
        await using var sim = await StartAsync();
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);
        var graph = ComfyGraphs.Sdxl();
        switch (scenario)
        {
            case "lora_not_in_list": graph.Inputs("2")["lora_name"] = "missing.safetensors"; break;
            case "required_input_missing": graph.Inputs("3").Remove("text"); break;
            case "return_type_mismatch": graph.Inputs("6")["model"] = ComfyGraphs.Link("4", 0); break;
            case "invalid_input_type": graph.Inputs("6")["steps"] = "many"; break;
            case "value_smaller_than_min": graph.Inputs("6")["steps"] = 0; break;
            case "value_bigger_than_max": graph.Inputs("2")["strength_model"] = 200; break;
            case "bad_linked_input": graph.Inputs("7")["vae"] = new JsonArray("1"); break;
            case "link_to_missing_node": graph.Inputs("6")["latent_image"] = ComfyGraphs.Link("99", 0); break;
            case "link_to_bad_slot": graph.Inputs("6")["latent_image"] = ComfyGraphs.Link("5", 3); break;
            case "numeric_link_on_output": graph.Inputs("8")["images"] = new JsonArray(7, 0); break;
            case "sampler_not_in_list": graph.Inputs("6")["sampler_name"] = "euler_magic"; break;
        }

        var (status, body) = await client.PostPromptAsync(graph);

        Assert.Equal(400, status);
        Assert.Equal("prompt_outputs_failed_validation", body["error"]!["type"]!.ToString());
        Assert.Equal("Prompt outputs failed validation", body["error"]!["message"]!.ToString());
        var entry = body["node_errors"]![node]!;
        Assert.True(entry is not null, body.ToJsonString());
        var error = entry["errors"]![0]!;
        Assert.Equal(type, error["type"]!.ToString());
        Assert.Equal(details, error["details"]!.ToString());
        Assert.Equal(["8"], entry["dependent_outputs"]!.AsArray().Select(n => n!.ToString()));
        Assert.Equal(graph[node]!["class_type"]!.ToString(), entry["class_type"]!.ToString());
        Assert.Single(body["node_errors"]!.AsObject()); // downstream nodes are invalid without errors of their own
        Assert.Empty(sim.Prompts);
    }

    [Fact]
    public async Task Min_and_max_messages_print_values_as_python_does()
    {
        await using var sim = await StartAsync();
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);
        var graph = ComfyGraphs.Sdxl();
        graph.Inputs("2")["strength_clip"] = -200;
        graph.Inputs("6")["seed"] = JsonNode.Parse("18446744073709551616");

        var (_, body) = await client.PostPromptAsync(graph);

        Assert.Equal("Value -200.0 smaller than min of -100.0", body["node_errors"]!["2"]!["errors"]![0]!["message"]!.ToString());
        Assert.Equal("Value 18446744073709551616 bigger than max of 18446744073709551615", body["node_errors"]!["6"]!["errors"]![0]!["message"]!.ToString());
        // The output's own reasons are empty, so ComfyUI's top-level details are too.
        Assert.Equal("", body["error"]!["details"]!.ToString());
    }

    [Theory]
    [InlineData("not-a-uuid")]
    [InlineData("3F2504E0-4F89-41D3-9A0C-0305E82C3301")]
    [InlineData("3f2504e04f8941d39a0c0305e82c3301")]
    public async Task A_prompt_id_that_is_not_a_canonical_lowercase_uuid_is_refused(string promptId)
    {
        await using var sim = await StartAsync();
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);

        var (status, body) = await client.PostPromptAsync(ComfyGraphs.Sdxl(), promptId);

        Assert.Equal(400, status);
        Assert.Equal("invalid_prompt_id", body["error"]!["type"]!.ToString());
        Assert.Equal("{}", body["node_errors"]!.ToJsonString());
    }

    [Fact]
    public async Task A_graph_without_an_output_node_or_without_a_prompt_is_refused()
    {
        await using var sim = await StartAsync();
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);
        var graph = ComfyGraphs.Sdxl();
        graph.Remove("8");

        var (status, body) = await client.PostPromptAsync(graph);
        var (noPromptStatus, noPrompt) = await client.PostAsync("prompt", new JsonObject { ["client_id"] = "x" });

        Assert.Equal(400, status);
        Assert.Equal("prompt_no_outputs", body["error"]!["type"]!.ToString());
        Assert.Equal(400, noPromptStatus);
        Assert.Equal("no_prompt", noPrompt["error"]!["type"]!.ToString());
    }

    [Fact]
    public async Task A_graph_with_one_bad_output_runs_the_good_one_and_reports_the_bad_in_node_errors()
    {
        await using var sim = await StartAsync();
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);
        var graph = ComfyGraphs.Sdxl();
        graph["9"] = new JsonObject { ["class_type"] = "SaveImage", ["inputs"] = new JsonObject { ["images"] = ComfyGraphs.Link("7", -1) } };
        var id = Guid.NewGuid().ToString();

        var (status, body) = await client.PostPromptAsync(graph, id);
        await client.ReadJobAsync(id);

        Assert.Equal(200, status);
        Assert.Equal("required_input_missing", body["node_errors"]!["9"]!["errors"]![0]!["type"]!.ToString()); // slot -1 is Python's last output: only the prefix is wrong
        Assert.Equal(["9"], body["node_errors"]!["9"]!["dependent_outputs"]!.AsArray().Select(n => n!.ToString()));
        var history = await HistoryAsync(client, id);
        Assert.Equal(["8"], history["prompt"]![4]!.AsArray().Select(n => n!.ToString()));
        Assert.Equal(["8"], history["outputs"]!.AsObject().Select(p => p.Key));
    }

    [Fact]
    public async Task A_dependency_cycle_is_reported_on_every_node_in_it()
    {
        await using var sim = await StartAsync();
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);
        var graph = ComfyGraphs.Flux();
        graph.Inputs("6")["conditioning"] = ComfyGraphs.Link("7", 0);
        graph.Inputs("7")["conditioning"] = ComfyGraphs.Link("6", 0);

        var (status, body) = await client.PostPromptAsync(graph);

        Assert.Equal(400, status);
        Assert.Equal("dependency_cycle", body["node_errors"]!["6"]!["errors"]![0]!["type"]!.ToString());
        Assert.Equal("dependency_cycle", body["node_errors"]!["7"]!["errors"]![0]!["type"]!.ToString());
    }

    [Fact]
    public async Task The_lora_list_is_rescanned_only_when_a_scanned_folders_mtime_changes()
    {
        await using var sim = await StartAsync(new() { Loras = ["style.safetensors", "sub/inner.safetensors"] });
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);
        var root = sim.LoraRoots[0];
        async Task<List<string>> ListAsync() => [.. (await client.GetJsonAsync("models/loras")).AsArray().Select(n => n!.ToString())];
        Assert.Equal(["style.safetensors", "sub/inner.safetensors"], await ListAsync());

        // Dropped in without the folder's mtime moving (set back, as a coarse clock might leave it): still the cached list.
        var before = Directory.GetLastWriteTimeUtc(root);
        File.WriteAllText(Path.Combine(root, "new.safetensors"), "x");
        Directory.SetLastWriteTimeUtc(root, before);
        Assert.Equal(["style.safetensors", "sub/inner.safetensors"], await ListAsync());
        var graph = ComfyGraphs.Sdxl(lora: "new.safetensors");
        var (refused, body) = await client.PostPromptAsync(graph);
        Assert.Equal(400, refused);
        Assert.Equal("value_not_in_list", body["node_errors"]!["2"]!["errors"]![0]!["type"]!.ToString());

        // The folder's mtime changes: the next call rescans.
        Directory.SetLastWriteTimeUtc(root, before.AddSeconds(5));
        Assert.Equal(["new.safetensors", "style.safetensors", "sub/inner.safetensors"], await ListAsync());
        Assert.Equal(200, (await client.PostPromptAsync(graph)).Status);

        // A subfolder is scanned too; a file still being written (.part) or of another extension never shows.
        var subBefore = Directory.GetLastWriteTimeUtc(Path.Combine(root, "sub"));
        File.WriteAllText(Path.Combine(root, "sub", "later.safetensors"), "x");
        Directory.SetLastWriteTimeUtc(Path.Combine(root, "sub"), subBefore);
        Assert.DoesNotContain("sub/later.safetensors", await ListAsync());
        Directory.SetLastWriteTimeUtc(Path.Combine(root, "sub"), subBefore.AddSeconds(5));
        Assert.Contains("sub/later.safetensors", await ListAsync());
        File.WriteAllText(Path.Combine(root, "big.safetensors.part"), "x");
        File.WriteAllText(Path.Combine(root, "notes.txt"), "x");
        File.WriteAllText(Path.Combine(root, "UPPER.SFT"), "x");
        Directory.SetLastWriteTimeUtc(root, before.AddSeconds(10));
        Assert.Equal(["UPPER.SFT", "new.safetensors", "style.safetensors", "sub/inner.safetensors", "sub/later.safetensors"], await ListAsync());
    }

    [Fact]
    public async Task Extra_lora_roots_are_listed_after_the_first_without_duplicates_and_serve_at_run_time()
    {
        var extra = Directory.CreateTempSubdirectory("loradeploy-comfy-extra-").FullName;
        var folder = Directory.CreateTempSubdirectory("loradeploy-comfy-worker-").FullName;
        try
        {
            File.WriteAllText(Path.Combine(extra, "shared.safetensors"), "x");
            File.WriteAllText(Path.Combine(extra, "only-extra.pt"), "x");
            File.WriteAllText(Path.Combine(folder, "shared.safetensors"), "x");
            await using var sim = await StartAsync(new() { LoraFolder = folder, ExtraLoraRoots = [extra] });
            await using var client = await ConnectAsync(sim, cancellationToken: Ct);

            var list = (await client.GetJsonAsync("models/loras")).AsArray().Select(n => n!.ToString());
            var (history, _) = await RunAsync(client, ComfyGraphs.Sdxl(lora: "only-extra.pt"));

            Assert.Equal(["only-extra.pt", "shared.safetensors"], list);
            Assert.Equal(folder, sim.LoraRoots[0]);
            Assert.Equal("success", history["status"]!["status_str"]!.ToString());
        }
        finally
        {
            Directory.Delete(extra, recursive: true);
            Directory.Delete(folder, recursive: true);
        }
    }

    [Fact]
    public async Task Without_a_client_id_only_broadcasts_arrive_and_the_job_still_completes()
    {
        await using var sim = await StartAsync();
        await using var watcher = await ConnectAsync(sim, cancellationToken: Ct);
        var id = Guid.NewGuid().ToString();

        var (status, _) = await watcher.PostPromptAsync(ComfyGraphs.Sdxl(steps: 3), id, withClientId: false);
        var messages = await watcher.ReadUntilAsync(m => Type(m) == "progress" && (int)m["data"]!["value"]! == 3);
        var idle = await watcher.ReadUntilAsync(m => Type(m) == "status" && (int)m["data"]!["status"]!["exec_info"]!["queue_remaining"]! == 0);

        Assert.Equal(200, status);
        Assert.All(messages.Concat(idle), m => Assert.Contains(Type(m), new[] { "status", "progress", "progress_state" }));
        Assert.Equal("success", (await HistoryAsync(watcher, id))["status"]!["status_str"]!.ToString());
        Assert.Null(Assert.Single(sim.Prompts).ClientId);
    }

    [Fact]
    public async Task Interrupt_stops_only_the_named_running_prompt_with_execution_interrupted()
    {
        await using var sim = await StartAsync();
        sim.Faults.StepDelay = TimeSpan.FromMilliseconds(20);
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);
        var id = Guid.NewGuid().ToString();
        await client.PostPromptAsync(ComfyGraphs.Sdxl(steps: 500), id);
        await client.ReadUntilAsync(m => Type(m) == "progress");

        Assert.Equal(200, (await client.PostAsync("interrupt", new JsonObject { ["prompt_id"] = Guid.NewGuid().ToString() })).Status);
        await client.ReadUntilAsync(m => Type(m) == "progress" && (int)m["data"]!["value"]! >= 10);
        Assert.Equal(200, (await client.PostAsync("api/interrupt", new JsonObject { ["prompt_id"] = id })).Status);
        var messages = await client.ReadJobAsync(id);

        var interrupted = messages.Single(m => Type(m) == "execution_interrupted")["data"]!;
        Assert.Equal(("6", "KSampler"), (interrupted["node_id"]!.ToString(), interrupted["node_type"]!.ToString()));
        Assert.Equal(["1", "5", "2", "4", "3"], interrupted["executed"]!.AsArray().Select(n => n!.ToString()));
        Assert.DoesNotContain(messages, m => Type(m) is "execution_success" or "executed");
        var history = await HistoryAsync(client, id);
        Assert.Equal("error", history["status"]!["status_str"]!.ToString());
        Assert.False((bool)history["status"]!["completed"]!);
        Assert.Equal(2, sim.InterruptCount);
    }

    [Fact]
    public async Task Queue_delete_and_clear_remove_pending_jobs_and_queue_routes_show_them()
    {
        await using var sim = await StartAsync();
        sim.Faults.Stall = ComfySimStall.Jobs;
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);
        string a = Guid.NewGuid().ToString(), b = Guid.NewGuid().ToString(), c = Guid.NewGuid().ToString(), d = Guid.NewGuid().ToString();
        await client.PostPromptAsync(ComfyGraphs.Sdxl(seed: 1), a);
        await client.ReadUntilAsync(m => Type(m) == "executing" && m["data"]!["node"]?.ToString() == "6");
        foreach (var (id, seed) in new[] { (b, 2UL), (c, 3UL), (d, 4UL) })
        {
            await client.PostPromptAsync(ComfyGraphs.Sdxl(seed: seed), id);
        }

        var queue = await client.GetJsonAsync("queue");
        Assert.Equal(a, queue["queue_running"]![0]![1]!.ToString());
        Assert.Equal([b, c, d], queue["queue_pending"]!.AsArray().Select(j => j![1]!.ToString()));
        Assert.Equal(4, (int)(await client.GetJsonAsync("prompt"))["exec_info"]!["queue_remaining"]!);

        Assert.Equal(200, (await client.PostAsync("queue", new JsonObject { ["delete"] = new JsonArray(c) })).Status);
        Assert.Equal([b, d], (await client.GetJsonAsync("queue"))["queue_pending"]!.AsArray().Select(j => j![1]!.ToString()));
        Assert.Equal(200, (await client.PostAsync("api/queue", new JsonObject { ["clear"] = true })).Status);
        Assert.Empty((await client.GetJsonAsync("queue"))["queue_pending"]!.AsArray());

        // A stalled sampler ignores interrupts but the queue and HTTP still answer; lifting the stall finishes it.
        sim.Faults.Stall = ComfySimStall.None;
        await client.ReadJobAsync(a);
        Assert.Equal("success", (await HistoryAsync(client, a))["status"]!["status_str"]!.ToString());
        foreach (var gone in new[] { b, c, d })
        {
            Assert.Equal("{}", (await client.GetJsonAsync($"history/{gone}")).ToJsonString());
        }
        Assert.Equal([c], sim.QueueDeletes);
        Assert.Equal(1, sim.QueueClears);
    }

    [Fact]
    public async Task History_is_empty_until_done_and_can_be_listed_deleted_and_cleared()
    {
        await using var sim = await StartAsync();
        sim.Faults.Stall = ComfySimStall.Jobs;
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);
        var id = Guid.NewGuid().ToString();
        await client.PostPromptAsync(ComfyGraphs.Sdxl(), id);
        await client.ReadUntilAsync(m => Type(m) == "executing" && m["data"]!["node"]?.ToString() == "6");

        Assert.Equal("{}", (await client.GetJsonAsync($"history/{id}")).ToJsonString());
        sim.Faults.Stall = ComfySimStall.None;
        await client.ReadJobAsync(id);
        var (other, _) = await RunAsync(client, ComfyGraphs.Sdxl(seed: 9));

        Assert.Equal(2, (await client.GetJsonAsync("history")).AsObject().Count);
        Assert.Single((await client.GetJsonAsync("history?max_items=1")).AsObject());
        await client.PostAsync("history", new JsonObject { ["delete"] = new JsonArray(id) });
        Assert.Equal("{}", (await client.GetJsonAsync($"history/{id}")).ToJsonString());
        Assert.Single((await client.GetJsonAsync("history")).AsObject());
        await client.PostAsync("history", new JsonObject { ["clear"] = true });
        Assert.Equal("{}", (await client.GetJsonAsync("history")).ToJsonString());
        Assert.True(sim.GetCount("/history/{prompt_id}") >= 3);
        Assert.Equal("success", other["status"]!["status_str"]!.ToString());
    }

    [Theory]
    [InlineData("view?filename=..%2Fsecret.png&type=output", 400)]
    [InlineData("view?filename=%2Fetc%2Fpasswd&type=output", 400)]
    [InlineData("view?filename=req1_00001_.png&subfolder=loradeploy&type=models", 400)]
    [InlineData("view?filename=req1_00001_.png&subfolder=%2Fetc&type=output", 403)]
    [InlineData("view?filename=passwd&subfolder=..%2F..&type=output", 403)]
    [InlineData("view?filename=nothere.png&subfolder=loradeploy&type=output", 404)]
    [InlineData("view?filename=req1_00001_.png&type=output", 404)]
    [InlineData("view?subfolder=loradeploy", 404)]
    [InlineData("view?filename=req1_00001_.png&subfolder=loradeploy&type=output", 200)]
    [InlineData("api/view?filename=req1_00001_.png&subfolder=loradeploy", 200)]
    public async Task View_answers_like_comfyui_for_bad_and_good_paths(string url, int expected)
    {
        await using var sim = await StartAsync();
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);
        await RunAsync(client, ComfyGraphs.Sdxl());

        using var response = await client.Http.GetAsync(url, Ct);

        Assert.Equal(expected, (int)response.StatusCode);
        if (expected == 200)
        {
            Assert.Equal("image/png", response.Content.Headers.ContentType?.MediaType);
            PngReader.Decode(await response.Content.ReadAsByteArrayAsync(Ct));
        }
    }

    [Fact]
    public async Task A_lora_deleted_after_validation_fails_at_run_time_with_file_not_found()
    {
        await using var sim = await StartAsync();
        sim.Faults.Stall = ComfySimStall.Jobs;
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);
        var blocker = Guid.NewGuid().ToString();
        await client.PostPromptAsync(ComfyGraphs.Sdxl(lora: null), blocker);
        await client.ReadUntilAsync(m => Type(m) == "executing" && m["data"]!["node"]?.ToString() == "6");
        var id = Guid.NewGuid().ToString();
        Assert.Equal(200, (await client.PostPromptAsync(ComfyGraphs.Sdxl(), id)).Status);

        File.Delete(Path.Combine(sim.LoraRoots[0], "style.safetensors"));
        sim.Faults.Stall = ComfySimStall.None;
        var messages = await client.ReadJobAsync(id);

        var error = messages.Single(m => Type(m) == "execution_error")["data"]!;
        Assert.Equal(("2", "LoraLoader", "FileNotFoundError"), (error["node_id"]!.ToString(), error["node_type"]!.ToString(), error["exception_type"]!.ToString()));
        Assert.Contains("'style.safetensors' not found", error["exception_message"]!.ToString());
        Assert.Equal("error", (await HistoryAsync(client, id))["status"]!["status_str"]!.ToString());
    }

    [Fact]
    public async Task A_save_prefix_outside_the_output_folder_fails_the_run()
    {
        await using var sim = await StartAsync();
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);

        var (history, images) = await RunAsync(client, ComfyGraphs.Sdxl(prefix: "../escape/x"));

        Assert.Empty(images);
        var error = history["status"]!["messages"]!.AsArray().Single(m => m![0]!.ToString() == "execution_error")![1]!;
        Assert.Equal(("8", "Exception"), (error["node_id"]!.ToString(), error["exception_type"]!.ToString()));
        Assert.Contains("Saving image outside the output folder is not allowed", error["exception_message"]!.ToString());
        Assert.False(Directory.Exists(Path.Combine(sim.Root, "escape")));
    }

    [Fact]
    public async Task Fault_the_next_prompts_fail_validation_with_the_given_node_error()
    {
        await using var sim = await StartAsync();
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);
        sim.Faults.RejectNextPrompts(2, new ComfySimNodeError("value_not_in_list", "Value not in list", "lora_name: 'x' not in []", "LoraLoader", "lora_name"));

        var first = await client.PostPromptAsync(ComfyGraphs.Sdxl());
        var second = await client.PostPromptAsync(ComfyGraphs.Sdxl());
        var third = await client.PostPromptAsync(ComfyGraphs.Sdxl());

        Assert.Equal((400, 400, 200), (first.Status, second.Status, third.Status));
        var entry = first.Body["node_errors"]!["2"]!;
        Assert.Equal("LoraLoader", entry["class_type"]!.ToString());
        Assert.Equal("lora_name: 'x' not in []", entry["errors"]![0]!["details"]!.ToString());
        Assert.Equal("lora_name", entry["errors"]![0]!["extra_info"]!["input_name"]!.ToString());
        Assert.Single(sim.Prompts);
    }

    [Fact]
    public async Task Fault_an_execution_error_at_a_node_class_ends_the_job_with_execution_error()
    {
        await using var sim = await StartAsync();
        sim.Faults.ExecutionError = new ComfySimExecutionError("KSampler", "torch.OutOfMemoryError", "Allocation on device");
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);
        var id = Guid.NewGuid().ToString();

        await client.PostPromptAsync(ComfyGraphs.Sdxl(), id);
        var messages = await client.ReadJobAsync(id);

        var error = messages.Single(m => Type(m) == "execution_error")["data"]!;
        Assert.Equal(("6", "KSampler", "torch.OutOfMemoryError"), (error["node_id"]!.ToString(), error["node_type"]!.ToString(), error["exception_type"]!.ToString()));
        Assert.StartsWith("Allocation on device\nThis error means you ran out of memory on your GPU.", error["exception_message"]!.ToString());
        Assert.Equal(["1", "5", "2", "4", "3"], error["executed"]!.AsArray().Select(n => n!.ToString()));
        Assert.Equal(id, error["prompt_id"]!.ToString());
        Assert.DoesNotContain(messages, m => Type(m) is "execution_success" or "progress");
        var history = await HistoryAsync(client, id);
        Assert.Equal("error", history["status"]!["status_str"]!.ToString());
        Assert.Equal("{}", history["outputs"]!.ToJsonString());

        sim.Faults.ExecutionError = null;
        Assert.Equal("success", (await RunAsync(client, ComfyGraphs.Sdxl())).History["status"]!["status_str"]!.ToString());
    }

    [Fact]
    public async Task Fault_dying_mid_job_cuts_the_socket_and_the_listener()
    {
        await using var sim = await StartAsync();
        sim.Faults.DieAtStep = 3;
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);
        var id = Guid.NewGuid().ToString();

        await client.PostPromptAsync(ComfyGraphs.Sdxl(steps: 10), id);
        var seen = new List<JsonObject>();
        var ended = await Record.ExceptionAsync(async () => seen.AddRange(await client.ReadJobAsync(id)));

        Assert.IsType<System.Threading.Channels.ChannelClosedException>(ended);
        Assert.True(client.SocketEnded);
        Assert.True(sim.IsDead);
        await sim.KillAsync(); // the kill already under way: returns once the listener is closed
        var refused = await Record.ExceptionAsync(() => client.Http.GetAsync("prompt", Ct));
        Assert.IsType<HttpRequestException>(refused);
    }

    [Fact]
    public async Task Fault_stalled_requests_hang_until_lifted()
    {
        await using var sim = await StartAsync();
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);
        sim.Faults.Stall = ComfySimStall.Requests;

        using var shortWait = CancellationTokenSource.CreateLinkedTokenSource(Ct);
        shortWait.CancelAfter(TimeSpan.FromMilliseconds(300));
        var hung = await Record.ExceptionAsync(() => client.Http.GetAsync("prompt", shortWait.Token));
        var pending = client.Http.GetAsync("queue", Ct);
        await Task.Delay(100, Ct);
        Assert.False(pending.IsCompleted);
        sim.Faults.Stall = ComfySimStall.None;
        using var answered = await pending;

        Assert.IsAssignableFrom<OperationCanceledException>(hung);
        Assert.Equal(HttpStatusCode.OK, answered.StatusCode);
    }

    [Fact]
    public async Task Fault_slow_steps_make_the_sampler_take_longer()
    {
        await using var sim = await StartAsync();
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);
        sim.Faults.StepDelay = TimeSpan.FromMilliseconds(40);
        var clock = Stopwatch.StartNew();

        await RunAsync(client, ComfyGraphs.Sdxl(steps: 8));

        Assert.True(clock.Elapsed >= TimeSpan.FromMilliseconds(300), clock.Elapsed.ToString());
    }

    [Fact]
    public async Task A_client_reconnecting_mid_job_gets_the_current_node_and_the_rest_of_its_messages()
    {
        await using var sim = await StartAsync();
        sim.Faults.Stall = ComfySimStall.Jobs;
        await using var first = await ConnectAsync(sim, "worker-1", Ct);
        var id = Guid.NewGuid().ToString();
        await first.PostPromptAsync(ComfyGraphs.Sdxl(), id);
        await first.ReadUntilAsync(m => Type(m) == "executing" && m["data"]!["node"]?.ToString() == "6");

        await using var second = await ConnectAsync(sim, "worker-1", Ct);
        var hello = await second.ReadUntilAsync(m => Type(m) == "executing");
        sim.Faults.Stall = ComfySimStall.None;
        var rest = await second.ReadJobAsync(id);

        Assert.Equal("worker-1", hello[0]["data"]!["sid"]!.ToString());
        await second.SendTextAsync("""{"type":"feature_flags","data":{"supports_preview_metadata":false}}""");
        Assert.Equal("feature_flags", Type((await second.ReadUntilAsync(m => Type(m) == "feature_flags"))[^1]));
        Assert.Equal("6", hello[^1]["data"]!["node"]!.ToString());
        Assert.Contains(rest, m => Type(m) == "execution_success");
    }

    [Fact]
    public async Task Free_with_free_memory_drops_the_node_cache_and_system_stats_answers()
    {
        await using var sim = await StartAsync();
        await using var client = await ConnectAsync(sim, cancellationToken: Ct);
        await RunAsync(client, ComfyGraphs.Sdxl());

        var (emptyStatus, _) = await client.PostAsync("free", JsonValue.Create(""));
        Assert.Equal(200, (await client.PostAsync("free", new JsonObject { ["unload_models"] = true })).Status);
        Assert.Equal(200, (await client.PostAsync("api/free", new JsonObject { ["free_memory"] = true })).Status);
        var id = Guid.NewGuid().ToString();
        await client.PostPromptAsync(ComfyGraphs.Sdxl(), id);
        var messages = await client.ReadJobAsync(id);
        var stats = await client.GetJsonAsync("system_stats");

        Assert.Equal(500, emptyStatus); // json_data.get on a str raises
        Assert.Empty(messages.Single(m => Type(m) == "execution_cached")["data"]!["nodes"]!.AsArray());
        Assert.Equal("cuda", stats["devices"]![0]!["type"]!.ToString());
        Assert.Equal(3, sim.PostCount("/free"));
        Assert.Equal(2, sim.PostCount("/prompt"));
    }

    [Fact]
    public async Task A_body_that_is_not_json_gets_aiohttps_500()
    {
        await using var sim = await StartAsync();
        using var http = new HttpClient { BaseAddress = new Uri(sim.BaseUrl) };

        using var prompt = await http.PostAsync("/prompt", new StringContent("{not json", System.Text.Encoding.UTF8, "application/json"), Ct);
        using var free = await http.PostAsync("/free", new StringContent("", System.Text.Encoding.UTF8, "application/json"), Ct);
        using var unknown = await http.GetAsync("/nothing/here", Ct);

        Assert.Equal(HttpStatusCode.InternalServerError, prompt.StatusCode);
        Assert.Equal(HttpStatusCode.InternalServerError, free.StatusCode);
        Assert.Equal(HttpStatusCode.NotFound, unknown.StatusCode);
    }

    [Fact]
    public async Task Kill_closes_every_socket_and_disposal_deletes_the_temp_root()
    {
        var sim = await StartAsync();
        var root = sim.Root;
        var client = await ConnectAsync(sim, cancellationToken: Ct);
        await client.ReadUntilAsync(m => Type(m) == "status");

        await sim.KillAsync();
        await Assert.ThrowsAsync<System.Threading.Channels.ChannelClosedException>(() => client.ReadUntilAsync(_ => false));
        await sim.DisposeAsync();
        await client.DisposeAsync();

        Assert.False(Directory.Exists(root));
    }
}
