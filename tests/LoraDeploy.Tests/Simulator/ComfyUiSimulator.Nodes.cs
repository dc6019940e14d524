using System.Numerics;
using System.Text.Json.Nodes;

namespace LoraDeploy.Tests.Simulator;

/// <summary>One input of a node class: a type name (<c>INT</c>, <c>MODEL</c>, …) or a combo computed when asked, plus its options.</summary>
internal sealed record InputDef(string Name, string? Type, Func<IReadOnlyList<string>>? Combo, JsonObject Options)
{
    /// <summary>The input's spec as <c>INPUT_TYPES()</c> gives it: <c>[type or [choices…], {options}]</c>.</summary>
    public JsonArray Spec()
    {
        JsonNode type = Combo is null ? Type! : new JsonArray([.. Combo().Select(c => (JsonNode)c)]);
        return Options.Count == 0 ? [type] : [type, Options.DeepClone()];
    }

    public static InputDef Link(string name, string type) => new(name, type, null, []);

    public static InputDef Int(string name, BigInteger dflt, BigInteger min, BigInteger max, int? step = null, bool seed = false)
    {
        var options = new JsonObject { ["default"] = Number(dflt), ["min"] = Number(min), ["max"] = Number(max) };
        if (step is { } s)
        {
            options["step"] = s;
        }
        if (seed)
        {
            options["control_after_generate"] = true;
        }
        return new(name, "INT", null, options);
    }

    public static InputDef Float(string name, double dflt, double min, double max, double step) =>
        new(name, "FLOAT", null, new JsonObject { ["default"] = dflt, ["min"] = min, ["max"] = max, ["step"] = step });

    public static InputDef Choice(string name, Func<IReadOnlyList<string>> choices, string? tooltip = null) =>
        new(name, null, choices, tooltip is null ? [] : new JsonObject { ["tooltip"] = tooltip });

    public static InputDef Choice(string name, params string[] choices) => new(name, null, () => choices, []);

    private static JsonNode Number(BigInteger value) => JsonNode.Parse(value.ToString(System.Globalization.CultureInfo.InvariantCulture))!;
}

/// <summary>A node class of ComfyUI's <c>nodes.py</c> / <c>comfy_extras</c>, as far as validation, object_info and the executor need it.</summary>
internal sealed class NodeClass
{
    public required string Name { get; init; }
    public required string DisplayName { get; init; }
    public required string Category { get; init; }
    public required IReadOnlyList<InputDef> Required { get; init; }
    public IReadOnlyList<InputDef> Optional { get; init; } = [];
    public required IReadOnlyList<string> Outputs { get; init; }
    public bool OutputNode { get; init; }
    public string PythonModule { get; init; } = "nodes";

    public IEnumerable<(InputDef Input, string Category)> Inputs() =>
        Required.Select(i => (i, "required")).Concat(Optional.Select(i => (i, "optional")));

    /// <summary><c>server.py</c>'s <c>node_info</c>.</summary>
    public JsonObject Info()
    {
        var input = new JsonObject { ["required"] = new JsonObject(Required.Select(i => KeyValuePair.Create(i.Name, (JsonNode?)i.Spec()))) };
        var order = new JsonObject { ["required"] = new JsonArray([.. Required.Select(i => (JsonNode)i.Name)]) };
        if (Optional.Count > 0)
        {
            input["optional"] = new JsonObject(Optional.Select(i => KeyValuePair.Create(i.Name, (JsonNode?)i.Spec())));
            order["optional"] = new JsonArray([.. Optional.Select(i => (JsonNode)i.Name)]);
        }
        if (Name == "SaveImage")
        {
            input["hidden"] = new JsonObject { ["prompt"] = "PROMPT", ["extra_pnginfo"] = "EXTRA_PNGINFO" };
            order["hidden"] = new JsonArray("prompt", "extra_pnginfo");
        }
        return new JsonObject
        {
            ["input"] = input,
            ["input_order"] = order,
            ["is_input_list"] = false,
            ["output"] = new JsonArray([.. Outputs.Select(o => (JsonNode)o)]),
            ["output_is_list"] = new JsonArray([.. Outputs.Select(_ => (JsonNode)false)]),
            ["output_name"] = new JsonArray([.. Outputs.Select(o => (JsonNode)o)]),
            ["name"] = Name,
            ["display_name"] = DisplayName,
            ["description"] = "",
            ["python_module"] = PythonModule,
            ["category"] = Category,
            ["output_node"] = OutputNode,
            ["has_intermediate_output"] = false,
            ["search_aliases"] = new JsonArray(),
        };
    }

