namespace LoraDeploy.Inference;

/// <summary>
/// Inference errors in the caller's dialect, for the gateway and the engines alike: DeepInfra's <c>{"error": "…"}</c>
/// on native routes, OpenAI's <c>{"error":{"message","type","param","code"}}</c> on OpenAI routes.
/// </summary>
public static class InferenceErrors
{
    public static Task WriteAsync(HttpResponse response, bool openAi, int status, string message, string? param, bool rateLimited = false)
    {
        response.StatusCode = status;
        if (!openAi)
        {
            return response.WriteAsJsonAsync(new DeepError(message), ApiJson.Context.DeepError);
        }
        var type = status switch
        {
            StatusCodes.Status404NotFound => "not_found_error",
            StatusCodes.Status429TooManyRequests => "rate_limit_error",
            StatusCodes.Status400BadRequest or StatusCodes.Status413PayloadTooLarge or StatusCodes.Status422UnprocessableEntity
                or StatusCodes.Status423Locked => "invalid_request_error",
            _ => "server_error",
        };
        var code = rateLimited ? "rate_limit_exceeded" : status == StatusCodes.Status404NotFound ? "model_not_found" : null;
        return response.WriteAsJsonAsync(new OpenAiErrorBody(new OpenAiError(message, type, param, code)), InferenceJsonContext.Default.OpenAiErrorBody);
    }
}
