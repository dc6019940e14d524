using System.Text.Json;
using LoraDeploy.Workers;

namespace LoraDeploy.Inference;

/// <summary>A request parameter the gateway refuses before any worker sees it: 422 naming the parameter.</summary>
public sealed record InvalidParameter(string Param, string Message);

/// <summary>
/// The gateway's checks of inference bodies: the shape and the ranges that no engine could honour (absurd sizes, step
/// counts, token counts, scales). The engines check what only they know (context length, chat template).
/// </summary>
public static class InferenceValidation
{
    public const int MaxTokens = 32_768;
    public const int MaxPromptChars = 200_000;
    public const int MaxImageSide = 2048;
    public const int MaxSteps = 150;
    public const int MaxImages = 4;

    public static InvalidParameter? Check(string operation, string engine, JsonElement body)
    {
        return operation switch
        {
            Operations.ChatCompletions => Chat(body) ?? Sampling(body) ?? Extras(body),
            Operations.Completions => Completion(body) ?? Sampling(body) ?? Extras(body),
            Operations.ImagesGenerations => Image(body, openAi: true) ?? Extras(body),
            _ => engine == BaseModels.Engines.ComfyUi
                ? Image(body, openAi: false) ?? Extras(body)
                : NativeText(body) ?? Sampling(body) ?? Extras(body),
        };
    }

    private static InvalidParameter? Chat(JsonElement body)
    {
        if (!body.TryGetProperty("messages", out var messages) || messages.ValueKind != JsonValueKind.Array || messages.GetArrayLength() == 0)
        {
            return new("messages", "messages must be a non-empty list of {role, content} objects.");
        }
        var i = 0;
        foreach (var message in messages.EnumerateArray())
        {
            if (message.ValueKind != JsonValueKind.Object
                || !message.TryGetProperty("role", out var role) || role.GetString() is not ("system" or "user" or "assistant" or "developer" or "tool"))
            {
                return new($"messages[{i}].role", "role must be system, user, assistant, developer or tool.");
            }
            if (!message.TryGetProperty("content", out var content) || (content.ValueKind != JsonValueKind.String && content.ValueKind != JsonValueKind.Array))
            {
                return new($"messages[{i}].content", "content must be a string (or a list of text parts).");
            }
            i++;
        }
        return Int(body, "max_tokens", 1, MaxTokens) ?? Int(body, "max_completion_tokens", 1, MaxTokens)
            ?? Int(body, "top_logprobs", 0, 20) ?? Bool(body, "logprobs");
    }

    private static InvalidParameter? Completion(JsonElement body)
    {
        if (!body.TryGetProperty("prompt", out var prompt))
        {
            return new("prompt", "prompt is required: a string or a list of token ids.");
        }
        switch (prompt.ValueKind)
        {
            case JsonValueKind.String when prompt.GetString()!.Length <= MaxPromptChars:
                break;
            case JsonValueKind.Array when prompt.GetArrayLength() is > 0 and <= MaxTokens
                && prompt.EnumerateArray().All(t => t.ValueKind == JsonValueKind.Number && t.TryGetInt32(out var id) && id >= 0):
                break;
            case JsonValueKind.Array when prompt.GetArrayLength() == 1 && prompt[0].ValueKind == JsonValueKind.String:
                break;
            default:
                return new("prompt", $"prompt must be a string of at most {MaxPromptChars} characters or a list of 1 to {MaxTokens} token ids (non-negative integers).");
        }
        return Int(body, "max_tokens", 1, MaxTokens) ?? Int(body, "logprobs", 0, 20) ?? Bool(body, "echo");
    }

    private static InvalidParameter? NativeText(JsonElement body)
    {
        if (!body.TryGetProperty("input", out var input) || input.ValueKind != JsonValueKind.String || input.GetString()!.Length > MaxPromptChars)
        {
            return new("input", $"input is required: the text to continue (at most {MaxPromptChars} characters).");
        }
        return Int(body, "max_new_tokens", 1, MaxTokens);
    }

    private static InvalidParameter? Sampling(JsonElement body) =>
        Number(body, "temperature", 0, 2) ?? Number(body, "top_p", 0, 1, exclusiveMin: true) ?? Int(body, "top_k", 0, 1000)
        ?? Int(body, "n", 1, 1, "only n = 1 is served") ?? Int(body, "seed", long.MinValue, long.MaxValue) ?? Bool(body, "stream")
        ?? Number(body, "repetition_penalty", 0.01, 10) ?? Stop(body);

    /// <summary>DeepInfra's text-to-image <c>width</c>/<c>height</c> values.</summary>
    public static readonly IReadOnlyList<int> DeepInfraSides = [128, 256, 384, 448, 512, 576, 640, 704, 768, 832, 896, 960, 1024];

