using System.Globalization;
using System.Text.Json;

namespace LoraDeploy.Lora.Peft;

/// <summary>
/// The fields of a PEFT <c>adapter_config.json</c> that decide how a LoRA adapter is applied. Parsing checks each
/// field's JSON type and range and names the field when one is wrong; whether the adapter is usable with llama.cpp
/// (peft_type, DoRA, bias…) is decided by <see cref="PeftLoraConverter"/>, so a config can be read and reported on
/// even when it will be refused. Fields PEFT leaves at its defaults may be absent, except <c>peft_type</c>,
/// <c>r</c> and <c>lora_alpha</c>, which every saved LoRA config carries.
/// </summary>
public sealed record PeftAdapterConfig
{
    /// <summary>Largest accepted file; real configs are about 1 KB.</summary>
    public const int MaxBytes = 1024 * 1024;

    /// <summary><c>peft_type</c>, e.g. <c>LORA</c>.</summary>
    public required string PeftType { get; init; }
    /// <summary><c>r</c>: the default rank.</summary>
    public required int Rank { get; init; }
    /// <summary><c>lora_alpha</c>: the default alpha.</summary>
    public required double LoraAlpha { get; init; }
    /// <summary><c>target_modules</c> as a list of module-name suffixes; null when absent or given as a regex.</summary>
    public IReadOnlyList<string>? TargetModules { get; init; }
    /// <summary><c>target_modules</c> given as one string: a regex PEFT full-matches against module names (or <c>all-linear</c>).</summary>
    public string? TargetModulesRegex { get; init; }
    public bool UseRslora { get; init; }
    public bool UseDora { get; init; }
    /// <summary><c>rank_pattern</c> in file order (the first matching key wins).</summary>
    public IReadOnlyList<KeyValuePair<string, int>> RankPattern { get; init; } = [];
    /// <summary><c>alpha_pattern</c> in file order (the first matching key wins).</summary>
    public IReadOnlyList<KeyValuePair<string, double>> AlphaPattern { get; init; } = [];
    /// <summary><c>layers_to_transform</c> (an int is a one-element list); null means every layer.</summary>
    public IReadOnlyList<int>? LayersToTransform { get; init; }
    /// <summary><c>layers_pattern</c> (a string is a one-element list).</summary>
    public IReadOnlyList<string>? LayersPattern { get; init; }
    public bool FanInFanOut { get; init; }
    /// <summary><c>bias</c>: <c>none</c>, <c>all</c> or <c>lora_only</c>.</summary>
    public string Bias { get; init; } = "none";
    /// <summary><c>lora_bias</c> (newer PEFT): lora_B has a bias.</summary>
    public bool LoraBias { get; init; }
    public IReadOnlyList<string>? ModulesToSave { get; init; }
    public string? BaseModelNameOrPath { get; init; }

