using Microsoft.Extensions.Options;

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

/// <summary>Engines a pool can run on.</summary>
public static class Engines
{
    public const string LlamaCpp = "llamacpp";
    public const string ComfyUi = "comfyui";
}

/// <summary>
/// ComfyUI settings of an image pool (<c>BaseModels:{name}:ComfyUi:*</c>): <c>Url</c> = the ComfyUI server(s) the worker
/// drives (several separated by commas); <c>LoraFolder</c> = where the worker places adapters for ComfyUI (a <c>loras</c>
/// path in its <c>extra_model_paths.yaml</c>); the model file names as ComfyUI lists them; <c>StallSeconds</c> = how long
/// a job may go without news from ComfyUI before a running one is given up (503) and the worker leaves routing.
/// </summary>
public sealed record ComfyUiSettings(string? Url, string? LoraFolder, string? Checkpoint, string? Unet, string? Clip1, string? Clip2, string? Vae,
    int? StallSeconds = null);

/// <summary>
/// One accepted base model. With an <see cref="Engine"/> it is also a serving pool: workers of that engine load the
/// base once and serve many adapters on it.
/// </summary>
public sealed record BaseModelEntry(string Name, string Family)
{
    public const int DefaultMaxAdaptersPerWorker = 8;

    public string? Engine { get; init; }
    /// <summary>llamacpp: path of the base GGUF.</summary>
    public string? Gguf { get; init; }
    /// <summary>Path on this host of the base model's weights as one safetensors file (what exports merge into); null when not here.</summary>
    public string? Weights { get; init; }
    public ComfyUiSettings? ComfyUi { get; init; }
    /// <summary>Adapters a worker keeps resident for this pool (LRU beyond it; pinned ones never evicted).</summary>
    public int MaxAdaptersPerWorker { get; init; } = DefaultMaxAdaptersPerWorker;
    /// <summary>Default inference parameters (<c>BaseModels:{name}:Defaults:{parameter}</c>), applied where a request is silent.</summary>
    public IReadOnlyDictionary<string, string> Defaults { get; init; } = new Dictionary<string, string>();

    public bool IsPool => Engine is not null;
}

/// <summary>
/// Which base models a LoRA may be deployed on, which architecture family each one is, and which of them are serving
/// pools. An entry is either <c>BaseModels:{name}=family</c> or a section (<c>Family</c>, <c>Engine</c>, <c>Gguf</c>, <c>Weights</c>,
/// <c>ComfyUi:*</c>, <c>MaxAdaptersPerWorker</c>, <c>Defaults:*</c>). Configured entries add to (or override) the
/// defaults; an empty family removes a default.
/// </summary>
public sealed class BaseModelRegistry
{
    public static readonly IReadOnlyDictionary<string, string> Defaults = new Dictionary<string, string>(StringComparer.Ordinal)
    {
        ["black-forest-labs/FLUX-1-dev"] = "flux1",
        ["black-forest-labs/FLUX-1-schnell"] = "flux1",
        ["stabilityai/stable-diffusion-xl-base-1.0"] = "sdxl",
        ["stable-diffusion-v1-5/stable-diffusion-v1-5"] = "sd1",
    };

    private readonly Dictionary<string, BaseModelEntry> _entries;

    public BaseModelRegistry(IConfiguration configuration)
    {
        _entries = Defaults.ToDictionary(d => d.Key, d => new BaseModelEntry(d.Key, d.Value), StringComparer.Ordinal);
        var errors = new List<string>();
        // Bound by hand: configuration keys may contain '/' and '.', which the binder would nest.
        foreach (var entry in configuration.GetSection(BaseModelOptions.Section).GetChildren())
        {
            var name = entry.Key;
            if (entry.Value is { } family)
            {
                if (family.Length == 0)
                {
                    _entries.Remove(name);
                }
                else
                {
                    _entries[name] = new BaseModelEntry(name, family);
                }
                continue;
            }
            if (Parse(entry, errors) is { } parsed)
            {
                _entries[name] = parsed;
            }
        }
        Errors = errors;
    }

    /// <summary>What is wrong with the configured entries, one sentence each (checked at start).</summary>
    public IReadOnlyList<string> Errors { get; }

    public IEnumerable<string> Names => _entries.Keys.Order(StringComparer.Ordinal);

    public bool TryGetFamily(string baseModel, out string family)
    {
        family = _entries.TryGetValue(baseModel, out var entry) ? entry.Family : null!;
        return family is not null;
    }

    public BaseModelEntry? Find(string baseModel) => _entries.GetValueOrDefault(baseModel);

    /// <summary>Entries with an engine: each is a pool of workers.</summary>
    public IEnumerable<BaseModelEntry> Pools => _entries.Values.Where(e => e.IsPool).OrderBy(e => e.Name, StringComparer.Ordinal);

