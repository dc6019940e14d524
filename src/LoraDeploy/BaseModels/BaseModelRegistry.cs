namespace LoraDeploy.BaseModels;

/// <summary>
/// Settings section <c>BaseModels</c>: accepted <c>base_model</c> → architecture family. Configured entries
/// are added to (or override) the defaults; an empty family removes a default.
/// </summary>
public sealed class BaseModelOptions
{
    public const string Section = "BaseModels";

    public Dictionary<string, string> Models { get; set; } = new(StringComparer.Ordinal);
}

/// <summary>Which base models a LoRA may be deployed on, and which architecture family each one is.</summary>
public sealed class BaseModelRegistry
{
    public static readonly IReadOnlyDictionary<string, string> Defaults = new Dictionary<string, string>(StringComparer.Ordinal)
    {
        ["black-forest-labs/FLUX-1-dev"] = "flux1",
        ["black-forest-labs/FLUX-1-schnell"] = "flux1",
        ["stabilityai/stable-diffusion-xl-base-1.0"] = "sdxl",
        ["stable-diffusion-v1-5/stable-diffusion-v1-5"] = "sd1",
    };

    private readonly Dictionary<string, string> _families;

    public BaseModelRegistry(IConfiguration configuration)
    {
        _families = new Dictionary<string, string>(Defaults, StringComparer.Ordinal);
        // Bound by hand: configuration keys may contain '/' and '.', which the binder would nest.
        foreach (var entry in configuration.GetSection(BaseModelOptions.Section).GetChildren())
        {
            var name = entry.Key;
            var family = entry.Value;
            if (family is null)
            {
                continue;
            }
            if (family.Length == 0)
            {
                _families.Remove(name);
            }
            else
            {
                _families[name] = family;
            }
        }
    }

    public IEnumerable<string> Names => _families.Keys.Order(StringComparer.Ordinal);

    public bool TryGetFamily(string baseModel, out string family) => _families.TryGetValue(baseModel, out family!);

    /// <summary>
    /// The family of a CivitAI <c>baseModel</c> string. CivitAI's list is open-ended and renamed now and then, so
    /// this matches by prefix and returns null for anything unknown rather than guessing.
    /// </summary>
    public static string? FamilyOfCivitaiBaseModel(string? civitaiBaseModel)
    {
        if (string.IsNullOrWhiteSpace(civitaiBaseModel))
        {
            return null;
        }
        var value = civitaiBaseModel.Trim();
        return value switch
        {
            "Pony" or "Illustrious" or "NoobAI" => "sdxl",
            "Pony V7" => "auraflow",
            _ when value.StartsWith("SDXL", StringComparison.OrdinalIgnoreCase) => "sdxl",
            _ when value.StartsWith("SD 1.", StringComparison.OrdinalIgnoreCase) => "sd1",
            _ when value.StartsWith("SD 2.", StringComparison.OrdinalIgnoreCase) => "sd2",
            _ when value.StartsWith("SD 3", StringComparison.OrdinalIgnoreCase) => "sd3",
            _ when value.StartsWith("Flux.1", StringComparison.OrdinalIgnoreCase) => "flux1",
            _ when value.StartsWith("Flux.2", StringComparison.OrdinalIgnoreCase) => "flux2",
            _ when value.StartsWith("Hunyuan Video", StringComparison.OrdinalIgnoreCase) => "hunyuan-video",
            _ when value.StartsWith("Wan Video", StringComparison.OrdinalIgnoreCase) => "wan",
            _ when value.StartsWith("Qwen", StringComparison.OrdinalIgnoreCase) => "qwen-image",
            "AuraFlow" => "auraflow",
            "Anima" => "anima",
            "Chroma" => "chroma",
            "Lumina" => "lumina",
            "HiDream" => "hidream",
            "ZImageTurbo" or "ZImageBase" => "z-image",
            _ => null,
        };
    }
}
