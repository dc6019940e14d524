using System.Globalization;
using System.Text.Json.Nodes;

namespace LoraDeploy.Serving.ComfyUi;

/// <summary>A ComfyUI value type flowing along a link (the type names ComfyUI checks links against).</summary>
public interface IComfyType;

public sealed class ModelT : IComfyType;
public sealed class ClipT : IComfyType;
public sealed class VaeT : IComfyType;
public sealed class ConditioningT : IComfyType;
public sealed class LatentT : IComfyType;
public sealed class ImageT : IComfyType;

/// <summary>Output <see cref="Slot"/> of node <see cref="Node"/>, carrying a <typeparamref name="T"/>: written as <c>["node", slot]</c>.</summary>
public readonly record struct Output<T>(string Node, int Slot) where T : IComfyType
{
    internal JsonArray ToJson() => [Node, Slot];
}

/// <summary>
/// A ComfyUI API-format graph (<c>{"id": {"class_type", "inputs"}}</c>) built from typed node methods, so a wrong link
/// (a CLIP where a MODEL goes) does not compile, and values are numbers or strings of the right kind. Node ids are
/// strings ("1", "2", …), as ComfyUI requires (a numeric id in a link fails its validation).
/// </summary>
public sealed class ComfyGraph
{
    private readonly JsonObject _nodes = [];
    private int _next;

    /// <summary>The node that saves the images (its outputs in <c>/history</c> list them).</summary>
    public string? SaveNode { get; private set; }

    public JsonObject ToJson() => (JsonObject)_nodes.DeepClone();

    public (Output<ModelT> Model, Output<ClipT> Clip, Output<VaeT> Vae) CheckpointLoaderSimple(string checkpoint)
    {
        var id = Add("CheckpointLoaderSimple", new() { ["ckpt_name"] = checkpoint });
        return (new(id, 0), new(id, 1), new(id, 2));
    }

    public Output<ModelT> UnetLoader(string unet, string weightDtype = "default") =>
        new(Add("UNETLoader", new() { ["unet_name"] = unet, ["weight_dtype"] = weightDtype }), 0);

    public Output<ClipT> DualClipLoader(string clip1, string clip2, string type) =>
        new(Add("DualCLIPLoader", new() { ["clip_name1"] = clip1, ["clip_name2"] = clip2, ["type"] = type }), 0);

    public Output<VaeT> VaeLoader(string vae) => new(Add("VAELoader", new() { ["vae_name"] = vae }), 0);

    public (Output<ModelT> Model, Output<ClipT> Clip) LoraLoader(Output<ModelT> model, Output<ClipT> clip, string lora, double strengthModel, double strengthClip)
    {
        var id = Add("LoraLoader", new()
        {
            ["model"] = model.ToJson(),
            ["clip"] = clip.ToJson(),
            ["lora_name"] = lora,
            ["strength_model"] = Round(strengthModel),
            ["strength_clip"] = Round(strengthClip),
        });
        return (new(id, 0), new(id, 1));
    }

    public Output<ModelT> LoraLoaderModelOnly(Output<ModelT> model, string lora, double strength) =>
        new(Add("LoraLoaderModelOnly", new() { ["model"] = model.ToJson(), ["lora_name"] = lora, ["strength_model"] = Round(strength) }), 0);

    public Output<ConditioningT> ClipTextEncode(Output<ClipT> clip, string text) =>
        new(Add("CLIPTextEncode", new() { ["text"] = text, ["clip"] = clip.ToJson() }), 0);

    public Output<ConditioningT> FluxGuidance(Output<ConditioningT> conditioning, double guidance) =>
        new(Add("FluxGuidance", new() { ["conditioning"] = conditioning.ToJson(), ["guidance"] = Round(guidance) }), 0);

    public Output<ConditioningT> ConditioningZeroOut(Output<ConditioningT> conditioning) =>
        new(Add("ConditioningZeroOut", new() { ["conditioning"] = conditioning.ToJson() }), 0);

    public Output<LatentT> EmptyLatentImage(int width, int height, int batch) =>
        new(Add("EmptyLatentImage", new() { ["width"] = width, ["height"] = height, ["batch_size"] = batch }), 0);

    public Output<LatentT> EmptySd3LatentImage(int width, int height, int batch) =>
        new(Add("EmptySD3LatentImage", new() { ["width"] = width, ["height"] = height, ["batch_size"] = batch }), 0);

    public Output<LatentT> KSampler(Output<ModelT> model, ulong seed, int steps, double cfg, string sampler, string scheduler,
        Output<ConditioningT> positive, Output<ConditioningT> negative, Output<LatentT> latent) =>
        new(Add("KSampler", new()
        {
            ["model"] = model.ToJson(),
            ["seed"] = seed,
            ["steps"] = steps,
            ["cfg"] = Round(cfg),
            ["sampler_name"] = sampler,
            ["scheduler"] = scheduler,
            ["positive"] = positive.ToJson(),
            ["negative"] = negative.ToJson(),
            ["latent_image"] = latent.ToJson(),
            ["denoise"] = 1.0,
        }), 0);

    public Output<ImageT> VaeDecode(Output<LatentT> samples, Output<VaeT> vae) =>
        new(Add("VAEDecode", new() { ["samples"] = samples.ToJson(), ["vae"] = vae.ToJson() }), 0);

    /// <summary>The output node; <paramref name="prefix"/> may hold a subfolder (<c>loradeploy/{id}</c>), kept inside ComfyUI's output folder.</summary>
    public void SaveImage(Output<ImageT> images, string prefix) =>
        SaveNode = Add("SaveImage", new() { ["images"] = images.ToJson(), ["filename_prefix"] = prefix });

    private string Add(string classType, JsonObject inputs)
    {
        var id = (++_next).ToString(CultureInfo.InvariantCulture);
        _nodes[id] = new JsonObject { ["class_type"] = classType, ["inputs"] = inputs };
        return id;
    }

    /// <summary>Strengths and guidance as ComfyUI's widgets hold them (step 0.01): 0.7f must not become 0.699999988.</summary>
    private static double Round(double value) => Math.Round(value, 4);
}