    private static BaseModelEntry? Parse(IConfigurationSection section, List<string> errors)
    {
        var key = $"{BaseModelOptions.Section}:{section.Key}";
        var family = section["Family"];
        if (string.IsNullOrWhiteSpace(family))
        {
            errors.Add($"{key}:Family is missing: every base model needs its architecture family (e.g. sdxl, flux1, llama).");
            return null;
        }
        var engine = section["Engine"] is { Length: > 0 } e ? e.Trim().ToLowerInvariant() : null;
        var max = BaseModelEntry.DefaultMaxAdaptersPerWorker;
        if (section["MaxAdaptersPerWorker"] is { } maxText && (!int.TryParse(maxText, out max) || max < 1 || max > 400))
        {
            errors.Add($"{key}:MaxAdaptersPerWorker '{maxText}' is not a whole number from 1 to 400.");
        }
        var comfy = section.GetSection("ComfyUi");
        var entry = new BaseModelEntry(section.Key, family.Trim())
        {
            Engine = engine,
            Gguf = section["Gguf"],
            Weights = section["Weights"] is { Length: > 0 } weights ? weights : null,
            ComfyUi = comfy.Exists()
                ? new ComfyUiSettings(comfy["Url"], comfy["LoraFolder"], comfy["Checkpoint"], comfy["Unet"], comfy["Clip1"], comfy["Clip2"], comfy["Vae"],
                    int.TryParse(comfy["StallSeconds"], out var stall) ? stall : null)
                : null,
            MaxAdaptersPerWorker = max,
            Defaults = section.GetSection("Defaults").GetChildren()
                .Where(d => d.Value is not null)
                .ToDictionary(d => d.Key, d => d.Value!, StringComparer.Ordinal),
        };
        if (entry.Weights is { } weightsPath && !File.Exists(weightsPath))
        {
            errors.Add(Directory.Exists(weightsPath)
                ? $"{key}:Weights '{weightsPath}' is a folder; give the base model's weights as one .safetensors file."
                : $"{key}:Weights '{weightsPath}' does not exist on this host; give the path of the base model's .safetensors file, or leave the setting out.");
        }
        switch (engine)
        {
            case null:
                break;
            case Engines.LlamaCpp:
                if (string.IsNullOrWhiteSpace(entry.Gguf))
                {
                    errors.Add($"{key}:Gguf is missing: a llamacpp pool needs the path of its base model's GGUF file.");
                }
                break;
            case Engines.ComfyUi:
                var urls = (entry.ComfyUi?.Url ?? "").Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
                if (urls.Length == 0 || urls.Any(u => !Uri.TryCreate(u, UriKind.Absolute, out var url) || url.Scheme is not ("http" or "https")))
                {
                    errors.Add($"{key}:ComfyUi:Url is missing or not an http(s) URL (several are separated by commas): a comfyui pool needs its ComfyUI server's address.");
                }
                if (comfy["StallSeconds"] is { } stallText && (!int.TryParse(stallText, out var stallSeconds) || stallSeconds is < 5 or > 3600))
                {
                    errors.Add($"{key}:ComfyUi:StallSeconds '{stallText}' is not a whole number of seconds from 5 to 3600.");
                }
                var needs = entry.Family == "flux1" ? new[] { "Unet", "Clip1", "Clip2", "Vae" } : ["Checkpoint"];
                foreach (var missing in needs.Where(n => string.IsNullOrWhiteSpace(comfy[n])))
                {
                    errors.Add($"{key}:ComfyUi:{missing} is missing: the {entry.Family} graph loads that model file.");
                }
                break;
            default:
                errors.Add($"{key}:Engine '{engine}' is not an engine LoraDeploy has; use {Engines.LlamaCpp} or {Engines.ComfyUi}.");
                break;
        }
        return entry;
    }

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

public static class BaseModelServiceCollectionExtensions
{
    /// <summary>The registry, with its configured entries checked at start (one message per bad entry).</summary>
    public static IServiceCollection AddBaseModels(this IServiceCollection services)
    {
        services.AddSingleton<BaseModelRegistry>();
        services.AddSingleton<IValidateOptions<BaseModelOptions>, BaseModelRegistryValidation>();
        services.AddOptions<BaseModelOptions>().ValidateOnStart();
        return services;
    }

    private sealed class BaseModelRegistryValidation(BaseModelRegistry registry) : IValidateOptions<BaseModelOptions>
    {
        public ValidateOptionsResult Validate(string? name, BaseModelOptions options) =>
            registry.Errors.Count == 0 ? ValidateOptionsResult.Success : ValidateOptionsResult.Fail(registry.Errors);
    }
}
