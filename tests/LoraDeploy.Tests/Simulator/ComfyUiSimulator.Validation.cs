using System.Globalization;
using System.Numerics;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.AspNetCore.Http;

namespace LoraDeploy.Tests.Simulator;

/// <summary><c>POST /prompt</c> and <c>execution.validate_prompt</c> / <c>validate_inputs</c>, with their exact error shapes.</summary>
public sealed partial class ComfyUiSimulator
{
    private sealed record Validation(bool Valid, List<JsonObject> Reasons);

    private async Task PostPromptAsync(HttpContext ctx)
    {
        var body = await ReadJsonAsync(ctx) as JsonObject ?? throw new PythonError("TypeError", "the request body is not a JSON object");
        double number;
        lock (_queueGate)
        {
            if (body.ContainsKey("number"))
            {
                number = PyFloat(body["number"]);
            }
            else
            {
                number = _number;
                if (body.ContainsKey("front") && IsTruthy(body["front"]))
                {
                    number = -number;
                }
                _number++;
            }
        }
        if (!body.ContainsKey("prompt"))
        {
            await Json(ctx, 400, ErrorBody(Error("no_prompt", "No prompt provided", "No prompt provided"), []));
            return;
        }
        string promptId;
        if (body["prompt_id"] is null)
        {
            promptId = Guid.NewGuid().ToString();
        }
        else if (body["prompt_id"] is JsonValue idValue && idValue.TryGetValue<string>(out var given) && IsCanonicalUuid(given))
        {
            promptId = given;
        }
        else
        {
            await Json(ctx, 400, ErrorBody(Error(
                "invalid_prompt_id", "prompt_id must be a valid UUID",
                "prompt_id must be a UUID string in canonical lowercase hyphenated form; omit it to let the server generate one"), []));
            return;
        }
        var prompt = body["prompt"] as JsonObject ?? throw new PythonError("TypeError", "prompt is not a JSON object");
        var targets = body["partial_execution_targets"] is JsonArray t ? t.Select(x => x?.ToString() ?? "").ToHashSet(StringComparer.Ordinal) : null;

        var (ok, error, outputs, nodeErrors) = ValidatePrompt(prompt, targets);
        if (ok && Faults.TakeRejection() is { } rejection)
        {
            (ok, error, nodeErrors) = (false, Error("prompt_outputs_failed_validation", "Prompt outputs failed validation", ""), Rejected(prompt, rejection, outputs));
        }
        if (!ok)
        {
            await Json(ctx, 400, ErrorBody(error!, nodeErrors));
            return;
        }

        var extraData = body["extra_data"]?.DeepClone() as JsonObject ?? [];
        string? clientId = null;
        if (body.ContainsKey("client_id"))
        {
            extraData["client_id"] = body["client_id"]?.DeepClone();
            clientId = body["client_id"]?.ToString();
        }
        extraData["create_time"] = _time.GetUtcNow().ToUnixTimeMilliseconds();
        // The executor reads its own copy while /queue and /history copy theirs from other threads.
        var job = new Job(number, promptId, (JsonObject)prompt.DeepClone(), extraData, clientId, outputs);
        _prompts.Enqueue(new ComfySimPrompt(promptId, clientId, (JsonObject)prompt.DeepClone(), number));
        Put(job);
        await Json(ctx, 200, new JsonObject
        {
            ["prompt_id"] = promptId,
            ["number"] = body.ContainsKey("number") ? JsonValue.Create(number) : JsonValue.Create((long)number),
            ["node_errors"] = nodeErrors,
        });
    }

    /// <summary><c>validate_job_id</c>: a UUID in canonical lowercase hyphenated form.</summary>
    private static bool IsCanonicalUuid(string s) =>
        Guid.TryParseExact(s, "D", out var g) && g.ToString("D") == s;

    private static JsonObject Error(string type, string message, string details, JsonObject? extra = null) => new()
    {
        ["type"] = type,
        ["message"] = message,
        ["details"] = details,
        ["extra_info"] = extra ?? [],
    };

    private static JsonObject ErrorBody(JsonObject error, JsonObject nodeErrors) => new() { ["error"] = error, ["node_errors"] = nodeErrors };

