using System.Net;
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Net.Sockets;
using System.Text.Json;
using LoraDeploy.Auth;
using LoraDeploy.BaseModels;
using LoraDeploy.Data;
using LoraDeploy.Serving;
using LoraDeploy.Workers.Host;
using LoraDeploy.Tests.Simulator;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.ServingBench;

/// <summary>
/// A server (<see cref="ServerApp"/>, SQLite, a temp data folder) and workers (<see cref="WorkerHost"/> with the real
/// llama.cpp engine) in this process, on loopback HTTP, the way the tests boot them. Logs at Warning unless
/// SERVINGBENCH_VERBOSE=1.
/// </summary>
public sealed class Harness : IAsyncDisposable
{
    public const string Pool = "sim/tiny-llama";

    private readonly List<(WebApplication App, IServingEngine Engine)> _workers = [];
    private readonly Dictionary<string, string?> _poolSettings;

    private Harness(string dir, WebApplication server, Uri baseUrl, Dictionary<string, string?> poolSettings, HuggingFaceSimulator? hub)
    {
        Dir = dir;
        Server = server;
        BaseUrl = baseUrl;
        _poolSettings = poolSettings;
        Hub = hub;
    }

    public string Dir { get; }
    public WebApplication Server { get; }
    public Uri BaseUrl { get; }
    public HuggingFaceSimulator? Hub { get; }

    public static bool Verbose => Environment.GetEnvironmentVariable("SERVINGBENCH_VERBOSE") == "1";

    /// <summary>Pool settings every server and worker of a run share: the base GGUF and the engine's defaults.</summary>
    public static Dictionary<string, string?> LlamaPool(string gguf, int maxAdaptersPerWorker = 8) => new()
    {
        [$"BaseModels:{Pool}:Family"] = "llama",
        [$"BaseModels:{Pool}:Engine"] = "llamacpp",
        [$"BaseModels:{Pool}:Gguf"] = gguf,
        [$"BaseModels:{Pool}:MaxAdaptersPerWorker"] = maxAdaptersPerWorker.ToString(System.Globalization.CultureInfo.InvariantCulture),
        [$"BaseModels:{Pool}:Defaults:context_size"] = "256",
        [$"BaseModels:{Pool}:Defaults:threads"] = "1",
        [$"BaseModels:{Pool}:Defaults:slots"] = "2",
    };

    /// <param name="withHub">Start the Hugging Face simulator too (for <c>POST /lora-model</c> imports).</param>
    public static async Task<Harness> StartAsync(Dictionary<string, string?> poolSettings, IDictionary<string, string?> serverSettings, bool withHub)
    {
        var dir = Path.Combine(BenchPaths.Scratch, "run-" + Guid.NewGuid().ToString("N")[..8]);
        Directory.CreateDirectory(dir);
        HuggingFaceSimulator? hub = null;
        var settings = new Dictionary<string, string?>(poolSettings, StringComparer.OrdinalIgnoreCase)
        {
            [DataDirectory.Key] = Path.Combine(dir, "server"),
            ["Logging:LogLevel:Default"] = Verbose ? "Information" : "Warning",
            ["Workers:Embedded"] = "false",
            // The placement bench polls deploys far above the default 600 a minute; the limiter has its own bench.
            ["RateLimits:Enabled"] = "false",
        };
        if (withHub)
        {
            hub = await HuggingFaceSimulator.StartAsync();
            settings["HuggingFace:BaseUrl"] = hub.HubBaseUrl;
            settings["Network:AllowedPrivateRanges:0"] = hub.AllowedRange;
        }
        foreach (var (key, value) in serverSettings)
        {
            settings[key] = value;
        }
        var server = ServerApp.Build(["--urls", $"http://127.0.0.1:{FreePort()}"], builder =>
        {
            builder.Configuration.AddInMemoryCollection(settings);
            if (!Verbose)
            {
                builder.Logging.ClearProviders();
                builder.Logging.AddSimpleConsole().SetMinimumLevel(LogLevel.Warning);
            }
        });
        await server.Services.GetRequiredService<DatabaseMigrator>().MigrateAsync(CancellationToken.None);
        await server.StartAsync();
        return new Harness(dir, server, new Uri(server.Urls.First()), poolSettings, hub);
    }

