using System.Text.Json;
using System.Text.Json.Nodes;
using LoraDeploy.BaseModels;
using LoraDeploy.Serving.ComfyUi;
using LoraDeploy.Workers;

namespace LoraDeploy.Tests.Serving;

/// <summary>The pieces of the ComfyUI engine that need no server: graphs, request defaults, error mapping, the LoRA folder.</summary>
public sealed class ComfyUiGraphTests
{
    private static readonly ComfyUiSettings Sdxl = new("http://127.0.0.1:8188", "/tmp", "sdxl.safetensors", null, null, null, null);
    private static readonly ComfyUiSettings Flux = new("http://127.0.0.1:8188", "/tmp", null, "flux1-dev.safetensors", "clip_l.safetensors", "t5xxl.safetensors", "ae.safetensors");

    private static ImageRequest Request(int count = 1) => new("a cat", "blurry", 832, 1216, 30, 6.5, 42, count, "euler", "normal", false);

    private static JsonObject Node(JsonObject graph, string classType) =>
        graph.Select(kv => kv.Value!.AsObject()).Single(n => n["class_type"]!.GetValue<string>() == classType);

    private static IEnumerable<JsonObject> Nodes(JsonObject graph, string classType) =>
        graph.Select(kv => kv.Value!.AsObject()).Where(n => n["class_type"]!.GetValue<string>() == classType);

    [Fact]
    public void An_sdxl_graph_chains_one_lora_loader_per_adapter_with_both_strengths_and_links_as_string_ids()
    {
        var graph = ImageGraphs.Build("sdxl", Sdxl, Request(2), [("a.safetensors", 0.8), ("sub/b.safetensors", -0.5)], "loradeploy/req1");
        var json = graph.ToJson();

        Assert.Equal("sdxl.safetensors", Node(json, "CheckpointLoaderSimple")["inputs"]!["ckpt_name"]!.GetValue<string>());
        var loras = Nodes(json, "LoraLoader").ToList();
        Assert.Equal(2, loras.Count);
        Assert.Equal(0.8, loras[0]["inputs"]!["strength_model"]!.GetValue<double>());
        Assert.Equal(0.8, loras[0]["inputs"]!["strength_clip"]!.GetValue<double>());
        Assert.Equal("sub/b.safetensors", loras[1]["inputs"]!["lora_name"]!.GetValue<string>());
        // The second loader takes the first one's MODEL and CLIP; the sampler takes the last one's.
        var firstId = json.Single(kv => kv.Value == loras[0]).Key;
        var secondId = json.Single(kv => kv.Value == loras[1]).Key;
        Assert.Equal($"[\"{firstId}\",0]", loras[1]["inputs"]!["model"]!.ToJsonString());
        Assert.Equal($"[\"{firstId}\",1]", loras[1]["inputs"]!["clip"]!.ToJsonString());
        var sampler = Node(json, "KSampler")["inputs"]!;
        Assert.Equal($"[\"{secondId}\",0]", sampler["model"]!.ToJsonString());
        Assert.Equal(42UL, sampler["seed"]!.GetValue<ulong>());
        Assert.Equal(30, sampler["steps"]!.GetValue<int>());
        Assert.Equal(6.5, sampler["cfg"]!.GetValue<double>());
        var latent = Node(json, "EmptyLatentImage")["inputs"]!;
        Assert.Equal((832, 1216, 2), (latent["width"]!.GetValue<int>(), latent["height"]!.GetValue<int>(), latent["batch_size"]!.GetValue<int>()));
        var texts = Nodes(json, "CLIPTextEncode").Select(n => n["inputs"]!["text"]!.GetValue<string>()).ToList();
        Assert.Equal(["a cat", "blurry"], texts);
        Assert.Equal("loradeploy/req1", Node(json, "SaveImage")["inputs"]!["filename_prefix"]!.GetValue<string>());
        Assert.Equal(json.Single(kv => kv.Value!["class_type"]!.GetValue<string>() == "SaveImage").Key, graph.SaveNode);
    }

    [Fact]
    public void A_flux_graph_uses_split_loaders_model_only_loras_flux_guidance_and_cfg_one()
    {
        var json = ImageGraphs.Build("flux1", Flux, Request(), [("a.safetensors", 0.7f)], "loradeploy/req2").ToJson();

        Assert.Equal("flux", Node(json, "DualCLIPLoader")["inputs"]!["type"]!.GetValue<string>());
        Assert.Equal("flux1-dev.safetensors", Node(json, "UNETLoader")["inputs"]!["unet_name"]!.GetValue<string>());
        Assert.Equal("ae.safetensors", Node(json, "VAELoader")["inputs"]!["vae_name"]!.GetValue<string>());
        Assert.Empty(Nodes(json, "LoraLoader"));
        // 0.7f as a float is 0.699999988; ComfyUI's widget value is 0.7.
        Assert.Equal(0.7, Node(json, "LoraLoaderModelOnly")["inputs"]!["strength_model"]!.GetValue<double>());
        Assert.Equal(6.5, Node(json, "FluxGuidance")["inputs"]!["guidance"]!.GetValue<double>());
        Assert.Equal(1.0, Node(json, "KSampler")["inputs"]!["cfg"]!.GetValue<double>());
        Assert.Single(Nodes(json, "ConditioningZeroOut"));
        Assert.Single(Nodes(json, "EmptySD3LatentImage"));
        Assert.Equal(ImageGraphs.NodeClasses("flux1").Order(), json.Select(kv => kv.Value!["class_type"]!.GetValue<string>()).Distinct().Order());
    }

