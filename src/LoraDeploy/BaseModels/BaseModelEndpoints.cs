using LoraDeploy.Lora;
using Microsoft.AspNetCore.Http.HttpResults;

namespace LoraDeploy.BaseModels;

public static class BaseModelEndpoints
{
    public static IEndpointRouteBuilder MapBaseModels(this IEndpointRouteBuilder app)
    {
        app.MapGet("/v1/base-models", ListBaseModels)
            .WithTags("LoRA")
            .WithSummary("Base models a LoRA can be deployed on")
            .AllowAnonymous();
        return app;
    }

    internal static Ok<List<BaseModelOut>> ListBaseModels(BaseModelRegistry registry) =>
        TypedResults.Ok(registry.Names
            .Select(registry.Find)
            .OfType<BaseModelEntry>()
            .Select(entry => new BaseModelOut(entry.Name, entry.Family, ArchitectureFamilies.Display(entry.Family), entry.Engine))
            .ToList());
}
