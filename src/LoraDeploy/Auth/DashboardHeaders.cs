using Microsoft.AspNetCore.StaticFiles;

namespace LoraDeploy.Auth;

/// <summary>
/// Headers on the dashboard and every static file: its scripts, styles and images come from this server only (no
/// inline script, so an injected string cannot run), it cannot be framed (clickjacking the delete buttons), and
/// browsers take each file as the type it is sent as. Images may also be <c>data:</c> URLs: the "Try it" panel shows
/// the generated PNG the API answers as one (an image cannot run script).
/// </summary>
public static class DashboardHeaders
{
    public const string ContentSecurityPolicy =
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

    public static StaticFileOptions StaticFiles() => new() { OnPrepareResponse = context => Apply(context.Context.Response) };

    public static void Apply(HttpResponse response)
    {
        response.Headers.ContentSecurityPolicy = ContentSecurityPolicy;
        response.Headers.XFrameOptions = "DENY";
        response.Headers.XContentTypeOptions = "nosniff";
    }
}
