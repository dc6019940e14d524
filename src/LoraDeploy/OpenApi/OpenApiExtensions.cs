using Microsoft.AspNetCore.OpenApi;
using Microsoft.OpenApi;
using Scalar.AspNetCore;

namespace LoraDeploy.OpenApi;

public static class OpenApiExtensions
{
    private static readonly List<string> TagOrder = ["LoRA", "Deploy", "Inference", "Export", "Tokens", "Quotas", "Rate limits", "Audit", "Workers", "Health"];

    public static IServiceCollection AddApiDocumentation(this IServiceCollection services)
    {
        services.AddOpenApi(options =>
        {
            options.AddDocumentTransformer((document, _, _) =>
            {
                document.Info = new OpenApiInfo
                {
                    Title = "LoraDeploy",
                    Version = "v1",
                    Description = "DeepInfra-compatible LoRA deploy API. Authenticate with `Authorization: Bearer TOKEN` or `xi-api-key: TOKEN`.",
                };
                // Tags in reading order (the reference shows them so): what a user does first, operators' routes last.
                // Left alone, they follow the endpoints' data sources, which puts rate limits and workers first.
                if (document.Tags is { Count: > 1 } tags)
                {
                    document.Tags = new HashSet<OpenApiTag>(tags.OrderBy(t => TagOrder.IndexOf(t.Name ?? "") is var i and >= 0 ? i : TagOrder.Count));
                }
                document.Components ??= new OpenApiComponents();
                document.Components.SecuritySchemes ??= new Dictionary<string, IOpenApiSecurityScheme>();
                document.Components.SecuritySchemes["HTTPBearer"] = new OpenApiSecurityScheme
                {
                    Type = SecuritySchemeType.Http,
                    Scheme = "bearer",
                };
                return Task.CompletedTask;
            });
            options.AddOperationTransformer(async (operation, context, ct) =>
            {
                var body = context.Description.ActionDescriptor.EndpointMetadata.OfType<RequestBodyMetadata>().FirstOrDefault();
                if (body is not null)
                {
                    var schema = await context.GetOrCreateSchemaAsync(body.Type, null, ct);
                    context.Document!.AddComponent(body.Type.Name, schema);
                    var content = new Dictionary<string, OpenApiMediaType>
                    {
                        ["application/json"] = new() { Schema = new OpenApiSchemaReference(body.Type.Name, context.Document) },
                    };
                    if (body.Upload is { } upload)
                    {
                        content["multipart/form-data"] = UploadForm(upload);
                    }
                    operation.RequestBody = new OpenApiRequestBody { Required = true, Content = content };
                }
                var requiresAuth = context.Description.ActionDescriptor.EndpointMetadata
                    .OfType<Microsoft.AspNetCore.Authorization.IAuthorizeData>().Any()
                    && !context.Description.ActionDescriptor.EndpointMetadata.OfType<Microsoft.AspNetCore.Authorization.IAllowAnonymous>().Any();
                if (requiresAuth)
                {
                    operation.Security = [new OpenApiSecurityRequirement { [new OpenApiSecuritySchemeReference("HTTPBearer", context.Document)] = [] }];
                    operation.Responses ??= new OpenApiResponses();
                    operation.Responses["401"] = new OpenApiResponse
                    {
                        Description = "Missing or bad token",
                        Content = new Dictionary<string, OpenApiMediaType>
                        {
                            ["application/json"] = new() { Schema = await context.GetOrCreateSchemaAsync(typeof(DeepError), null, ct) },
                        },
                    };
                }
            });
        });
        return services;
    }

    /// <summary>A form of two parts in this order: the JSON body (sent as <c>application/json</c>), then the file.</summary>
    private static OpenApiMediaType UploadForm(MultipartUpload upload) => new()
    {
        Schema = new OpenApiSchema
        {
            Type = JsonSchemaType.Object,
            Description = upload.Description,
            Required = new HashSet<string> { upload.JsonPart, upload.FilePart },
            Properties = new Dictionary<string, IOpenApiSchema>
            {
                [upload.JsonPart] = new OpenApiSchema { Type = JsonSchemaType.String, Description = "The create body as JSON; comes first." },
                [upload.FilePart] = new OpenApiSchema { Type = JsonSchemaType.String, Format = "binary", Description = "The .safetensors file; comes last." },
            },
        },
        Encoding = new Dictionary<string, OpenApiEncoding> { [upload.JsonPart] = new() { ContentType = "application/json" } },
    };

    /// <summary>
    /// <c>/openapi/v1.json</c> and the Scalar reference at <c>/docs</c>. A self-hosted, possibly air-gapped server's
    /// page makes no request off the machine: Scalar's fonts from its CDN, the AI chat, MCP, telemetry, the developer
    /// toolbar ("Generate SDK", "Deploy"), the client button and the "Powered by Scalar" link are all off, and a CSP
    /// holds the page to its own origin.
    /// </summary>
    public static IEndpointRouteBuilder MapApiDocumentation(this IEndpointRouteBuilder app)
    {
        app.MapOpenApi().AllowAnonymous();
        app.MapScalarApiReference("/docs", options => options
            .WithTitle("LoraDeploy API")
            .WithOpenApiRoutePattern("/openapi/{documentName}.json")
            .DisableDefaultFonts()
            .DisableAgent()
            .DisableMcp()
            .DisableTelemetry()
            .HideDeveloperTools()
            .HideClientButton()
            .WithCustomCss("a[href^='https://scalar.com/'] { display: none; }") // "Powered by Scalar", a link off the machine
            .WithNonce())
            .AllowAnonymous()
            .Add(endpoint => endpoint.RequestDelegate = WithContentSecurityPolicy(endpoint.RequestDelegate!));
        return app;
    }

    /// <summary>
    /// Only this origin, plus the per-request nonce Scalar puts on its inline start-up script and the inline styles its
    /// components set; nothing may frame the page.
    /// </summary>
    private static RequestDelegate WithContentSecurityPolicy(RequestDelegate inner) => context =>
    {
        context.Response.OnStarting(() =>
        {
            var script = context.Items[ScalarOptions.NonceHttpContextItemKey] is string nonce ? $"'self' 'nonce-{nonce}'" : "'self'";
            context.Response.Headers.ContentSecurityPolicy =
                $"default-src 'self'; script-src {script}; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; " +
                "font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; object-src 'none'; base-uri 'self'; " +
                "form-action 'self'; frame-ancestors 'none'";
            return Task.CompletedTask;
        });
        return inner(context);
    };
}
