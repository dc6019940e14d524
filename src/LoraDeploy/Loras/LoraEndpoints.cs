using LoraDeploy.Audit;
using LoraDeploy.Auth;
using LoraDeploy.Data;
using LoraDeploy.OpenApi;
using LoraDeploy.Deploys;
using LoraDeploy.Validation;
using Microsoft.AspNetCore.Http.HttpResults;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Loras;

public static class LoraEndpoints
{
    public static IServiceCollection AddLoraApi(this IServiceCollection services)
    {
        services.AddOptions<PricingOptions>().BindConfiguration(PricingOptions.Section).ValidateDataAnnotations().ValidateOnStart();
        return services;
    }

    public static IEndpointRouteBuilder MapLoras(this IEndpointRouteBuilder app)
    {
        var lora = app.MapGroup("/v1").WithTags("LoRA").RequireAuthorization();

        lora.MapPost("/lora/create", CreateLora.HandleAsync)
            .WithName("CreateLora")
            .WithSummary("Create a LoRA from a CivitAI URL (JSON) or an uploaded .safetensors (multipart: json part, then file part) and deploy it")
            .WithRequestBody<CreateLoraApiRequest>(new OpenApi.MultipartUpload(UploadLora.JsonPart, UploadLora.FilePart,
                "An upload: the json part is the create body with \"source\": {\"type\": \"upload\"}, the file part the .safetensors (up to Import:MaxFileBytes)."))
            .Produces<DeploymentOut>()
            .Produces<DeepError>(StatusCodes.Status409Conflict)
            .Produces<DeepError>(StatusCodes.Status413PayloadTooLarge)
            .Produces<HTTPValidationError>(StatusCodes.Status422UnprocessableEntity)
            .Audited(AuditLog.Actions.Create, "lora", bodyKey: "lora_name");
        lora.MapGet("/lora/{lora_name}", GetLora).WithSummary("Your LoRA");
        lora.MapGet("/lora/{owner}/{lora_name}", GetLoraByModelName)
            .WithSummary("A LoRA by model name: yours, or anyone's public one");
        lora.MapGet("/lora/civitai/by-hash/{sha256}", CivitaiLookup.HandleAsync)
            .WithSummary("The CivitAI version a file with this SHA-256 belongs to, and the civit_url that deploys it")
            .Produces<CivitaiLookupOut>()
            .Produces<DeepError>(StatusCodes.Status404NotFound)
            .Produces<DeepError>(StatusCodes.Status502BadGateway)
            .Produces<HTTPValidationError>(StatusCodes.Status422UnprocessableEntity);
        lora.MapGet("/lora/{lora_name}/status", GetLoraStatus).WithSummary("Your LoRA's deploy status");
        lora.MapPatch("/lora/{lora_name}", UpdateLora)
            .WithRequestBody<UpdateLoraApiRequest>()
            .Produces<HTTPValidationError>(StatusCodes.Status422UnprocessableEntity)
            .WithSummary("Change privacy or description")
            .Audited(AuditLog.Actions.Settings, "lora", "lora_name", bodyFields: true);
        lora.MapDelete("/lora/{lora_name}", DeleteLora).WithSummary("Delete your LoRA and its deploy")
            .Audited(AuditLog.Actions.Delete, "lora", "lora_name");
        lora.MapGet("/user/loras", ListUserLoras).WithSummary("Your LoRAs");
        lora.MapGet("/model/{org}/{name}/loras", (string org, string name,
                    [System.ComponentModel.Description(Paging.LimitDescription)] string? limit,
                    [System.ComponentModel.Description(Paging.AfterDescription)] string? after,
                    HttpContext http, LoraDeployDbContext db, CancellationToken ct) =>
                ListBaseModelLoras($"{org}/{name}", limit, after, http, db, ct))
            .WithSummary("Your and public LoRAs on a base model");
        lora.MapGet("/model/{model_name}/loras", ListBaseModelLoras).ExcludeFromDescription();

        app.MapGet("/models/lora/list", ListPublicModels)
            .WithTags("LoRA")
            .WithSummary("Public LoRAs")
            .AllowAnonymous();
        return app;
    }

    private static IQueryable<LoraRow> Own(LoraDeployDbContext db, CurrentUser user, string name) =>
        LoraRow.Query(db).Where(r => r.Lora.UserId == user.Id && r.Lora.Name == name && !r.Lora.Deleted);