    [Fact]
    public void A_graph_without_adapters_is_the_base_model_alone()
    {
        var json = ImageGraphs.Build("sd1", Sdxl, Request(), [], "p").ToJson();
        Assert.Empty(Nodes(json, "LoraLoader"));
        var checkpointId = json.Single(kv => kv.Value!["class_type"]!.GetValue<string>() == "CheckpointLoaderSimple").Key;
        Assert.Equal($"[\"{checkpointId}\",0]", Node(json, "KSampler")["inputs"]!["model"]!.ToJsonString());
    }

    [Fact]
    public void Request_fields_win_over_pool_defaults_which_win_over_the_family_ones()
    {
        var pool = new BaseModelEntry("black-forest-labs/FLUX-1-schnell", "flux1")
        {
            Engine = Engines.ComfyUi,
            Defaults = new Dictionary<string, string> { ["width"] = "768", ["guidance"] = "2.5", ["sampler"] = "dpmpp_2m" },
        };
        var defaults = ImageRequest.DefaultsOf(pool);
        Assert.Equal(new ImageDefaults(768, 1024, 4, 2.5, "dpmpp_2m", "simple"), defaults);

        using var native = JsonDocument.Parse("""{"prompt":"p","negative_prompt":"n","height":512,"num_inference_steps":9,"guidance_scale":4,"seed":7,"num_images":3,"stream":true}""");
        var request = ImageRequest.From(Operations.Native, native.RootElement, defaults);
        Assert.Equal(new ImageRequest("p", "n", 768, 512, 9, 4, 7, 3, "dpmpp_2m", "simple", true), request);

        using var openAi = JsonDocument.Parse("""{"prompt":"p","n":2,"size":"512x640","negative_prompt":"ignored","stream":true}""");
        var fromOpenAi = ImageRequest.From(Operations.ImagesGenerations, openAi.RootElement, defaults);
        Assert.Equal((512, 640, 2, "", false), (fromOpenAi.Width, fromOpenAi.Height, fromOpenAi.Count, fromOpenAi.NegativePrompt, fromOpenAi.Stream));
    }

    [Fact]
    public void Without_a_seed_each_request_gets_its_own_random_one()
    {
        using var body = JsonDocument.Parse("""{"prompt":"p"}""");
        var defaults = ImageRequest.FamilyDefaults(new BaseModelEntry("x", "sdxl"));
        var seeds = Enumerable.Range(0, 20).Select(_ => ImageRequest.From(Operations.Native, body.RootElement, defaults).Seed).ToHashSet();
        Assert.True(seeds.Count > 15);
        Assert.All(seeds, s => Assert.True(s <= int.MaxValue));
    }

    [Theory]
    [InlineData("KSampler", "steps", "value_bigger_than_max", 422, "num_inference_steps")]
    [InlineData("EmptyLatentImage", "width", "value_smaller_than_min", 422, "width")]
    [InlineData("LoraLoader", "strength_model", "value_bigger_than_max", 422, "lora_scale")]
    [InlineData("FluxGuidance", "guidance", "value_bigger_than_max", 422, "guidance_scale")]
    [InlineData("LoraLoader", "lora_name", "value_not_in_list", 502, null)]
    [InlineData("CheckpointLoaderSimple", "ckpt_name", "value_not_in_list", 502, null)]
    public void ComfyUi_validation_errors_become_422_naming_our_parameter_or_502_for_the_installation(
        string classType, string input, string type, int status, string? param)
    {
        var rejected = new ComfyUiRejectedException("prompt_outputs_failed_validation", "Prompt outputs failed validation",
            [new ComfyNodeError("5", classType, type, "Value bigger than max", input, $"{input}: bad")]);
        var (mappedStatus, message, mappedParam) = ComfyUiServingEngine.MapRejection(rejected);
        Assert.Equal(status, mappedStatus);
        Assert.Equal(param, mappedParam);
        Assert.Contains($"{input}: bad", message);
    }

    [Fact]
    public void ComfyUis_400_body_is_read_with_its_node_errors()
    {
        const string body = """
        {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
         "node_errors": {"2": {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
           "details": "lora_name: 'x.safetensors' not in ['a.safetensors']", "extra_info": {"input_name": "lora_name"}}],
           "dependent_outputs": ["8"], "class_type": "LoraLoader"}}}
        """;
        var rejected = ComfyUiClient.TryParseRejection(body)!;
        Assert.Equal("prompt_outputs_failed_validation", rejected.Type);
        var error = Assert.Single(rejected.NodeErrors);
        Assert.Equal(("2", "LoraLoader", "value_not_in_list", "lora_name"), (error.NodeId, error.ClassType, error.Type, error.Input));
        Assert.Null(ComfyUiClient.TryParseRejection("<html>bad gateway</html>"));
    }

