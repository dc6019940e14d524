using System.Globalization;
using System.Text.Json;

namespace LoraDeploy.Cli.Client;

/// <summary>Lenient readers over the server's JSON: a missing or null field reads as empty, never throws.</summary>
internal static class Json
{
    public static string Str(this JsonElement e, string name) =>
        e.ValueKind == JsonValueKind.Object && e.TryGetProperty(name, out var v)
            ? v.ValueKind switch
            {
                JsonValueKind.String => v.GetString() ?? "",
                JsonValueKind.Null or JsonValueKind.Undefined => "",
                _ => v.ToString(),
            }
            : "";

    public static long? Long(this JsonElement e, string name) =>
        e.ValueKind == JsonValueKind.Object && e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Number
        && v.TryGetInt64(out var n)
            ? n
            : null;

    public static JsonElement? Obj(this JsonElement e, string name) =>
        e.ValueKind == JsonValueKind.Object && e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Object
            ? v
            : null;

    public static IEnumerable<string> Strings(this JsonElement e, string name) =>
        e.ValueKind == JsonValueKind.Object && e.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.Array
            ? v.EnumerateArray().Select(static x => x.ToString())
            : [];

    /// <summary><paramref name="item"/> with the <c>instances</c> of <paramref name="deploy"/> added (when it has them).</summary>
    public static JsonElement WithInstances(JsonElement item, JsonElement deploy)
    {
        if (deploy.Obj("instances") is not { } instances || item.ValueKind != JsonValueKind.Object)
        {
            return item;
        }
        var node = System.Text.Json.Nodes.JsonNode.Parse(item.GetRawText())!.AsObject();
        node["instances"] = System.Text.Json.Nodes.JsonNode.Parse(instances.GetRawText());
        return JsonDocument.Parse(node.ToJsonString()).RootElement.Clone();
    }

    /// <summary>The <c>lora_name</c> part of a <c>model_name</c> (<c>user/lora</c>).</summary>
    public static string LoraNameOf(string modelName)
    {
        var slash = modelName.LastIndexOf('/');
        return slash >= 0 ? modelName[(slash + 1)..] : modelName;
    }

    public static string Bytes(long? bytes)
    {
        if (bytes is not { } b)
        {
            return "?";
        }
        string[] units = ["B", "KiB", "MiB", "GiB", "TiB"];
        double value = b;
        var unit = 0;
        while (value >= 1024 && unit < units.Length - 1)
        {
            value /= 1024;
            unit++;
        }
        return unit == 0
            ? string.Create(CultureInfo.InvariantCulture, $"{b} B")
            : string.Create(CultureInfo.InvariantCulture, $"{value:0.0} {units[unit]}");
    }

    public static string ShortHash(string version) => version.Length > 12 ? version[..12] : version;
}
