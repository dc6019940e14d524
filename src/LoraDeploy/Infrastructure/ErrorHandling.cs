using Microsoft.AspNetCore.Diagnostics;

namespace LoraDeploy;

/// <summary>Every error the framework itself produces is DeepInfra-shaped: <c>{"error": …}</c>, never a stack trace.</summary>
public static class ErrorHandling
{
    public static WebApplication UseDeepErrors(this WebApplication app)
    {
        app.UseExceptionHandler(error => error.Run(async context =>
        {
            var exception = context.Features.Get<IExceptionHandlerFeature>()?.Error;
            var (status, message) = exception switch
            {
                BadHttpRequestException bad => (bad.StatusCode, bad.StatusCode == StatusCodes.Status413PayloadTooLarge
                    ? "Request body too large." : "Bad request."),
                OperationCanceledException => (499, "Request cancelled."),
                _ => (StatusCodes.Status500InternalServerError, "Internal server error."),
            };
            context.Response.StatusCode = status;
            await context.Response.WriteAsJsonAsync(new DeepError(message), ApiJson.Context.DeepError);
        }));
        app.UseStatusCodePages(async context =>
        {
            var response = context.HttpContext.Response;
            if (response.HasStarted || response.ContentLength > 0 || response.ContentType is not null)
            {
                return;
            }
            var message = response.StatusCode switch
            {
                StatusCodes.Status404NotFound => "Not found",
                StatusCodes.Status405MethodNotAllowed => "Method not allowed",
                StatusCodes.Status415UnsupportedMediaType => "Unsupported media type",
                _ => $"HTTP {response.StatusCode}",
            };
            await response.WriteAsJsonAsync(new DeepError(message), ApiJson.Context.DeepError);
        });
        return app;
    }
}
