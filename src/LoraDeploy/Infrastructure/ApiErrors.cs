using Microsoft.AspNetCore.Http.HttpResults;

namespace LoraDeploy;

/// <summary>DeepInfra's <c>{"error": …}</c> responses.</summary>
public static class ApiErrors
{
    public static JsonHttpResult<DeepError> Error(int status, string message) =>
        TypedResults.Json(new DeepError(message), ApiJson.Context.DeepError, statusCode: status);

    public static NotFound<DeepError> NotFound(string message) => TypedResults.NotFound(new DeepError(message));

    public static BadRequest<DeepError> BadRequest(string message) => TypedResults.BadRequest(new DeepError(message));

    public static Conflict<DeepError> Conflict(string message) => TypedResults.Conflict(new DeepError(message));
}
