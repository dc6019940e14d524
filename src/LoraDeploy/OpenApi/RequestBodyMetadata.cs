namespace LoraDeploy.OpenApi;

/// <summary>
/// Documents a JSON request body that the handler reads itself (to answer FastAPI-style 422s). Unlike
/// <c>Accepts&lt;T&gt;</c> it does not make routing refuse other content types with a 415.
/// </summary>
public sealed record RequestBodyMetadata(Type Type);

public static class RequestBodyMetadataExtensions
{
    public static RouteHandlerBuilder WithRequestBody<T>(this RouteHandlerBuilder builder) =>
        builder.WithMetadata(new RequestBodyMetadata(typeof(T)));
}
