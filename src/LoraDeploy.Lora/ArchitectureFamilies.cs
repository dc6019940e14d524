namespace LoraDeploy.Lora;

/// <summary>
/// Architecture ids emitted by <see cref="LoraProber"/> and their display names, for messages such as
/// "this LoRA targets SDXL; base_model black-forest-labs/FLUX.1-dev is FLUX.1".
/// </summary>
public static class ArchitectureFamilies
{
    /// <summary>Stable Diffusion 1.x (CLIP-L 768 context).</summary>
    public const string Sd1 = "sd1";
    /// <summary>Stable Diffusion 2.x (OpenCLIP-H 1024 context).</summary>
    public const string Sd2 = "sd2";
    /// <summary>SDXL and its descendants (Pony, Illustrious, NoobAI — identical keys).</summary>
    public const string Sdxl = "sdxl";
    /// <summary>Stable Diffusion 3 / 3.5 (MMDiT).</summary>
    public const string Sd3 = "sd3";
    /// <summary>FLUX.1 dev/schnell/Krea/Kontext (not separable by keys).</summary>
    public const string Flux1 = "flux1";
    /// <summary>FLUX.2 (Klein 4B/9B, Dev).</summary>
    public const string Flux2 = "flux2";
    /// <summary>HunyuanVideo.</summary>
    public const string HunyuanVideo = "hunyuan-video";
    /// <summary>Wan 2.1 / 2.2.</summary>
    public const string Wan = "wan";
    /// <summary>Qwen-Image.</summary>
    public const string QwenImage = "qwen-image";
    /// <summary>LTX-Video.</summary>
    public const string Ltx = "ltx";
    /// <summary>Anima (Cosmos-based DiT with a Qwen3 text encoder).</summary>
    public const string Anima = "anima";
    /// <summary>Krea 2.</summary>
    public const string Krea2 = "krea2";
    /// <summary>A language model (PEFT adapter for an LLM), not an image model.</summary>
    public const string LanguageModel = "llm";
    /// <summary>The keys did not identify an architecture.</summary>
    public const string Unknown = "unknown";

    private static readonly Dictionary<string, string> DisplayNames = new(StringComparer.Ordinal)
    {
        [Sd1] = "SD 1.x",
        [Sd2] = "SD 2.x",
        [Sdxl] = "SDXL",
        [Sd3] = "SD 3",
        [Flux1] = "FLUX.1",
        [Flux2] = "FLUX.2",
        [HunyuanVideo] = "HunyuanVideo",
        [Wan] = "Wan",
        [QwenImage] = "Qwen-Image",
        [Ltx] = "LTX-Video",
        [Anima] = "Anima",
        [Krea2] = "Krea 2",
        [LanguageModel] = "language model",
        [Unknown] = "unknown",
    };

    /// <summary>Every id the prober can emit.</summary>
    public static IReadOnlyCollection<string> Ids => DisplayNames.Keys;

    /// <summary>Human-readable name for an architecture id ("sdxl" → "SDXL"); unknown ids are returned unchanged.</summary>
    public static string Display(string id) => DisplayNames.TryGetValue(id, out var name) ? name : id;
}