    private JsonObject Rejected(JsonObject prompt, ComfySimNodeError rejection, List<string> outputs)
    {
        var target = prompt.FirstOrDefault(n => rejection.ClassType is not null && (n.Value as JsonObject)?["class_type"]?.ToString() == rejection.ClassType);
        if (target.Key is null)
        {
            target = prompt.First();
        }
        var extra = rejection.InputName is null ? new JsonObject() : new JsonObject { ["input_name"] = rejection.InputName };
        return new JsonObject
        {
            [target.Key] = new JsonObject
            {
                ["errors"] = new JsonArray(Error(rejection.Type, rejection.Message, rejection.Details, extra)),
                ["dependent_outputs"] = new JsonArray([.. outputs.Select(o => (JsonNode)o)]),
                ["class_type"] = (target.Value as JsonObject)?["class_type"]?.DeepClone(),
            },
        };
    }

    private (bool Ok, JsonObject? Error, List<string> Outputs, JsonObject NodeErrors) ValidatePrompt(JsonObject prompt, HashSet<string>? targets)
    {
        var outputs = new List<string>();
        foreach (var (id, value) in prompt)
        {
            var node = value as JsonObject ?? throw new PythonError("TypeError", $"node {id} is not an object");
            var title = (node["_meta"] as JsonObject)?["title"]?.ToString();
            if (!node.ContainsKey("class_type"))
            {
                return (false, Error("missing_node_type",
                    $"Node '{title ?? $"ID #{id}"}' has no class_type. The workflow may be corrupted or a custom node is missing.",
                    $"Node ID '#{id}'",
                    new JsonObject { ["node_id"] = id, ["class_type"] = null, ["node_title"] = title }), [], []);
            }
            var classType = node["class_type"]?.ToString() ?? "None";
            if (!_nodeClasses.TryGetValue(classType, out var cls))
            {
                return (false, Error("missing_node_type",
                    $"Node '{title ?? classType}' not found. The custom node may not be installed.",
                    $"Node ID '#{id}'",
                    new JsonObject { ["node_id"] = id, ["class_type"] = classType, ["node_title"] = title ?? classType }), [], []);
            }
            if (cls.OutputNode && (targets is null || targets.Contains(id)))
            {
                outputs.Add(id);
            }
        }
        if (outputs.Count == 0)
        {
            return (false, Error("prompt_no_outputs", "Prompt has no outputs", ""), [], []);
        }

        var good = new List<string>();
        var failures = new List<(string Output, List<JsonObject> Reasons)>();
        var nodeErrors = new JsonObject();
        var validated = new Dictionary<string, Validation>(StringComparer.Ordinal);
        foreach (var output in outputs)
        {
            Validation result;
            try
            {
                result = ValidateInputs(prompt, output, validated, []);
            }
            catch (PythonError ex)
            {
                result = new(false, [Error("exception_during_validation", "Exception when validating node", ex.Message,
                    new JsonObject { ["exception_type"] = ex.PythonType, ["traceback"] = new JsonArray() })]);
                validated[output] = result;
            }
            if (result.Valid)
            {
                good.Add(output);
                continue;
            }
            failures.Add((output, result.Reasons));
            foreach (var (nodeId, v) in validated)
            {
                // A node downstream of a bad one is invalid without errors of its own: ComfyUI leaves it out.
                if (v.Valid || v.Reasons.Count == 0)
                {
                    continue;
                }
                if (nodeErrors[nodeId] is not JsonObject entry)
                {
                    entry = new JsonObject
                    {
                        ["errors"] = new JsonArray([.. v.Reasons.Select(r => r.DeepClone())]),
                        ["dependent_outputs"] = new JsonArray(),
                        ["class_type"] = (prompt[nodeId] as JsonObject)?["class_type"]?.DeepClone(),
                    };
                    nodeErrors[nodeId] = entry;
                }
                ((JsonArray)entry["dependent_outputs"]!).Add(output);
            }
        }
        if (good.Count == 0)
        {
            var details = string.Join("\n", failures.SelectMany(f => f.Reasons).Select(r => $"{r["message"]}: {r["details"]}"));
            return (false, Error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details), [], nodeErrors);
        }
        return (true, null, good, nodeErrors);
    }

    private Validation ValidateInputs(JsonObject prompt, string id, Dictionary<string, Validation> validated, List<string> visiting)
    {
        if (validated.TryGetValue(id, out var done))
        {
            return done;
        }
        if (visiting.Contains(id))
        {
            var path = visiting[visiting.IndexOf(id)..].Append(id).ToList();
            var cycle = path.Distinct().ToList();
            var text = string.Join(" -> ", path.Select(n => $"{n} ({(prompt[n] as JsonObject)?["class_type"]})"));
            foreach (var n in cycle)
            {
                validated[n] = new(false, [Error("dependency_cycle", "Dependency cycle detected", text,
                    new JsonObject { ["node_id"] = n, ["cycle_nodes"] = new JsonArray([.. cycle.Select(c => (JsonNode)c)]) })]);
            }
            return validated[id];
        }

        var node = (JsonObject)prompt[id]!;
        var inputs = node["inputs"] as JsonObject ?? throw new PythonError("KeyError", "'inputs'");
        var cls = _nodeClasses[node["class_type"]!.ToString()];
        var errors = new List<JsonObject>();
        var valid = true;
        foreach (var (def, category) in cls.Inputs())
        {
            var name = def.Name;
            var spec = def.Spec();
            JsonNode InputConfig() => spec.Count > 1 ? spec.DeepClone() : new JsonArray(spec[0]!.DeepClone(), new JsonObject());
            if (!inputs.ContainsKey(name))
            {
                if (category == "required")
                {
                    errors.Add(Error("required_input_missing", "Required input is missing", name, new JsonObject { ["input_name"] = name }));
                }
                continue;
            }
            var value = inputs[name];
            if (value is JsonArray link)
            {
                if (link.Count != 2)
                {
                    errors.Add(Error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]", name,
                        new JsonObject { ["input_name"] = name, ["input_config"] = InputConfig(), ["received_value"] = link.DeepClone() }));
                    continue;
                }
                // prompt[o_id]['class_type'] and RETURN_TYPES[slot] raise outside any try: the caller reports the exception.
                var sourceId = link[0] is JsonValue sv && sv.GetValueKind() == JsonValueKind.String ? sv.GetValue<string>() : null;
                if (sourceId is null || prompt[sourceId] is not JsonObject source)
                {
                    throw new PythonError("KeyError", sourceId is null ? PyStr(link[0]) : PyRepr(link[0]));
                }
                var returns = _nodeClasses[source["class_type"]!.ToString()].Outputs;
                var slot = TupleIndex(link[1], returns.Count);
                var receivedType = returns[slot];
                var expected = def.Combo is null ? def.Type! : PyStr(spec[0]);
                if (receivedType != expected && receivedType != "*" && expected != "*")
                {
                    errors.Add(Error("return_type_mismatch", "Return type mismatch between linked nodes",
                        $"{name}, received_type({receivedType}) mismatch input_type({expected})",
                        new JsonObject
                        {
                            ["input_name"] = name, ["input_config"] = InputConfig(), ["received_type"] = receivedType, ["linked_node"] = link.DeepClone(),
                        }));
                    continue;
                }
                try
                {
                    visiting.Add(id);
                    Validation inner;
                    try
                    {
                        inner = ValidateInputs(prompt, sourceId, validated, visiting);
                    }
                    finally
                    {
                        visiting.RemoveAt(visiting.Count - 1);
                    }
                    if (!inner.Valid)
                    {
                        valid = false;
                    }
                }
                catch (PythonError ex)
                {
                    valid = false;
                    validated[sourceId] = new(false, [Error("exception_during_inner_validation", "Exception when validating inner node", ex.Message,
                        new JsonObject
                        {
                            ["input_name"] = name, ["input_config"] = InputConfig(), ["exception_message"] = ex.Message,
                            ["exception_type"] = ex.PythonType, ["traceback"] = new JsonArray(), ["linked_node"] = link.DeepClone(),
                        })]);
                }
                continue;
            }

            if (value is JsonObject wrapped && wrapped.ContainsKey("__value__"))
            {
                value = wrapped["__value__"]?.DeepClone();
                inputs[name] = value;
            }
            JsonNode? converted;
            try
            {
                converted = def.Type switch
                {
                    "INT" => JsonNode.Parse(PyInt(value).ToString(CultureInfo.InvariantCulture)),
                    "FLOAT" => JsonValue.Create(PyFloat(value)),
                    "STRING" => JsonValue.Create(PyStr(value)),
                    _ => value,
                };
            }
            catch (PythonError ex)
            {
                errors.Add(Error("invalid_input_type", $"Failed to convert an input value to a {def.Type} value", $"{name}, {PyStr(value)}, {ex.Message}",
                    new JsonObject { ["input_name"] = name, ["input_config"] = InputConfig(), ["received_value"] = value?.DeepClone(), ["exception_message"] = ex.Message }));
                continue;
            }
            if (!ReferenceEquals(converted, value))
            {
                inputs[name] = converted;
                value = converted;
            }
            var options = def.Options;
            if (options["min"] is { } min && Compare(value!, min) < 0)
            {
                errors.Add(Error("value_smaller_than_min", $"Value {PyNumber(value!, def.Type)} smaller than min of {PyNumber(min, def.Type)}", name,
                    new JsonObject { ["input_name"] = name, ["input_config"] = InputConfig(), ["received_value"] = value!.DeepClone() }));
                continue;
            }
            if (options["max"] is { } max && Compare(value!, max) > 0)
            {
                errors.Add(Error("value_bigger_than_max", $"Value {PyNumber(value!, def.Type)} bigger than max of {PyNumber(max, def.Type)}", name,
                    new JsonObject { ["input_name"] = name, ["input_config"] = InputConfig(), ["received_value"] = value!.DeepClone() }));
                continue;
            }
            if (def.Combo is not null)
            {
                var choices = ((JsonArray)spec[0]!).Select(c => c!.ToString()).ToList();
                var isString = value is JsonValue cv && cv.GetValueKind() == JsonValueKind.String;
                if (!isString || !choices.Contains(value!.GetValue<string>()))
                {
                    // Long lists (scanned model files) are summarised, not echoed.
                    var listInfo = choices.Count > 20 ? $"(list of length {choices.Count})" : "[" + string.Join(", ", choices.Select(c => PyRepr(c))) + "]";
                    errors.Add(Error("value_not_in_list", "Value not in list", $"{name}: {PyRepr(value)} not in {listInfo}",
                        new JsonObject { ["input_name"] = name, ["input_config"] = choices.Count > 20 ? null : InputConfig(), ["received_value"] = value?.DeepClone() }));
                }
            }
        }
        var previous = validated.GetValueOrDefault(id) ?? new Validation(true, []);
        var merged = new Validation(previous.Valid && valid && errors.Count == 0, [.. previous.Reasons, .. errors.Where(e => !previous.Reasons.Contains(e))]);
        validated[id] = merged;
        return merged;
    }

    // ---- Python semantics the messages depend on ---------------------------------------------

    /// <summary><c>tuple[index]</c>: ints only, negative from the end, else IndexError/TypeError.</summary>
    private static int TupleIndex(JsonNode? index, int count)
    {
        if (index is JsonValue v && v.GetValueKind() == JsonValueKind.Number && long.TryParse(v.ToJsonString(), CultureInfo.InvariantCulture, out var i))
        {
            var actual = i < 0 ? i + count : i;
            return actual >= 0 && actual < count ? (int)actual : throw new PythonError("IndexError", "tuple index out of range");
        }
        if (index is JsonValue b && b.GetValueKind() is JsonValueKind.True or JsonValueKind.False)
        {
            var actual = b.GetValue<bool>() ? 1 : 0;
            return actual < count ? actual : throw new PythonError("IndexError", "tuple index out of range");
        }
        throw new PythonError("TypeError", $"tuple indices must be integers or slices, not {PyTypeName(index)}");
    }

    private static string PyTypeName(JsonNode? node) => node switch
    {
        null => "NoneType",
        JsonArray => "list",
        JsonObject => "dict",
        JsonValue v => v.GetValueKind() switch
        {
            JsonValueKind.String => "str",
            JsonValueKind.True or JsonValueKind.False => "bool",
            _ => v.ToJsonString().IndexOfAny(['.', 'e', 'E']) >= 0 ? "float" : "int",
        },
        _ => "object",
    };

    /// <summary><c>int(value)</c>.</summary>
    private static BigInteger PyInt(JsonNode? value)
    {
        switch (value)
        {
            case JsonValue v when v.GetValueKind() == JsonValueKind.Number:
                var raw = v.ToJsonString();
                if (BigInteger.TryParse(raw, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var whole))
                {
                    return whole;
                }
                return new BigInteger(Math.Truncate(double.Parse(raw, CultureInfo.InvariantCulture)));
            case JsonValue v when v.GetValueKind() is JsonValueKind.True or JsonValueKind.False:
                return v.GetValue<bool>() ? 1 : 0;
            case JsonValue v when v.GetValueKind() == JsonValueKind.String:
                var s = v.GetValue<string>().Trim().Replace("_", "", StringComparison.Ordinal);
                return BigInteger.TryParse(s, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var parsed)
                    ? parsed
                    : throw new PythonError("ValueError", $"invalid literal for int() with base 10: {PyRepr(v)}");
            default:
                throw new PythonError("TypeError", $"int() argument must be a string, a bytes-like object or a real number, not '{PyTypeName(value)}'");
        }
    }

    /// <summary><c>float(value)</c>.</summary>
    private static double PyFloat(JsonNode? value)
    {
        switch (value)
        {
            case JsonValue v when v.GetValueKind() == JsonValueKind.Number:
                return double.Parse(v.ToJsonString(), CultureInfo.InvariantCulture);
            case JsonValue v when v.GetValueKind() is JsonValueKind.True or JsonValueKind.False:
                return v.GetValue<bool>() ? 1 : 0;
            case JsonValue v when v.GetValueKind() == JsonValueKind.String:
                return double.TryParse(v.GetValue<string>().Trim(), NumberStyles.Float, CultureInfo.InvariantCulture, out var d)
                    ? d
                    : throw new PythonError("ValueError", $"could not convert string to float: {PyRepr(v)}");
            default:
                throw new PythonError("TypeError", $"float() argument must be a string or a real number, not '{PyTypeName(value)}'");
        }
    }

    private static int Compare(JsonNode value, JsonNode limit)
    {
        var a = value.ToJsonString();
        var b = limit.ToJsonString();
        if (BigInteger.TryParse(a, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var x)
            && BigInteger.TryParse(b, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var y))
        {
            return x.CompareTo(y);
        }
        return double.Parse(a, CultureInfo.InvariantCulture).CompareTo(double.Parse(b, CultureInfo.InvariantCulture));
    }

    /// <summary>A number as Python prints it: <c>5</c> for an int, <c>-200.0</c> for a float.</summary>
    private static string PyNumber(JsonNode number, string? type) =>
        type == "FLOAT" ? PyFloatText(double.Parse(number.ToJsonString(), CultureInfo.InvariantCulture)) : number.ToJsonString();

    private static string PyFloatText(double d) =>
        double.IsInteger(d) && Math.Abs(d) < 1e16 ? d.ToString("0.0", CultureInfo.InvariantCulture) : d.ToString("R", CultureInfo.InvariantCulture);

    /// <summary><c>str(value)</c> of a JSON value as Python would print it.</summary>
    internal static string PyStr(JsonNode? node) => node switch
    {
        JsonValue v when v.GetValueKind() == JsonValueKind.String => v.GetValue<string>(),
        _ => PyRepr(node),
    };

    /// <summary><c>repr(value)</c>: quoted strings, None/True/False, Python list and dict syntax.</summary>
    internal static string PyRepr(JsonNode? node) => node switch
    {
        null => "None",
        JsonArray a => "[" + string.Join(", ", a.Select(PyRepr)) + "]",
        JsonObject o => "{" + string.Join(", ", o.Select(p => $"{PyRepr(p.Key)}: {PyRepr(p.Value)}")) + "}",
        JsonValue v => v.GetValueKind() switch
        {
            JsonValueKind.String => PyRepr(v.GetValue<string>()),
            JsonValueKind.True => "True",
            JsonValueKind.False => "False",
            _ => v.ToJsonString().IndexOfAny(['.', 'e', 'E']) >= 0 ? PyFloatText(double.Parse(v.ToJsonString(), CultureInfo.InvariantCulture)) : v.ToJsonString(),
        },
        _ => node.ToJsonString(),
    };

    internal static string PyRepr(string s)
    {
        var quote = s.Contains('\'', StringComparison.Ordinal) && !s.Contains('"', StringComparison.Ordinal) ? '"' : '\'';
        var sb = new StringBuilder().Append(quote);
        foreach (var c in s)
        {
            sb.Append(c switch
            {
                '\\' => "\\\\",
                '\n' => "\\n",
                '\r' => "\\r",
                '\t' => "\\t",
                _ when c == quote => "\\" + c,
                _ => c.ToString(),
            });
        }
        return sb.Append(quote).ToString();
    }
}