    private static int FreePort()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }

    public async Task<T> QueryAsync<T>(Func<LoraDeployDbContext, Task<T>> query)
    {
        await using var db = await Server.Services.GetRequiredService<IDbContextFactory<LoraDeployDbContext>>().CreateDbContextAsync();
        return await query(db);
    }

    /// <summary>A user and a client authenticated as it (one connection pool of up to <paramref name="connections"/>).</summary>
    public async Task<(string Name, HttpClient Client)> CreateUserAsync(string name, int connections = 64)
    {
        var token = await QueryAsync(db => ApiTokens.CreateForUserAsync(db, name, isAdmin: false, "bench", DateTime.UtcNow, CancellationToken.None));
        var client = new HttpClient(LoadHandler(connections)) { BaseAddress = BaseUrl, Timeout = TimeSpan.FromSeconds(120) };
        client.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", token);
        return (name, client);
    }

    public static SocketsHttpHandler LoadHandler(int connections) => new()
    {
        MaxConnectionsPerServer = connections,
        UseProxy = false,
        UseCookies = false,
        PooledConnectionLifetime = Timeout.InfiniteTimeSpan,
    };

    /// <summary>
    /// Starts a worker app (the same <see cref="WorkerHost.Build"/> <c>loradeploy worker</c> and the embedded worker
    /// use) registered with this server, and waits until the server sees it.
    /// </summary>
    /// <param name="engine">The engine (default: llama.cpp); disposed with the harness.</param>
    public async Task<WorkerHandle> StartWorkerAsync(string id, int slots = 4, bool retryWhileUnloading = false, IServingEngine? engine = null)
    {
        var token = await QueryAsync(db => WorkerTokens.CreateAsync(db, id, DateTime.UtcNow, CancellationToken.None));
        var settings = new Dictionary<string, string?>(_poolSettings, StringComparer.OrdinalIgnoreCase)
        {
            [DataDirectory.Key] = Path.Combine(Dir, id),
            [$"{WorkerOptions.Section}:Server"] = BaseUrl.ToString().TrimEnd('/'),
            [$"{WorkerOptions.Section}:Token"] = token,
            [$"{WorkerOptions.Section}:Id"] = id,
            [$"{WorkerOptions.Section}:Slots"] = slots.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["urls"] = "http://127.0.0.1:0",
            ["Logging:LogLevel:Default"] = Verbose ? "Information" : "Warning",
            // Pinned adapters beyond MaxAdaptersPerWorker are the affinity run's point, not news.
            ["Logging:LogLevel:LoraDeploy.Workers.Host.AdapterResidency"] = Verbose ? "Information" : "Error",
        };
        engine ??= new LlamaCppServingEngine();
        var counting = new CountingEngine(engine, retryWhileUnloading);
        var app = WorkerHost.Build([], [counting], builder => builder.Configuration.AddInMemoryCollection(settings));
        await app.StartAsync();
        _workers.Add((app, engine));
        var runtime = app.Services.GetRequiredService<WorkerRuntime>();
        var deadline = DateTime.UtcNow.AddSeconds(60);
        while (!runtime.Ready || !await QueryAsync(db => db.Workers.AnyAsync(w => w.Id == id)))
        {
            if (DateTime.UtcNow > deadline)
            {
                throw new TimeoutException($"worker {id} never became ready and registered");
            }
            await Task.Delay(50);
        }
        return new WorkerHandle(id, app.Urls.First(), runtime.CallKey, counting);
    }

    /// <summary>
    /// Starts <c>loradeploy worker</c> as its own process pinned to <paramref name="cpu"/> (<c>taskset -c</c>), registered
    /// with this server; waits until the server sees it and returns its URL and call key (read from its worker row).
    /// </summary>
    public async Task<(System.Diagnostics.Process Process, string Url, string CallKey)> StartWorkerProcessAsync(string id, int slots, int cpu)
    {
        var token = await QueryAsync(db => WorkerTokens.CreateAsync(db, id, DateTime.UtcNow, CancellationToken.None));
        var dataDir = Path.Combine(Dir, id);
        Directory.CreateDirectory(dataDir);
        var start = new System.Diagnostics.ProcessStartInfo("taskset") { UseShellExecute = false, WorkingDirectory = dataDir };
        string[] command = ["-c", cpu.ToString(System.Globalization.CultureInfo.InvariantCulture), "dotnet",
            Path.Combine(AppContext.BaseDirectory, "loradeploy.dll"), "worker", "--server", BaseUrl.ToString().TrimEnd('/'), "--token", token,
            "--urls", $"http://127.0.0.1:{FreePort()}", "--data-dir", dataDir];
        foreach (var arg in command)
        {
            start.ArgumentList.Add(arg);
        }
        var settings = new Dictionary<string, string?>(_poolSettings, StringComparer.OrdinalIgnoreCase)
        {
            [$"{WorkerOptions.Section}:Id"] = id,
            [$"{WorkerOptions.Section}:Slots"] = slots.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["Logging:LogLevel:Default"] = Verbose ? "Information" : "Warning",
        };
        foreach (var (key, value) in settings)
        {
            start.ArgumentList.Add($"--{key}={value}");
        }
        start.Environment["DOTNET_NOLOGO"] = "1";
        var process = System.Diagnostics.Process.Start(start) ?? throw new InvalidOperationException("taskset did not start");
        var deadline = DateTime.UtcNow.AddSeconds(60);
        while (true)
        {
            var row = await QueryAsync(db => db.Workers.Where(w => w.Id == id).Select(w => new { w.Url, w.CallKey }).FirstOrDefaultAsync());
            if (row is not null)
            {
                return (process, row.Url, row.CallKey);
            }
            if (process.HasExited || DateTime.UtcNow > deadline)
            {
                throw new TimeoutException($"worker process {id} never registered (exited: {process.HasExited})");
            }
            await Task.Delay(50);
        }
    }

    /// <summary><c>POST /lora-model</c> of a simulated Hub repo; returns the deploy id.</summary>
    public static async Task<string> CreateLoraModelAsync(HttpClient user, string repo, string name)
    {
        using var response = await user.PostAsJsonAsync("/lora-model", new { hf_model_name = repo, lora_model_name = name, base_model_name = Pool });
        var body = await response.Content.ReadAsStringAsync();
        if (response.StatusCode != HttpStatusCode.OK)
        {
            throw new InvalidOperationException($"POST /lora-model {repo} → {(int)response.StatusCode}: {body}");
        }
        return JsonDocument.Parse(body).RootElement.GetProperty("deploy_id").GetString()!;
    }

    /// <summary>Polls <c>GET /deploy/{id}</c> every <paramref name="poll"/> until <c>running</c> (throws on <c>failed</c>).</summary>
    public static async Task WaitRunningAsync(HttpClient user, string deployId, TimeSpan poll, TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (true)
        {
            var deploy = JsonDocument.Parse(await user.GetStringAsync($"/deploy/{deployId}")).RootElement;
            var status = deploy.GetProperty("status").GetString();
            if (status == "running")
            {
                return;
            }
            if (status == "failed" || DateTime.UtcNow > deadline)
            {
                throw new InvalidOperationException($"deploy {deployId} never ran: {deploy}");
            }
            await Task.Delay(poll);
        }
    }

    public async ValueTask DisposeAsync()
    {
        foreach (var (app, engine) in _workers)
        {
            await app.StopAsync();
            await app.DisposeAsync();
            await WorkerHost.DisposeEngineAsync(engine);
        }
        await Server.StopAsync();
        await Server.DisposeAsync();
        if (Hub is not null)
        {
            await Hub.DisposeAsync();
        }
        Microsoft.Data.Sqlite.SqliteConnection.ClearAllPools();
        try
        {
            Directory.Delete(Dir, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}

/// <param name="CallKey">What the server presents to this worker (read from its <see cref="WorkerRuntime"/>).</param>
public sealed record WorkerHandle(string Id, string Url, string CallKey, CountingEngine Engine);

/// <summary>The worker's engine with a count of the adapter loads and unloads it was asked for (the worker-side truth).</summary>
/// <param name="retryWhileUnloading">
/// Works around what the affinity run found (see docs/benchmarks.md): a load of an adapter whose eviction is still
/// unloading it is refused by the engine ("is being unloaded") and the worker then marks the adapter failed for good.
/// With this on, such a load waits for the unload and tries again, as a fix in the worker would.
/// </param>
public sealed class CountingEngine(IServingEngine inner, bool retryWhileUnloading = false) : IServingEngine
{
    private int _loads;
    private int _unloads;
    private int _retried;

    public int Loads => Volatile.Read(ref _loads);
    public int Unloads => Volatile.Read(ref _unloads);
    /// <summary>Loads refused as "being unloaded" and retried (only with retryWhileUnloading).</summary>
    public int Retried => Volatile.Read(ref _retried);

    public string Engine => inner.Engine;

    public Task StartAsync(IReadOnlyList<BaseModelEntry> pools, CancellationToken ct) => inner.StartAsync(pools, ct);

    public async Task<AdapterLoadResult> LoadAdapterAsync(string pool, string sha256, string path, CancellationToken ct)
    {
        Interlocked.Increment(ref _loads);
        var result = await inner.LoadAdapterAsync(pool, sha256, path, ct);
        for (var attempt = 0; retryWhileUnloading && attempt < 200 && result.Reason?.Contains("is being unloaded", StringComparison.Ordinal) == true; attempt++)
        {
            Interlocked.Increment(ref _retried);
            await Task.Delay(5, ct);
            result = await inner.LoadAdapterAsync(pool, sha256, path, ct);
        }
        return result;
    }

    public Task UnloadAdapterAsync(string pool, string sha256)
    {
        Interlocked.Increment(ref _unloads);
        return inner.UnloadAdapterAsync(pool, sha256);
    }

    public Task HandleAsync(InferenceCall call, HttpContext http, CancellationToken ct) => inner.HandleAsync(call, http, ct);
}

public static class BenchPaths
{
    /// <summary>Scratch files (models, adapters, data folders): SERVINGBENCH_DIR or /tmp/bench-helper.</summary>
    public static string Scratch { get; } = Environment.GetEnvironmentVariable("SERVINGBENCH_DIR") is { Length: > 0 } dir
        ? dir
        : Path.Combine(Path.GetTempPath(), "bench-helper");
}
