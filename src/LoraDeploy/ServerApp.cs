using LoraDeploy.Audit;
using LoraDeploy.Auth;
using LoraDeploy.BaseModels;
using LoraDeploy.Data;
using LoraDeploy.Deploys;
using LoraDeploy.Exports;
using LoraDeploy.Health;
using LoraDeploy.Inference;
using LoraDeploy.Loras;
using LoraDeploy.Observability;
using LoraDeploy.OpenApi;
using LoraDeploy.Pipeline;
using LoraDeploy.Quotas;
using LoraDeploy.RateLimits;
using LoraDeploy.Sources;
using LoraDeploy.Storage;
using LoraDeploy.Workers;
using Microsoft.Extensions.DependencyInjection.Extensions;

namespace LoraDeploy;

/// <summary>The server: what it is made of, in order. Details live in each feature's AddXxx/MapXxx.</summary>
public static class ServerApp
{
    public static WebApplication Build(string[] args, Action<WebApplicationBuilder>? configure = null)
    {
        var builder = WebApplication.CreateBuilder(new WebApplicationOptions
        {
            Args = args,
            ContentRootPath = AppContext.BaseDirectory,
            WebRootPath = Path.Combine(AppContext.BaseDirectory, "wwwroot"),
        });
        // First, so settings a host adds (tests, tools) are seen by every registration below.
        configure?.Invoke(builder);
        builder.WebHost.ConfigureKestrel(kestrel => kestrel.Limits.MaxRequestBodySize = 1024 * 1024);
        // TryAdd: a test host may bring its own clock (to step over a rate-limit window, say).
        builder.Services.TryAddSingleton(TimeProvider.System);
        builder.Services.AddApiJson();

        builder.Services.AddDatabase(builder.Configuration);
        builder.Services.AddHealth();
        builder.Services.AddTokenAuth();
        builder.Services.AddRateLimits();
        builder.Services.AddBaseModels();
        builder.Services.AddLoraApi();
        builder.Services.AddDeployApi();
        builder.Services.AddBlobStorage(builder.Configuration);
        builder.Services.AddSources(builder.Configuration);
        builder.Services.AddImportPipeline();
        builder.Services.AddExports();
        builder.Services.AddAuditLog();
        builder.Services.AddQuotas();
        builder.Services.AddWorkerApi();
        builder.Services.AddInferenceGateway();
        builder.Services.AddInferenceWebhooks(builder.Configuration);
        builder.Services.AddApiDocumentation();
        builder.AddObservability();

        var app = builder.Build();
        app.UseDeepErrors();
        app.UseRouting();
        app.UseDefaultFiles();
        app.UseStaticFiles(DashboardHeaders.StaticFiles());
        app.UseAuthentication();
        app.UseAuthorization();
        app.UseRateLimiter();

        app.MapHealth();
        app.MapMetrics();
        app.MapApiDocumentation();
        // The management routes: everything an API token calls that is not inference, under one per-user budget.
        // Health, metrics, docs, the worker protocol and inference (which has its per-pool limit) stay outside.
        var management = app.MapGroup("").RequireRateLimiting(ManagementRateLimitPolicy.Name);
        management.MapBaseModels();
        management.MapLoras();
        management.MapLoraModels();
        management.MapDeploys();
        management.MapExports();
        management.MapTokens();
        management.MapAudit();
        management.MapQuotas();
        app.MapRateLimits();
        app.MapWorkerApi();
        app.MapInference();
        return app;
    }

    /// <summary>Migrates, creates the first admin, then serves until stopped.</summary>
    public static async Task RunAsync(WebApplication app, CancellationToken ct)
    {
        await app.Services.GetRequiredService<DatabaseMigrator>().MigrateAsync(ct);
        await app.BootstrapAdminAsync(ct);
        await app.StartAsync(ct);
        foreach (var address in app.Urls)
        {
            Console.Out.WriteLine($"LoraDeploy is listening on {address} (dashboard: {address}/, API reference: {address}/docs)");
        }
        await app.WaitForShutdownAsync(ct);
    }
}