    [Fact]
    public void Combo_choices_are_read_in_the_old_and_the_new_object_info_forms()
    {
        var old = JsonNode.Parse("""{"input": {"required": {"lora_name": [["a.safetensors", "b.safetensors"], {"tooltip": "x"}]}}}""")!.AsObject();
        var current = JsonNode.Parse("""{"input": {"required": {"lora_name": ["COMBO", {"options": ["c.safetensors"]}]}}}""")!.AsObject();
        Assert.Equal(["a.safetensors", "b.safetensors"], ComfyUiClient.Choices(old, "lora_name"));
        Assert.Equal(["c.safetensors"], ComfyUiClient.Choices(current, "lora_name"));
        Assert.Null(ComfyUiClient.Choices(old, "missing"));
    }

    [Fact]
    public async Task The_lora_folder_links_or_copies_under_the_hash_name_and_removes_once_no_pool_uses_it()
    {
        var root = Directory.CreateTempSubdirectory("comfy-folder-").FullName;
        try
        {
            var cache = Path.Combine(root, "cache.bin");
            await File.WriteAllBytesAsync(cache, [1, 2, 3, 4]);
            var loras = Directory.CreateDirectory(Path.Combine(root, "loras")).FullName;
            var folder = new LoraFolder(loras);
            var sha = new string('a', 64);

            Assert.Equal(LoraFolder.Placement.HardLinked, await folder.PlaceAsync(sha, cache, CancellationToken.None));
            Assert.Equal(LoraFolder.Placement.AlreadyThere, await folder.PlaceAsync(sha, cache, CancellationToken.None)); // a second pool
            var placed = Path.Combine(loras, $"{sha}.safetensors");
            Assert.Equal([1, 2, 3, 4], await File.ReadAllBytesAsync(placed));
            Assert.Empty(Directory.GetFiles(loras, "*.part"));

            File.Delete(cache); // the cache evicts its copy: the placed file lives on (same inode)
            Assert.Equal([1, 2, 3, 4], await File.ReadAllBytesAsync(placed));
            folder.Remove(sha);
            Assert.True(File.Exists(placed), "still used by the other pool");
            folder.Remove(sha);
            Assert.False(File.Exists(placed));
        }
        finally
        {
            Directory.Delete(root, recursive: true);
        }
    }

    [Fact]
    public async Task Across_filesystems_the_file_is_copied_through_a_part_file()
    {
        // /dev/shm is a tmpfs on Linux CI machines: another filesystem than the temp folder, so link(2) fails with EXDEV.
        if (!Directory.Exists("/dev/shm") || OperatingSystem.IsWindows())
        {
            Assert.Skip("needs /dev/shm (another filesystem) to force a copy");
        }
        var cacheDir = Directory.CreateTempSubdirectory("comfy-cache-").FullName;
        var shm = Directory.CreateDirectory(Path.Combine("/dev/shm", $"comfy-loras-{Guid.NewGuid():N}")).FullName;
        try
        {
            var cache = Path.Combine(cacheDir, "cache.bin");
            await File.WriteAllBytesAsync(cache, new byte[3 << 20]);
            var folder = new LoraFolder(shm);
            var sha = new string('c', 64);
            Assert.Equal(LoraFolder.Placement.Copied, await folder.PlaceAsync(sha, cache, CancellationToken.None));
            Assert.Equal(3 << 20, new FileInfo(Path.Combine(shm, $"{sha}.safetensors")).Length);
            Assert.Empty(Directory.GetFiles(shm, "*.part"));
        }
        finally
        {
            Directory.Delete(cacheDir, recursive: true);
            Directory.Delete(shm, recursive: true);
        }
    }

    [Fact]
    public async Task A_damaged_leftover_under_the_hash_name_is_replaced()
    {
        var root = Directory.CreateTempSubdirectory("comfy-folder-").FullName;
        try
        {
            var cache = Path.Combine(root, "cache.bin");
            await File.WriteAllBytesAsync(cache, [1, 2, 3, 4]);
            var folder = new LoraFolder(root);
            var sha = new string('b', 64);
            await File.WriteAllBytesAsync(Path.Combine(root, $"{sha}.safetensors"), [9]);
            Assert.NotEqual(LoraFolder.Placement.AlreadyThere, await folder.PlaceAsync(sha, cache, CancellationToken.None));
            Assert.Equal([1, 2, 3, 4], await File.ReadAllBytesAsync(Path.Combine(root, $"{sha}.safetensors")));
        }
        finally
        {
            Directory.Delete(root, recursive: true);
        }
    }
}