    public static PeftAdapterConfig ReadFile(string path)
    {
        using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read);
        if (file.Length > MaxBytes)
        {
            throw new PeftAdapterException($"adapter_config.json is {file.Length} bytes; a PEFT config is a few KB (limit {MaxBytes})");
        }
        var bytes = new byte[file.Length];
        file.ReadExactly(bytes);
        return Parse(bytes);
    }

    /// <exception cref="PeftAdapterException">The JSON is malformed or a field is missing or wrong; the message names it.</exception>
    public static PeftAdapterConfig Parse(ReadOnlySpan<byte> json)
    {
        if (json.Length > MaxBytes)
        {
            throw new PeftAdapterException($"adapter_config.json is {json.Length} bytes; a PEFT config is a few KB (limit {MaxBytes})");
        }
        // The JSON reader checks UTF-8 only when a string is read out, and then throws InvalidOperationException.
        if (!System.Text.Unicode.Utf8.IsValid(json))
        {
            throw new PeftAdapterException("adapter_config.json is not valid UTF-8");
        }
        JsonDocument document;
        try
        {
            // Duplicate keys are refused: which of two 'r's PEFT would use is not something to guess.
            document = JsonDocument.Parse(json.ToArray(), new JsonDocumentOptions
            {
                MaxDepth = 16, CommentHandling = JsonCommentHandling.Skip, AllowTrailingCommas = true, AllowDuplicateProperties = false,
            });
        }
        catch (JsonException e)
        {
            throw new PeftAdapterException($"adapter_config.json is not valid JSON: {e.Message}", e);
        }
        using (document)
        {
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
            {
                throw new PeftAdapterException("adapter_config.json must be a JSON object");
            }
            var (targetList, targetRegex) = TargetModulesField(root);
            return new PeftAdapterConfig
            {
                PeftType = RequiredString(root, "peft_type"),
                Rank = RequiredPositiveInt(root, "r"),
                LoraAlpha = RequiredNumber(root, "lora_alpha"),
                TargetModules = targetList,
                TargetModulesRegex = targetRegex,
                UseRslora = Bool(root, "use_rslora"),
                UseDora = Bool(root, "use_dora"),
                RankPattern = Pattern(root, "rank_pattern", (value, key) => PositiveInt(value, $"rank_pattern['{key}']")),
                AlphaPattern = Pattern(root, "alpha_pattern", (value, key) => Number(value, $"alpha_pattern['{key}']")),
                LayersToTransform = LayersToTransformField(root),
                LayersPattern = StringOrList(root, "layers_pattern"),
                FanInFanOut = Bool(root, "fan_in_fan_out"),
                Bias = BiasField(root),
                LoraBias = Bool(root, "lora_bias"),
                ModulesToSave = StringOrList(root, "modules_to_save"),
                BaseModelNameOrPath = OptionalString(root, "base_model_name_or_path"),
            };
        }
    }

    private static bool TryGet(JsonElement root, string name, out JsonElement value) =>
        root.TryGetProperty(name, out value) && value.ValueKind != JsonValueKind.Null;

    private static string RequiredString(JsonElement root, string name)
    {
        if (!TryGet(root, name, out var value))
        {
            throw new PeftAdapterException($"adapter_config.json has no '{name}'");
        }
        return value.ValueKind == JsonValueKind.String
            ? value.GetString()!
            : throw new PeftAdapterException($"adapter_config.json '{name}' must be a string, not {Describe(value)}");
    }

    private static string? OptionalString(JsonElement root, string name) =>
        !TryGet(root, name, out var value) ? null
        : value.ValueKind == JsonValueKind.String ? value.GetString()
        : throw new PeftAdapterException($"adapter_config.json '{name}' must be a string, not {Describe(value)}");

    private static int RequiredPositiveInt(JsonElement root, string name) =>
        TryGet(root, name, out var value)
            ? PositiveInt(value, name)
            : throw new PeftAdapterException($"adapter_config.json has no '{name}'");

    private static double RequiredNumber(JsonElement root, string name) =>
        TryGet(root, name, out var value)
            ? Number(value, name)
            : throw new PeftAdapterException($"adapter_config.json has no '{name}'");

    private static int PositiveInt(JsonElement value, string field) =>
        value.ValueKind == JsonValueKind.Number && value.TryGetInt32(out var n) && n > 0
            ? n
            : throw new PeftAdapterException($"adapter_config.json '{field}' must be a positive integer, not {Describe(value)}");

    private static double Number(JsonElement value, string field) =>
        value.ValueKind == JsonValueKind.Number && value.TryGetDouble(out var d) && double.IsFinite(d)
            ? d
            : throw new PeftAdapterException($"adapter_config.json '{field}' must be a finite number, not {Describe(value)}");

    private static bool Bool(JsonElement root, string name) =>
        !TryGet(root, name, out var value) ? false
        : value.ValueKind is JsonValueKind.True or JsonValueKind.False ? value.GetBoolean()
        : throw new PeftAdapterException($"adapter_config.json '{name}' must be true or false, not {Describe(value)}");

    private static (IReadOnlyList<string>?, string?) TargetModulesField(JsonElement root)
    {
        if (!TryGet(root, "target_modules", out var value))
        {
            return (null, null);
        }
        return value.ValueKind switch
        {
            JsonValueKind.String => (null, value.GetString()),
            JsonValueKind.Array => (Strings(value, "target_modules"), null),
            _ => throw new PeftAdapterException($"adapter_config.json 'target_modules' must be a list of module names or a regex string, not {Describe(value)}"),
        };
    }

    private static IReadOnlyList<string>? StringOrList(JsonElement root, string name) =>
        !TryGet(root, name, out var value) ? null
        : value.ValueKind == JsonValueKind.String ? [value.GetString()!]
        : value.ValueKind == JsonValueKind.Array ? Strings(value, name)
        : throw new PeftAdapterException($"adapter_config.json '{name}' must be a string or a list of strings, not {Describe(value)}");

    private static List<string> Strings(JsonElement array, string name)
    {
        var list = new List<string>();
        foreach (var item in array.EnumerateArray())
        {
            list.Add(item.ValueKind == JsonValueKind.String
                ? item.GetString()!
                : throw new PeftAdapterException($"adapter_config.json '{name}' must hold strings only, not {Describe(item)}"));
        }
        return list;
    }

    private static List<KeyValuePair<string, T>> Pattern<T>(JsonElement root, string name, Func<JsonElement, string, T> parse)
    {
        if (!TryGet(root, name, out var value))
        {
            return [];
        }
        if (value.ValueKind != JsonValueKind.Object)
        {
            throw new PeftAdapterException($"adapter_config.json '{name}' must be an object of module pattern → value, not {Describe(value)}");
        }
        var pattern = new List<KeyValuePair<string, T>>();
        var keys = new HashSet<string>(StringComparer.Ordinal);
        foreach (var entry in value.EnumerateObject())
        {
            if (!keys.Add(entry.Name))
            {
                throw new PeftAdapterException($"adapter_config.json '{name}' has the key '{entry.Name}' twice");
            }
            pattern.Add(new(entry.Name, parse(entry.Value, entry.Name)));
        }
        return pattern;
    }

    private static IReadOnlyList<int>? LayersToTransformField(JsonElement root)
    {
        const string name = "layers_to_transform";
        if (!TryGet(root, name, out var value))
        {
            return null;
        }
        if (value.ValueKind == JsonValueKind.Number)
        {
            return [Layer(value)];
        }
        if (value.ValueKind != JsonValueKind.Array)
        {
            throw new PeftAdapterException($"adapter_config.json '{name}' must be a layer index or a list of them, not {Describe(value)}");
        }
        return value.EnumerateArray().Select(Layer).Distinct().Order().ToList();

        static int Layer(JsonElement item) =>
            item.ValueKind == JsonValueKind.Number && item.TryGetInt32(out var n) && n >= 0
                ? n
                : throw new PeftAdapterException($"adapter_config.json 'layers_to_transform' must hold non-negative layer indices, not {Describe(item)}");
    }

    private static string BiasField(JsonElement root)
    {
        var bias = OptionalString(root, "bias") ?? "none";
        return bias is "none" or "all" or "lora_only"
            ? bias
            : throw new PeftAdapterException($"adapter_config.json 'bias' must be \"none\", \"all\" or \"lora_only\", not \"{bias}\"");
    }

    private static string Describe(JsonElement value) => value.ValueKind switch
    {
        JsonValueKind.String => $"the string \"{Truncate(value.GetString()!)}\"",
        JsonValueKind.Number => "the number " + value.GetRawText(),
        JsonValueKind.True or JsonValueKind.False => value.GetRawText(),
        JsonValueKind.Array => "a list",
        JsonValueKind.Object => "an object",
        JsonValueKind.Null => "null",
        _ => value.ValueKind.ToString().ToLower(CultureInfo.InvariantCulture),
    };

    private static string Truncate(string s) => s.Length <= 80 ? s : s[..80] + "…";
}
