using System.Text.Json;
using Microsoft.AspNetCore.Http.HttpResults;

namespace LoraDeploy.Validation;

/// <summary>
/// Reads a JSON request body the way FastAPI does: a malformed body or a field of the wrong type is a 422
/// <c>{"detail":[{loc,msg,type}]}</c> naming the field, never a 400 or a stack trace.
/// </summary>
public static class RequestBody
{
    /// <summary>Requests larger than this are refused with 413.</summary>
    public const int MaxBytes = 64 * 1024;

    /// <summary>The body as a JSON object, or the 413/422 to answer instead.</summary>
    public static Task<(JsonElement? Body, IResult? Error)> ReadObjectAsync(HttpRequest request, CancellationToken ct) =>
        ReadObjectAsync(request.Body, request.ContentLength, ct);

    /// <summary>A JSON object read from <paramref name="body"/> (a request, or one part of a multipart form), or the 413/422 to answer instead.</summary>
    public static async Task<(JsonElement? Body, IResult? Error)> ReadObjectAsync(Stream body, long? announcedLength, CancellationToken ct)
    {
        if (announcedLength > MaxBytes)
        {
            return (null, TooLarge());
        }
        byte[] buffer;
        try
        {
            using var memory = new MemoryStream();
            var chunk = new byte[8192];
            int read;
            while ((read = await body.ReadAsync(chunk, ct)) > 0)
            {
                if (memory.Length + read > MaxBytes)
                {
                    return (null, TooLarge());
                }
                memory.Write(chunk, 0, read);
            }
            buffer = memory.ToArray();
        }
        catch (BadHttpRequestException e) when (e.StatusCode == StatusCodes.Status413PayloadTooLarge)
        {
            return (null, TooLarge());
        }

        try
        {
            using var document = JsonDocument.Parse(buffer, new JsonDocumentOptions { MaxDepth = 32 });
            if (document.RootElement.ValueKind != JsonValueKind.Object)
            {
                var errors = new ValidationErrors();
                errors.Add(["body"], "Input should be a valid dictionary or object to extract fields from", "model_attributes_type");
                return (null, errors.ToResult());
            }
            return (document.RootElement.Clone(), null);
        }
        catch (JsonException e)
        {
            var errors = new ValidationErrors();
            errors.Add(["body", (int)(e.BytePositionInLine ?? 0)], "JSON decode error", "json_invalid");
            return (null, errors.ToResult());
        }
    }

    private static JsonHttpResult<DeepError> TooLarge() =>
        ApiErrors.Error(StatusCodes.Status413PayloadTooLarge, $"Request body is larger than {MaxBytes} bytes.");
}

/// <summary>Collects FastAPI-style validation errors.</summary>
public sealed class ValidationErrors
{
    private readonly List<ValidationError> _errors = [];

    public bool Any => _errors.Count > 0;

    public void Add(object[] loc, string msg, string type) => _errors.Add(new ValidationError(loc, msg, type));

    public void Missing(params object[] loc) => Add(loc, "Field required", "missing");

    public JsonHttpResult<HTTPValidationError> ToResult() =>
        TypedResults.Json(new HTTPValidationError(_errors), ApiJson.Context.HTTPValidationError,
            statusCode: StatusCodes.Status422UnprocessableEntity);

    /// <summary>Reads a required or optional string; records missing / wrong-type errors.</summary>
    public string? String(JsonElement parent, string name, object[] loc, bool required, bool nullable = false)
    {
        if (!parent.TryGetProperty(name, out var value))
        {
            if (required)
            {
                Missing(loc);
            }
            return null;
        }
        if (value.ValueKind == JsonValueKind.String)
        {
            return Text(value, loc);
        }
        if (value.ValueKind == JsonValueKind.Null && nullable)
        {
            return null;
        }
        Add(loc, "Input should be a valid string", "string_type");
        return null;
    }

    /// <summary>
    /// A JSON string as text a database and a terminal can hold: invalid UTF-8, a lone surrogate (<c>"\ud800"</c>)
    /// or a NUL is the caller's mistake, answered as a 422 naming the field (System.Text.Json would throw, a 500).
    /// </summary>
    private string? Text(JsonElement value, object[] loc)
    {
        string text;
        try
        {
            text = value.GetString()!;
        }
        catch (InvalidOperationException)
        {
            Add(loc, "Input should be a valid string, unable to parse raw data as a unicode string (invalid UTF-8 or a lone surrogate)",
                "string_unicode");
            return null;
        }
        if (text.Contains('\0', StringComparison.Ordinal))
        {
            Add(loc, "Input should be a valid string without NUL characters (\\u0000)", "string_unicode");
            return null;
        }
        return text;
    }

    public bool? Bool(JsonElement parent, string name, object[] loc, bool required, bool nullable = false)
    {
        if (!parent.TryGetProperty(name, out var value))
        {
            if (required)
            {
                Missing(loc);
            }
            return null;
        }
        switch (value.ValueKind)
        {
            case JsonValueKind.True:
                return true;
            case JsonValueKind.False:
                return false;
            case JsonValueKind.Null when nullable:
                return null;
            default:
                Add(loc, "Input should be a valid boolean", "bool_type");
                return null;
        }
    }

    public int? Int(JsonElement parent, string name, object[] loc, bool required)
    {
        if (!parent.TryGetProperty(name, out var value))
        {
            if (required)
            {
                Missing(loc);
            }
            return null;
        }
        if (value.ValueKind == JsonValueKind.Number && value.TryGetInt32(out var number))
        {
            return number;
        }
        Add(loc, "Input should be a valid integer", "int_type");
        return null;
    }

    /// <summary>Reads a nested object; records missing / wrong-type errors.</summary>
    public JsonElement? Object(JsonElement parent, string name, object[] loc, bool required)
    {
        if (!parent.TryGetProperty(name, out var value))
        {
            if (required)
            {
                Missing(loc);
            }
            return null;
        }
        if (value.ValueKind == JsonValueKind.Object)
        {
            return value;
        }
        Add(loc, "Input should be a valid dictionary or object to extract fields from", "model_attributes_type");
        return null;
    }
}
