using System.Net.Http.Headers;
using LoraDeploy.Auth;
using LoraDeploy.Data;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests;

/// <summary>
/// The real host on real HTTP over loopback, on a throwaway data folder (SQLite file + blobs) or a throwaway
/// PostgreSQL database. <see cref="RestartAsync"/> boots a new host on the same data. <c>configure</c> adds to the
/// host what settings cannot (an EF interceptor, say), on every boot.
/// </summary>
public sealed class LoraDeployServer : IAsyncDisposable
{
    private readonly Dictionary<string, string?> _settings;
    private readonly bool _ownsData;
    private readonly Action<WebApplicationBuilder>? _configure;
    private WebApplication? _app;

    private LoraDeployServer(TestDatabase database, string dataDir, Dictionary<string, string?> settings, bool ownsData, Action<WebApplicationBuilder>? configure = null)
    {
        Database = database;
        DataDir = dataDir;
        _settings = settings;
        _ownsData = ownsData;
        _configure = configure;
    }

    public TestDatabase Database { get; }
    public string DataDir { get; }
    public Uri BaseUrl { get; private set; } = null!;
    public IServiceProvider Services => _app!.Services;
    public IReadOnlyDictionary<string, string?> Settings => _settings;

    public static async Task<LoraDeployServer> StartAsync(
        TestDatabase database = TestDatabase.Sqlite,
        IDictionary<string, string?>? settings = null,
        Action<WebApplicationBuilder>? configure = null)
    {
        var dataDir = Path.Combine(Path.GetTempPath(), "loradeploy-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dataDir);
        var all = new Dictionary<string, string?>(StringComparer.OrdinalIgnoreCase)
        {
            [DataDirectory.Key] = dataDir,
            ["Logging:LogLevel:Default"] = "Warning",
            // Tests that poll or load the API would trip the default 600 a minute; the rate-limit tests set their own.
            ["RateLimits:RequestsPerMinute"] = "1000000",
        };
        if (database == TestDatabase.Postgres)
        {
            all["Database:Provider"] = "postgres";
            all["ConnectionStrings:Postgres"] = await TestBackend.CreatePostgresDatabaseAsync();
        }
        foreach (var (key, value) in settings ?? new Dictionary<string, string?>())
        {
            all[key] = value;
        }
        var server = new LoraDeployServer(database, dataDir, all, ownsData: true, configure);
        await server.BootAsync();
        return server;
    }

    private async Task BootAsync()
    {
        _app = ServerApp.Build(["--urls", "http://127.0.0.1:0"], builder =>
        {
            builder.Configuration.AddInMemoryCollection(_settings);
            builder.Logging.ClearProviders();
            _configure?.Invoke(builder);
        });
        await _app.Services.GetRequiredService<DatabaseMigrator>().MigrateAsync(CancellationToken.None);
        await _app.StartAsync();
        var address = _app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First();
        BaseUrl = new Uri(address);
    }

    /// <summary>Changes a setting for the next <see cref="RestartAsync"/>, as an operator edits the configuration and restarts.</summary>
    public void ChangeSetting(string key, string? value) => _settings[key] = value;

    /// <summary>Stops the host and boots a new one on the same database and data folder.</summary>
    public async Task RestartAsync()
    {
        await StopAppAsync();
        await BootAsync();
    }

    /// <summary>Creates a user (if new) and returns a fresh API token for it.</summary>
    public async Task<string> CreateTokenAsync(string userName)
    {
        await using var scope = Services.CreateAsyncScope();
        var db = scope.ServiceProvider.GetRequiredService<LoraDeployDbContext>();
        return await ApiTokens.CreateForUserAsync(db, userName, isAdmin: false, "test", DateTime.UtcNow, CancellationToken.None);
    }

    /// <summary>A new user with a unique name, and a client that authenticates as it.</summary>
    public async Task<TestUser> CreateUserAsync(string prefix = "user")
    {
        var name = $"{prefix}-{Guid.NewGuid().ToString("N")[..8]}";
        var token = await CreateTokenAsync(name);
        return new TestUser(name, token, CreateClient(token));
    }

    public HttpClient CreateClient(string? token = null)
    {
        var client = new HttpClient { BaseAddress = BaseUrl };
        if (token is not null)
        {
            client.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", token);
        }
        return client;
    }

    /// <summary>Runs a query against the server's own database.</summary>
    public async Task<T> QueryAsync<T>(Func<LoraDeployDbContext, Task<T>> query)
    {
        await using var db = await Services.GetRequiredService<IDbContextFactory<LoraDeployDbContext>>().CreateDbContextAsync();
        return await query(db);
    }

    private async Task StopAppAsync()
    {
        if (_app is not null)
        {
            await _app.StopAsync();
            await _app.DisposeAsync();
            _app = null;
        }
    }

    public async ValueTask DisposeAsync()
    {
        await StopAppAsync();
        if (!_ownsData)
        {
            return;
        }
        if (Database == TestDatabase.Postgres && _settings["ConnectionStrings:Postgres"] is { } connection)
        {
            await TestBackend.DropPostgresDatabaseAsync(connection);
        }
        Microsoft.Data.Sqlite.SqliteConnection.ClearAllPools();
        try
        {
            Directory.Delete(DataDir, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}

public sealed record TestUser(string Name, string Token, HttpClient Client);

public static class TokenParts
{
    /// <summary>
    /// The secret of an <c>ld_{12-char id}_{43-char secret}</c> token. Not "after the last '_'": the secret is
    /// base64url and may itself contain '_', which left a one- or two-character tail that tests then found everywhere.
    /// </summary>
    public static string Secret(string token) => token[("ld_".Length + 12 + 1)..];
}
