using System.Text.Json;

namespace LoraDeploy.Tests;

/// <summary>
/// A small checker over DeepInfra's OpenAPI (copied into Contract/): required properties present, JSON types
/// right, enums respected, through <c>$ref</c>, <c>anyOf</c>, arrays and nullables. Enough to hold our
/// responses to the contract; not a general JSON Schema validator.
/// </summary>
public static class ContractSchema
{
    private static readonly Lazy<JsonDocument> Document = new(() =>
        JsonDocument.Parse(File.ReadAllText(Path.Combine(AppContext.BaseDirectory, "Contract", "deepinfra-openapi-subset.json"))));

    private static JsonElement Schemas => Document.Value.RootElement.GetProperty("components").GetProperty("schemas");

    public static JsonElement Schema(string name) => Schemas.GetProperty(name);

    /// <summary>Fails the test with every mismatch between <paramref name="json"/> and the named schema.</summary>
    public static void AssertMatches(string schemaName, JsonElement json)
    {
        var problems = new List<string>();
        Check(Schema(schemaName), json, "$", problems);
        Assert.True(problems.Count == 0, $"Response does not match {schemaName}:\n  {string.Join("\n  ", problems)}\n{json}");
    }

    public static void AssertArrayOf(string schemaName, JsonElement json)
    {
        Assert.Equal(JsonValueKind.Array, json.ValueKind);
        foreach (var item in json.EnumerateArray())
        {
            AssertMatches(schemaName, item);
        }
    }

    /// <summary>The response schema the contract gives for an operation's 200, as a schema name (null when untyped).</summary>
    public static string? ResponseSchemaName(string path, string method)
    {
        var operation = Document.Value.RootElement.GetProperty("paths").GetProperty(path).GetProperty(method);
        var schema = operation.GetProperty("responses").GetProperty("200").GetProperty("content")
            .GetProperty("application/json").GetProperty("schema");
        if (schema.TryGetProperty("$ref", out var reference))
        {
            return reference.GetString()!.Split('/')[^1];
        }
        if (schema.TryGetProperty("items", out var items) && items.TryGetProperty("$ref", out var itemRef))
        {
            return itemRef.GetString()!.Split('/')[^1] + "[]";
        }
        return null;
    }

    private static void Check(JsonElement schema, JsonElement value, string path, List<string> problems)
    {
        if (schema.TryGetProperty("$ref", out var reference))
        {
            Check(Schemas.GetProperty(reference.GetString()!.Split('/')[^1]), value, path, problems);
            return;
        }
        if (schema.TryGetProperty("anyOf", out var anyOf) || schema.TryGetProperty("oneOf", out anyOf))
        {
            var matched = anyOf.EnumerateArray().Any(option =>
            {
                var inner = new List<string>();
                Check(option, value, path, inner);
                return inner.Count == 0;
            });
            if (!matched)
            {
                problems.Add($"{path}: {value.ValueKind} matches none of the anyOf options");
            }
            return;
        }
        if (schema.TryGetProperty("enum", out var values) && !values.EnumerateArray().Any(v => v.ToString() == value.ToString()))
        {
            problems.Add($"{path}: '{value}' is not one of [{string.Join(", ", values.EnumerateArray())}]");
        }
        if (!schema.TryGetProperty("type", out var type))
        {
            return; // untyped: anything goes
        }
        var ok = type.GetString() switch
        {
            "string" => value.ValueKind == JsonValueKind.String,
            "integer" => value.ValueKind == JsonValueKind.Number && value.TryGetInt64(out _),
            "number" => value.ValueKind == JsonValueKind.Number,
            "boolean" => value.ValueKind is JsonValueKind.True or JsonValueKind.False,
            "null" => value.ValueKind == JsonValueKind.Null,
            "array" => value.ValueKind == JsonValueKind.Array,
            "object" => value.ValueKind == JsonValueKind.Object,
            _ => true,
        };
        if (!ok)
        {
            problems.Add($"{path}: expected {type.GetString()}, got {value.ValueKind}");
            return;
        }
        if (value.ValueKind == JsonValueKind.Object)
        {
            if (schema.TryGetProperty("required", out var required))
            {
                foreach (var name in required.EnumerateArray().Select(r => r.GetString()!))
                {
                    if (!value.TryGetProperty(name, out _))
                    {
                        problems.Add($"{path}: required property '{name}' is missing");
                    }
                }
            }
            if (schema.TryGetProperty("properties", out var properties))
            {
                foreach (var property in properties.EnumerateObject())
                {
                    if (value.TryGetProperty(property.Name, out var child))
                    {
                        Check(property.Value, child, $"{path}.{property.Name}", problems);
                    }
                }
            }
        }
        if (value.ValueKind == JsonValueKind.Array && schema.TryGetProperty("items", out var itemSchema))
        {
            var index = 0;
            foreach (var item in value.EnumerateArray())
            {
                Check(itemSchema, item, $"{path}[{index++}]", problems);
            }
        }
    }
}