    internal static async Task<Results<Ok<LoraOut>, NotFound<DeepError>>> GetLora(
        string lora_name, HttpContext http, LoraDeployDbContext db, CancellationToken ct)
    {
        var row = await Own(db, CurrentUser.From(http.User), lora_name).FirstOrDefaultAsync(ct);
        return row is null
            ? LoraNotFound(lora_name)
            : TypedResults.Ok(row.ToOut());
    }

    internal static async Task<Results<Ok<LoraOut>, NotFound<DeepError>>> GetLoraByModelName(
        string owner, string lora_name, HttpContext http, LoraDeployDbContext db, CancellationToken ct)
    {
        var user = CurrentUser.From(http.User);
        var row = await LoraRow.Query(db)
            .Where(r => r.OwnerName == owner && r.Lora.Name == lora_name && !r.Lora.Deleted
                && (r.Lora.UserId == user.Id || !r.Lora.Private))
            .FirstOrDefaultAsync(ct);
        return row is null
            ? LoraNotFound($"{owner}/{lora_name}")
            : TypedResults.Ok(row.ToOut());
    }

    internal static async Task<Results<Ok<LoraStatusOut>, NotFound<DeepError>>> GetLoraStatus(
        string lora_name, HttpContext http, LoraDeployDbContext db, CancellationToken ct)
    {
        var row = await Own(db, CurrentUser.From(http.User), lora_name).FirstOrDefaultAsync(ct);
        return row is null
            ? LoraNotFound(lora_name)
            : TypedResults.Ok(row.ToStatus());
    }

    internal static async Task<IResult> UpdateLora(
        string lora_name, HttpContext http, LoraDeployDbContext db, TimeProvider time, CancellationToken ct)
    {
        var user = CurrentUser.From(http.User);
        var (body, error) = await RequestBody.ReadObjectAsync(http.Request, ct);
        if (body is not { } json)
        {
            return error!;
        }
        var errors = new ValidationErrors();
        var isPrivate = errors.Bool(json, "private", ["body", "private"], required: false, nullable: true);
        var description = errors.String(json, "description", ["body", "description"], required: false, nullable: true);
        if (errors.Any)
        {
            return errors.ToResult();
        }

        var now = time.GetUtcNow().UtcDateTime;
        var updated = await db.Loras
            .Where(l => l.UserId == user.Id && l.Name == lora_name && !l.Deleted)
            .ExecuteUpdateAsync(set => set
                .SetProperty(l => l.Private, l => isPrivate ?? l.Private)
                .SetProperty(l => l.Description, l => description ?? l.Description)
                .SetProperty(l => l.UpdatedAt, now), ct);
        if (updated == 0)
        {
            return LoraNotFound(lora_name);
        }
        var row = await Own(db, user, lora_name).FirstAsync(ct);
        return TypedResults.Ok(row.ToOut());
    }

    internal static async Task<Results<Ok<LoraDeleteOut>, NotFound<DeepError>>> DeleteLora(
        string lora_name, HttpContext http, LoraDeployDbContext db, TimeProvider time, CancellationToken ct)
    {
        var user = CurrentUser.From(http.User);
        var deployId = await db.Deploys
            .Where(d => d.Lora!.UserId == user.Id && d.Lora.Name == lora_name && !d.Lora.Deleted)
            .Select(d => d.Id)
            .FirstOrDefaultAsync(ct);
        if (deployId is null)
        {
            return LoraNotFound(lora_name);
        }
        await DeployEndpoints.MarkDeletedAsync(db, deployId, time.GetUtcNow().UtcDateTime, ct);
        return TypedResults.Ok(new LoraDeleteOut(lora_name, deployId));
    }

    internal static async Task<Results<Ok<List<LoraOut>>, JsonHttpResult<HTTPValidationError>>> ListUserLoras(
        [System.ComponentModel.Description(Paging.LimitDescription)] string? limit,
        [System.ComponentModel.Description(Paging.AfterDescription)] string? after,
        HttpContext http, LoraDeployDbContext db, CancellationToken ct)
    {
        var user = CurrentUser.From(http.User);
        return await ListAsync(LoraRow.Query(db).Where(r => r.Lora.UserId == user.Id && !r.Lora.Deleted), limit, after, http, ct);
    }

    internal static async Task<Results<Ok<List<LoraOut>>, JsonHttpResult<HTTPValidationError>>> ListBaseModelLoras(
        string model_name,
        [System.ComponentModel.Description(Paging.LimitDescription)] string? limit,
        [System.ComponentModel.Description(Paging.AfterDescription)] string? after,
        HttpContext http, LoraDeployDbContext db, CancellationToken ct)
    {
        var user = CurrentUser.From(http.User);
        var baseModel = Uri.UnescapeDataString(model_name); // routing leaves an escaped '/' (%2F) as it came
        return await ListAsync(
            LoraRow.Query(db).Where(r => r.Lora.BaseModel == baseModel && !r.Lora.Deleted && (r.Lora.UserId == user.Id || !r.Lora.Private)),
            limit, after, http, ct);
    }