    private static InvalidParameter? Image(JsonElement body, bool openAi)
    {
        if (!body.TryGetProperty("prompt", out var prompt) || prompt.ValueKind != JsonValueKind.String || prompt.GetString()!.Length is 0 or > 10_000)
        {
            return new("prompt", "prompt is required: a non-empty string of at most 10000 characters.");
        }
        if (body.TryGetProperty("negative_prompt", out var negative) && negative.ValueKind is not (JsonValueKind.String or JsonValueKind.Null))
        {
            return new("negative_prompt", "negative_prompt must be a string.");
        }
        if (body.TryGetProperty("image", out var image) && image.ValueKind != JsonValueKind.Null)
        {
            return new("image", "image-to-image is not served: only text-to-image (leave image and strength out).");
        }
        if (openAi)
        {
            if (body.TryGetProperty("size", out var size) && size.ValueKind != JsonValueKind.Null
                && (size.ValueKind != JsonValueKind.String || !TryParseSize(size.GetString()!, out _, out _)))
            {
                return new("size", $"size must be WIDTHxHEIGHT, each a multiple of 8 from 64 to {MaxImageSide} (e.g. 1024x1024).");
            }
            if (body.TryGetProperty("response_format", out var format) && format.ValueKind != JsonValueKind.Null && format.GetString() != "b64_json")
            {
                return new("response_format", "response_format must be b64_json: images are returned inline, never as URLs.");
            }
            return Int(body, "n", 1, MaxImages) ?? Int(body, "seed", 0, long.MaxValue);
        }
        return DeepInfraSide(body, "width") ?? DeepInfraSide(body, "height") ?? Int(body, "num_inference_steps", 1, MaxSteps)
            ?? Number(body, "guidance_scale", 0, 30) ?? Int(body, "num_images", 1, MaxImages)
            ?? Int(body, "seed", 0, long.MaxValue) ?? Bool(body, "stream");
    }

    private static InvalidParameter? DeepInfraSide(JsonElement body, string name) =>
        body.TryGetProperty(name, out var v) && v.ValueKind != JsonValueKind.Null && !(v.TryGetInt32(out var side) && DeepInfraSides.Contains(side))
            ? new(name, $"{name} must be one of {string.Join(", ", DeepInfraSides)}.")
            : null;

    /// <summary>Our extensions, valid on every route.</summary>
    private static InvalidParameter? Extras(JsonElement body)
    {
        if (body.TryGetProperty("lora_scale", out var scale)
            && (scale.ValueKind != JsonValueKind.Number || !scale.TryGetSingle(out var s) || !InferenceTargets.ValidScale(s)))
        {
            return new("lora_scale", $"lora_scale must be a number from -{InferenceTargets.MaxScale} to {InferenceTargets.MaxScale}.");
        }
        return null;
    }

    public static bool TryParseSize(string size, out int width, out int height)
    {
        width = height = 0;
        var parts = size.Split('x');
        return parts.Length == 2 && int.TryParse(parts[0], out width) && int.TryParse(parts[1], out height) && ValidSide(width) && ValidSide(height);
    }

    private static bool ValidSide(long side) => side is >= 64 and <= MaxImageSide && side % 8 == 0;

    private static InvalidParameter? Stop(JsonElement body)
    {
        if (!body.TryGetProperty("stop", out var stop) || stop.ValueKind == JsonValueKind.Null || (stop.ValueKind == JsonValueKind.String && stop.GetString()!.Length is > 0 and <= 200))
        {
            return null;
        }
        return stop.ValueKind == JsonValueKind.Array && stop.GetArrayLength() <= 16
            && stop.EnumerateArray().All(s => s.ValueKind == JsonValueKind.String && s.GetString()!.Length is > 0 and <= 200)
            ? null
            : new("stop", "stop must be a non-empty string or a list of at most 16 of them (each at most 200 characters).");
    }

    private static InvalidParameter? Int(JsonElement body, string name, long min, long max, string? why = null) =>
        body.TryGetProperty(name, out var v) && v.ValueKind != JsonValueKind.Null && !(v.TryGetInt64(out var n) && n >= min && n <= max)
            ? new(name, why is null ? $"{name} must be an integer from {min} to {max}." : $"{name}: {why}.")
            : null;

    private static InvalidParameter? Number(JsonElement body, string name, double min, double max, bool exclusiveMin = false) =>
        body.TryGetProperty(name, out var v) && v.ValueKind != JsonValueKind.Null
        && !(v.TryGetDouble(out var x) && double.IsFinite(x) && (exclusiveMin ? x > min : x >= min) && x <= max)
            ? new(name, $"{name} must be a number {(exclusiveMin ? "above" : "from")} {min} {(exclusiveMin ? "up " : "")}to {max}.")
            : null;

    private static InvalidParameter? Bool(JsonElement body, string name) =>
        body.TryGetProperty(name, out var v) && v.ValueKind is not (JsonValueKind.True or JsonValueKind.False or JsonValueKind.Null)
            ? new(name, $"{name} must be true or false.")
            : null;
}
