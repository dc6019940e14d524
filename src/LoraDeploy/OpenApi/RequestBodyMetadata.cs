namespace LoraDeploy.OpenApi;

/// <summary>
/// Documents a JSON request body that the handler reads itself (to answer FastAPI-style 422s). Unlike
/// <c>Accepts&lt;T&gt;</c> it does not make routing refuse other content types with a 415. With
/// <see cref="Upload"/>, the same route also takes <c>multipart/form-data</c>: that body as a JSON part, then a file part.
/// </summary>
public sealed record RequestBodyMetadata(Type Type, MultipartUpload? Upload = null);

/// <summary>The part names of a multipart form carrying a JSON body (<see cref="JsonPart"/>) and a file (<see cref="FilePart"/>).</summary>
public sealed record MultipartUpload(string JsonPart, string FilePart, string Description);

public static class RequestBodyMetadataExtensions
{
    public static RouteHandlerBuilder WithRequestBody<T>(this RouteHandlerBuilder builder, MultipartUpload? upload = null) =>
        builder.WithMetadata(new RequestBodyMetadata(typeof(T), upload));
}