    internal static readonly string[] Samplers =
    [
        "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral",
        "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu",
        "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
        "ipndm", "ipndm_v", "deis", "res_multistep", "gradient_estimation", "er_sde", "seeds_2", "seeds_3", "ddim", "uni_pc", "uni_pc_bh2",
    ];

    internal static readonly string[] Schedulers = ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic", "kl_optimal"];

    private const int MaxResolution = 16384;

    public static IEnumerable<NodeClass> All(ComfyUiSimulator sim)
    {
        InputDef Strength(string name) => InputDef.Float(name, 1.0, -100.0, 100.0, 0.01);
        InputDef Files(string name, string folder, string? tooltip = null) => InputDef.Choice(name, () => sim.FileList(folder), tooltip);
        InputDef Size(string name, int dflt, int step) => InputDef.Int(name, dflt, 16, MaxResolution, step);
        InputDef Batch() => InputDef.Int("batch_size", 1, 1, 4096);

        yield return new()
        {
            Name = "CheckpointLoaderSimple", DisplayName = "Load Checkpoint", Category = "loaders",
            Required = [Files("ckpt_name", "checkpoints", "The name of the checkpoint (model) to load.")],
            Outputs = ["MODEL", "CLIP", "VAE"],
        };
        yield return new()
        {
            Name = "LoraLoader", DisplayName = "Load LoRA", Category = "loaders",
            Required =
            [
                InputDef.Link("model", "MODEL"), InputDef.Link("clip", "CLIP"),
                Files("lora_name", "loras", "The name of the LoRA."), Strength("strength_model"), Strength("strength_clip"),
            ],
            Outputs = ["MODEL", "CLIP"],
        };
        yield return new()
        {
            Name = "LoraLoaderModelOnly", DisplayName = "LoraLoaderModelOnly", Category = "loaders",
            Required = [InputDef.Link("model", "MODEL"), Files("lora_name", "loras"), Strength("strength_model")],
            Outputs = ["MODEL"],
        };
        yield return new()
        {
            Name = "CLIPTextEncode", DisplayName = "CLIP Text Encode (Prompt)", Category = "conditioning",
            Required =
            [
                new("text", "STRING", null, new JsonObject { ["multiline"] = true, ["dynamicPrompts"] = true }),
                InputDef.Link("clip", "CLIP"),
            ],
            Outputs = ["CONDITIONING"],
        };
        yield return new()
        {
            Name = "EmptyLatentImage", DisplayName = "Empty Latent Image", Category = "latent",
            Required = [Size("width", 512, 8), Size("height", 512, 8), Batch()],
            Outputs = ["LATENT"],
        };
        yield return new()
        {
            Name = "EmptySD3LatentImage", DisplayName = "EmptySD3LatentImage", Category = "latent/sd3", PythonModule = "comfy_extras.nodes_sd3",
            Required = [Size("width", 1024, 16), Size("height", 1024, 16), Batch()],
            Outputs = ["LATENT"],
        };
        yield return new()
        {
            Name = "KSampler", DisplayName = "KSampler", Category = "sampling",
            Required =
            [
                InputDef.Link("model", "MODEL"),
                InputDef.Int("seed", 0, 0, ulong.MaxValue, seed: true),
                InputDef.Int("steps", 20, 1, 10000),
                new("cfg", "FLOAT", null, new JsonObject { ["default"] = 8.0, ["min"] = 0.0, ["max"] = 100.0, ["step"] = 0.1, ["round"] = 0.01 }),
                InputDef.Choice("sampler_name", Samplers),
                InputDef.Choice("scheduler", Schedulers),
                InputDef.Link("positive", "CONDITIONING"), InputDef.Link("negative", "CONDITIONING"), InputDef.Link("latent_image", "LATENT"),
                InputDef.Float("denoise", 1.0, 0.0, 1.0, 0.01),
            ],
            Outputs = ["LATENT"],
        };
        yield return new()
        {
            Name = "VAEDecode", DisplayName = "VAE Decode", Category = "latent",
            Required = [InputDef.Link("samples", "LATENT"), InputDef.Link("vae", "VAE")],
            Outputs = ["IMAGE"],
        };
        yield return new()
        {
            Name = "SaveImage", DisplayName = "Save Image", Category = "image", OutputNode = true,
            Required =
            [
                InputDef.Link("images", "IMAGE"),
                new("filename_prefix", "STRING", null, new JsonObject { ["default"] = "ComfyUI" }),
            ],
            Outputs = [],
        };
        yield return new()
        {
            Name = "UNETLoader", DisplayName = "Load Diffusion Model", Category = "advanced/loaders",
            Required = [Files("unet_name", "diffusion_models"), InputDef.Choice("weight_dtype", "default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")],
            Outputs = ["MODEL"],
        };
        yield return new()
        {
            Name = "DualCLIPLoader", DisplayName = "DualCLIPLoader", Category = "advanced/loaders",
            Required =
            [
                Files("clip_name1", "text_encoders"), Files("clip_name2", "text_encoders"),
                InputDef.Choice("type", "sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image", "hunyuan_video_15", "kandinsky5", "kandinsky5_image", "ltxv", "newbie", "ace"),
            ],
            Optional = [new("device", null, () => ["default", "cpu"], new JsonObject { ["advanced"] = true })],
            Outputs = ["CLIP"],
        };
        yield return new()
        {
            Name = "VAELoader", DisplayName = "Load VAE", Category = "loaders",
            Required = [InputDef.Choice("vae_name", () => [.. sim.FileList("vae"), "pixel_space"])],
            Outputs = ["VAE"],
        };
        yield return new()
        {
            Name = "FluxGuidance", DisplayName = "FluxGuidance", Category = "advanced/conditioning/flux", PythonModule = "comfy_extras.nodes_flux",
            Required = [InputDef.Link("conditioning", "CONDITIONING"), InputDef.Float("guidance", 3.5, 0.0, 100.0, 0.1)],
            Outputs = ["CONDITIONING"],
        };
        yield return new()
        {
            Name = "ConditioningZeroOut", DisplayName = "ConditioningZeroOut", Category = "advanced/conditioning",
            Required = [InputDef.Link("conditioning", "CONDITIONING")],
            Outputs = ["CONDITIONING"],
        };
    }
}

