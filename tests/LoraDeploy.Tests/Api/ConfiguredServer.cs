using System.Net.Http.Headers;
using LoraDeploy.Auth;
using LoraDeploy.Data;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Api;

/// <summary>
/// The real host over loopback on a throwaway SQLite folder, with services a test may add (an EF interceptor, say);
/// <see cref="LoraDeployServer"/> takes settings only. The pipeline is off.
/// </summary>
public sealed class ConfiguredServer : IAsyncDisposable
{
    private readonly WebApplication _app;
    private readonly string _dataDir;

    private ConfiguredServer(WebApplication app, string dataDir)
    {
        _app = app;
        _dataDir = dataDir;
    }

    public Uri BaseUrl { get; private set; } = null!;

    public static async Task<ConfiguredServer> StartAsync(Dictionary<string, string?> settings, Action<WebApplicationBuilder>? configure = null)
    {
        var dataDir = Path.Combine(Path.GetTempPath(), "loradeploy-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dataDir);
        settings[DataDirectory.Key] = dataDir;
        settings["Pipeline:Enabled"] = "false";
        var app = ServerApp.Build(["--urls", "http://127.0.0.1:0"], builder =>
        {
            builder.Configuration.AddInMemoryCollection(settings);
            builder.Logging.ClearProviders();
            configure?.Invoke(builder);
        });
        await app.Services.GetRequiredService<DatabaseMigrator>().MigrateAsync(CancellationToken.None);
        await app.StartAsync();
        var server = new ConfiguredServer(app, dataDir)
        {
            BaseUrl = new Uri(app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First()),
        };
        return server;
    }

    public async Task<string> CreateTokenAsync(string userName)
    {
        await using var db = await _app.Services.GetRequiredService<IDbContextFactory<LoraDeployDbContext>>().CreateDbContextAsync();
        return await ApiTokens.CreateForUserAsync(db, userName, isAdmin: false, "test", DateTime.UtcNow, CancellationToken.None);
    }

    public HttpClient CreateClient(string token) => new()
    {
        BaseAddress = BaseUrl,
        DefaultRequestHeaders = { Authorization = new AuthenticationHeaderValue("Bearer", token) },
    };

    public async ValueTask DisposeAsync()
    {
        await _app.StopAsync();
        await _app.DisposeAsync();
        Microsoft.Data.Sqlite.SqliteConnection.ClearAllPools();
        try
        {
            Directory.Delete(_dataDir, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}