    /// <summary>LoRAs newest first: all of them, or one page when <c>limit</c>/<c>after</c> ask for it (<see cref="Paging"/>).</summary>
    private static async Task<Results<Ok<List<LoraOut>>, JsonHttpResult<HTTPValidationError>>> ListAsync(
        IQueryable<LoraRow> rows, string? limit, string? after, HttpContext http, CancellationToken ct)
    {
        var errors = new ValidationErrors();
        var page = Paging.Read(limit, after, errors, numericIds: true);
        if (errors.Any)
        {
            return errors.ToResult();
        }
        if (page?.AfterCreatedAt is { } createdAt && long.TryParse(page.AfterId, System.Globalization.CultureInfo.InvariantCulture, out var afterId))
        {
            rows = rows.Where(r => r.Lora.CreatedAt < createdAt || (r.Lora.CreatedAt == createdAt && r.Lora.Id < afterId));
        }
        var ordered = rows.OrderByDescending(r => r.Lora.CreatedAt).ThenByDescending(r => r.Lora.Id);
        var found = await (page is null ? ordered : ordered.Take(page.Limit + 1)).ToListAsync(ct);
        if (page is not null)
        {
            Paging.LinkNext(http, page, found.Count, () => Paging.Cursor(found[page.Limit - 1].Lora.CreatedAt, found[page.Limit - 1].Lora.Id));
            found = found.Take(page.Limit).ToList();
        }
        return TypedResults.Ok(found.Select(r => r.ToOut()).ToList());
    }

    internal static async Task<Results<Ok<List<ModelOut>>, JsonHttpResult<HTTPValidationError>>> ListPublicModels(
        [System.ComponentModel.Description(Paging.LimitDescription)] string? limit,
        [System.ComponentModel.Description(Paging.AfterDescription)] string? after,
        HttpContext http, LoraDeployDbContext db, IOptions<PricingOptions> pricing, CancellationToken ct)
    {
        var errors = new ValidationErrors();
        var page = Paging.Read(limit, after, errors, numericIds: true);
        if (errors.Any)
        {
            return errors.ToResult();
        }
        var loras = db.Loras.Where(l => !l.Private && !l.Deleted);
        if (page?.AfterCreatedAt is { } createdAt && long.TryParse(page.AfterId, System.Globalization.CultureInfo.InvariantCulture, out var afterId))
        {
            loras = loras.Where(l => l.CreatedAt < createdAt || (l.CreatedAt == createdAt && l.Id < afterId));
        }
        var ordered = loras.OrderByDescending(l => l.CreatedAt).ThenByDescending(l => l.Id)
            .Select(l => new { Owner = l.User!.Name, l.Name, l.Description, l.BaseModel, l.CreatedAt, l.Id });
        var rows = await (page is null ? ordered : ordered.Take(page.Limit + 1)).ToListAsync(ct);
        if (page is not null)
        {
            Paging.LinkNext(http, page, rows.Count, () => Paging.Cursor(rows[page.Limit - 1].CreatedAt, rows[page.Limit - 1].Id));
            rows = rows.Take(page.Limit).ToList();
        }
        var price = pricing.Value;
        var unit = new ModelPricingImageUnits(price.CentsPerImageUnit, price.DefaultWidth, price.DefaultHeight, price.DefaultIterations, UsageFromCost: false);
        return TypedResults.Ok(
            rows.Select(r => new ModelOut($"{r.Owner}/{r.Name}", "text-to-image", "text-to-image", r.Description, "", ["lora", r.BaseModel], unit)).ToList());
    }

    private static NotFound<DeepError> LoraNotFound(string name) => ApiErrors.NotFound($"LoRA '{name}' not found.");
}

/// <summary>Settings section <c>Pricing</c>: what <c>/models/lora/list</c> reports (DeepInfra's image-unit pricing).</summary>
public sealed class PricingOptions
{
    public const string Section = "Pricing";

    [System.ComponentModel.DataAnnotations.Range(0, double.MaxValue)]
    public double CentsPerImageUnit { get; set; }

    public int DefaultWidth { get; set; } = 1024;
    public int DefaultHeight { get; set; } = 1024;
    public int DefaultIterations { get; set; } = 28;
}
