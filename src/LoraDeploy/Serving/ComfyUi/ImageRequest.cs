using System.Globalization;
using System.Security.Cryptography;
using System.Text.Json;
using LoraDeploy.BaseModels;
using LoraDeploy.Inference;
using LoraDeploy.Workers;

namespace LoraDeploy.Serving.ComfyUi;

/// <summary>
/// One text-to-image request as the graph needs it: DeepInfra's native body (<c>prompt, negative_prompt, width, height,
/// num_inference_steps, guidance_scale, seed, num_images</c>) or OpenAI's (<c>prompt, n, size</c>), with the pool's
/// defaults where the request is silent. The gateway has validated ranges already. <c>Seed</c> is the client's or a random
/// one (returned, so the image can be made again); <c>Stream</c> (native only) asks for progress events
/// (<see cref="ImageProgressStream"/>).
/// </summary>
public sealed record ImageRequest(string Prompt, string NegativePrompt, int Width, int Height, int Steps, double Guidance, ulong Seed,
    int Count, string Sampler, string Scheduler, bool Stream)
{
    /// <summary>What a pool uses when neither the request nor <c>BaseModels:{name}:Defaults</c> says.</summary>
    public static ImageDefaults FamilyDefaults(BaseModelEntry pool) => pool.Family switch
    {
        "flux1" => new(1024, 1024, pool.Name.Contains("schnell", StringComparison.OrdinalIgnoreCase) ? 4 : 20, 3.5, "euler", "simple"),
        "sdxl" => new(1024, 1024, 25, 7.0, "euler", "normal"),
        _ => new(512, 512, 25, 7.0, "euler", "normal"),
    };

    /// <summary>The pool's effective defaults: the family's, overridden by <c>Defaults:width|height|steps|guidance|sampler|scheduler</c>.</summary>
    public static ImageDefaults DefaultsOf(BaseModelEntry pool)
    {
        var family = FamilyDefaults(pool);
        var d = pool.Defaults;
        return new(
            Int(d, "width") ?? family.Width,
            Int(d, "height") ?? family.Height,
            Int(d, "steps") ?? family.Steps,
            d.TryGetValue("guidance", out var g) && double.TryParse(g, NumberStyles.Float, CultureInfo.InvariantCulture, out var guidance) ? guidance : family.Guidance,
            d.GetValueOrDefault("sampler") ?? family.Sampler,
            d.GetValueOrDefault("scheduler") ?? family.Scheduler);
    }

    public static ImageRequest From(string operation, JsonElement body, ImageDefaults defaults)
    {
        var openAi = operation == Operations.ImagesGenerations;
        int width = defaults.Width, height = defaults.Height;
        if (openAi && body.TryGetProperty("size", out var size) && size.ValueKind == JsonValueKind.String)
        {
            InferenceValidation.TryParseSize(size.GetString()!, out width, out height);
        }
        else
        {
            width = Int(body, "width") ?? width;
            height = Int(body, "height") ?? height;
        }
        var seed = body.TryGetProperty("seed", out var s) && s.ValueKind == JsonValueKind.Number && s.TryGetUInt64(out var given)
            ? given
            : (ulong)RandomNumberGenerator.GetInt32(int.MaxValue); // fits every client's integer type
        return new ImageRequest(
            Prompt: Text(body, "prompt") ?? "",
            NegativePrompt: openAi ? "" : Text(body, "negative_prompt") ?? "",
            Width: width,
            Height: height,
            Steps: openAi ? defaults.Steps : Int(body, "num_inference_steps") ?? defaults.Steps,
            Guidance: !openAi && body.TryGetProperty("guidance_scale", out var g) && g.ValueKind == JsonValueKind.Number ? g.GetDouble() : defaults.Guidance,
            Seed: seed,
            Count: Int(body, openAi ? "n" : "num_images") ?? 1,
            Sampler: defaults.Sampler,
            Scheduler: defaults.Scheduler,
            Stream: !openAi && body.TryGetProperty("stream", out var stream) && stream.ValueKind == JsonValueKind.True);
    }

    private static string? Text(JsonElement body, string name) =>
        body.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String ? v.GetString() : null;

    private static int? Int(JsonElement body, string name) =>
        body.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number && v.TryGetInt32(out var n) ? n : null;

    private static int? Int(IReadOnlyDictionary<string, string> defaults, string name) =>
        defaults.TryGetValue(name, out var v) && int.TryParse(v, NumberStyles.None, CultureInfo.InvariantCulture, out var n) && n > 0 ? n : null;
}