/// <summary>
/// One model folder name (<c>loras</c>, <c>checkpoints</c>, …) over its roots, listed like <c>folder_paths.get_filename_list</c>:
/// recursive, fixed extension set, sorted, and cached until the mtime of a scanned directory changes or a new root appears.
/// </summary>
internal sealed class ModelFolder(IReadOnlyList<string> roots)
{
    private static readonly HashSet<string> Extensions = new([".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"], StringComparer.Ordinal);
    private readonly Lock _gate = new();
    private IReadOnlyList<string>? _cached;
    private Dictionary<string, DateTime> _dirs = new(StringComparer.Ordinal);

    public IReadOnlyList<string> List()
    {
        lock (_gate)
        {
            if (_cached is not null && StillValid())
            {
                return _cached;
            }
            var names = new SortedSet<string>(StringComparer.Ordinal);
            var dirs = new Dictionary<string, DateTime>(StringComparer.Ordinal);
            foreach (var root in roots.Where(Directory.Exists))
            {
                dirs[root] = Directory.GetLastWriteTimeUtc(root);
                Walk(root, root, names, dirs);
            }
            _cached = [.. names];
            _dirs = dirs;
            return _cached;
        }
    }

    private bool StillValid()
    {
        foreach (var (dir, mtime) in _dirs)
        {
            if (!Directory.Exists(dir) || Directory.GetLastWriteTimeUtc(dir) != mtime)
            {
                return false;
            }
        }
        return roots.All(r => !Directory.Exists(r) || _dirs.ContainsKey(r));
    }

    private static void Walk(string root, string dir, SortedSet<string> names, Dictionary<string, DateTime> dirs)
    {
        foreach (var file in Directory.EnumerateFiles(dir))
        {
            if (Extensions.Contains(Path.GetExtension(file).ToLowerInvariant()))
            {
                names.Add(Path.GetRelativePath(root, file).Replace(Path.DirectorySeparatorChar, '/'));
            }
        }
        foreach (var sub in Directory.EnumerateDirectories(dir))
        {
            if (Path.GetFileName(sub) == ".git")
            {
                continue;
            }
            dirs[sub] = Directory.GetLastWriteTimeUtc(sub);
            Walk(root, sub, names, dirs);
        }
    }

    /// <summary><c>get_full_path</c>: the first root holding the name, checked on disk (no cache).</summary>
    public string? FullPath(string name)
    {
        var relative = Path.GetRelativePath("/", Path.GetFullPath(Path.Combine("/", name)));
        return roots.Select(r => Path.Combine(r, relative)).FirstOrDefault(File.Exists);
    }
}

public sealed partial class ComfyUiSimulator
{
    internal IReadOnlyList<string> FileList(string folder) => _folders[folder].List();
}
