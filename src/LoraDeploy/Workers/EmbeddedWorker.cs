using LoraDeploy.Auth;
using LoraDeploy.BaseModels;
using LoraDeploy.Data;
using LoraDeploy.Workers.Host;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Workers;

/// <summary>
/// <c>Workers:Embedded</c> (default on): once the server listens, it runs a worker in-process for the pools configured
/// on its host whose engine this build has — the same worker app as <c>loradeploy worker</c>, with its own worker token
/// (issued anew at each start), talking HTTP to the server's own address. So <c>serve</c> alone is the whole product on
/// one machine. A worker that cannot start (a missing GGUF, say) is logged; the server keeps serving everything else.
/// </summary>
public sealed class EmbeddedWorker(
    IServer server,
    IDbContextFactory<LoraDeployDbContext> contexts,
    BaseModelRegistry registry,
    IOptions<WorkersOptions> options,
    IConfiguration configuration,
    ILoggerFactory loggers,
    TimeProvider time,
    ILogger<EmbeddedWorker> logger) : IHostedLifecycleService, IAsyncDisposable
{
    private WebApplication? _worker;
    private List<IServingEngine> _engines = [];

    /// <summary>The in-process worker's app, once started (tests read its address).</summary>
    public WebApplication? App => _worker;

    public async Task StartedAsync(CancellationToken cancellationToken)
    {
        if (!options.Value.Embedded || !registry.Pools.Any())
        {
            return;
        }
        var address = server.Features.Get<IServerAddressesFeature>()?.Addresses.FirstOrDefault();
        if (address is null)
        {
            logger.LogWarning("Workers:Embedded is on but the server's address is unknown; no in-process worker started");
            return;
        }
        var serverUrl = Loopback(address);
        var name = $"embedded-{new string(Environment.MachineName.Where(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '.').Take(40).ToArray())}-{new Uri(serverUrl).Port}";
        string token;
        await using (var db = await contexts.CreateDbContextAsync(cancellationToken))
        {
            token = await WorkerTokens.CreateAsync(db, name, time.GetUtcNow().UtcDateTime, cancellationToken);
        }
        // The worker sees the server's pools and worker settings; its own address, server and token come last and win.
        var settings = configuration.GetSection(BaseModelOptions.Section).AsEnumerable()
            .Concat(configuration.GetSection(WorkerOptions.Section).AsEnumerable())
            .Where(kv => kv.Value is not null)
            .ToDictionary(kv => kv.Key, kv => kv.Value);
        settings[DataDirectory.Key] = DataDirectory.Get(configuration);
        settings[$"{WorkerOptions.Section}:Server"] = serverUrl;
        settings[$"{WorkerOptions.Section}:Token"] = token;
        settings.TryAdd($"{WorkerOptions.Section}:Id", name);
        settings["urls"] = "http://127.0.0.1:0";
        _engines = WorkerHost.CreateEngines(registry.Pools.Select(p => p.Engine!), loggers);
        try
        {
            _worker = WorkerHost.Build([], _engines, builder => builder.Configuration.AddInMemoryCollection(settings));
            await _worker.StartAsync(cancellationToken);
            // The agent starts the engine once Kestrel listens: a base model that fails to load shows up here, not above.
            _ = _worker.Services.GetRequiredService<WorkerAgent>().ExecuteTask?.ContinueWith(
                failed => logger.LogError(failed.Exception?.GetBaseException(), "The in-process worker stopped; its pools are served only by remote workers now"),
                CancellationToken.None, TaskContinuationOptions.OnlyOnFaulted, TaskScheduler.Default);
            logger.LogInformation("In-process worker {Name} serving {Pools} at {Url}", name,
                string.Join(", ", registry.Pools.Select(p => p.Name)), _worker.Urls.FirstOrDefault());
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            logger.LogError(e, "The in-process worker could not start; the server runs without it (Workers:Embedded=false silences this)");
            await DisposeAsync();
        }
    }

    public async Task StoppingAsync(CancellationToken cancellationToken)
    {
        if (_worker is not null)
        {
            await _worker.StopAsync(cancellationToken);
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (_worker is not null)
        {
            await _worker.DisposeAsync();
            _worker = null;
        }
        foreach (var engine in _engines)
        {
            await WorkerHost.DisposeEngineAsync(engine);
        }
        _engines = [];
    }

    /// <summary>A listen address the worker can call: wildcard hosts become loopback.</summary>
    private static string Loopback(string address)
    {
        var uri = new Uri(address.Replace("://+", "://localhost").Replace("://*", "://localhost"));
        var host = uri.Host is "0.0.0.0" or "[::]" or "::" or "localhost" ? "127.0.0.1" : uri.Host;
        return $"{uri.Scheme}://{host}:{uri.Port}";
    }

    public Task StartingAsync(CancellationToken cancellationToken) => Task.CompletedTask;
    public Task StartAsync(CancellationToken cancellationToken) => Task.CompletedTask;
    public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;
    public Task StoppedAsync(CancellationToken cancellationToken) => Task.CompletedTask;
}