/// <summary>A pool's image defaults (<see cref="ImageRequest.DefaultsOf"/>).</summary>
public sealed record ImageDefaults(int Width, int Height, int Steps, double Guidance, string Sampler, string Scheduler);

/// <summary>The graphs of each family (reference/serving.md § B2), as ComfyUI's own templates build them.</summary>
public static class ImageGraphs
{
    /// <summary>
    /// The graph of <paramref name="family"/>: <paramref name="loras"/> are ComfyUI LoRA names (relative to a <c>loras</c>
    /// root) with their strengths, applied in order; <paramref name="outputPrefix"/> is SaveImage's (<c>loradeploy/{request id}</c>).
    /// </summary>
    public static ComfyGraph Build(string family, ComfyUiSettings models, ImageRequest request, IReadOnlyList<(string Name, double Strength)> loras,
        string outputPrefix)
    {
        var graph = new ComfyGraph();
        if (family == "flux1")
        {
            var model = graph.UnetLoader(models.Unet!);
            var clip = graph.DualClipLoader(models.Clip1!, models.Clip2!, "flux");
            var vae = graph.VaeLoader(models.Vae!);
            foreach (var (name, strength) in loras)
            {
                model = graph.LoraLoaderModelOnly(model, name, strength);
            }
            var positive = graph.ClipTextEncode(clip, request.Prompt);
            var guided = graph.FluxGuidance(positive, request.Guidance);
            // FLUX.1 is guidance-distilled: cfg 1 and an empty negative, as ComfyUI's FLUX templates do.
            var negative = graph.ConditioningZeroOut(positive);
            var latent = graph.EmptySd3LatentImage(request.Width, request.Height, request.Count);
            var samples = graph.KSampler(model, request.Seed, request.Steps, 1.0, request.Sampler, request.Scheduler, guided, negative, latent);
            graph.SaveImage(graph.VaeDecode(samples, vae), outputPrefix);
        }
        else
        {
            var (model, clip, vae) = graph.CheckpointLoaderSimple(models.Checkpoint!);
            foreach (var (name, strength) in loras)
            {
                (model, clip) = graph.LoraLoader(model, clip, name, strength, strength);
            }
            var positive = graph.ClipTextEncode(clip, request.Prompt);
            var negative = graph.ClipTextEncode(clip, request.NegativePrompt);
            var latent = graph.EmptyLatentImage(request.Width, request.Height, request.Count);
            var samples = graph.KSampler(model, request.Seed, request.Steps, request.Guidance, request.Sampler, request.Scheduler, positive, negative, latent);
            graph.SaveImage(graph.VaeDecode(samples, vae), outputPrefix);
        }
        return graph;
    }

    /// <summary>The node classes a family's graph uses (checked against <c>/object_info</c> at start).</summary>
    public static IReadOnlyList<string> NodeClasses(string family) => family == "flux1"
        ? ["UNETLoader", "DualCLIPLoader", "VAELoader", "LoraLoaderModelOnly", "CLIPTextEncode", "FluxGuidance", "ConditioningZeroOut",
            "EmptySD3LatentImage", "KSampler", "VAEDecode", "SaveImage"]
        : ["CheckpointLoaderSimple", "LoraLoader", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode", "SaveImage"];

    /// <summary>Families this engine builds graphs for.</summary>
    public static bool Supports(string family) => family is "sd1" or "sdxl" or "flux1";
}
