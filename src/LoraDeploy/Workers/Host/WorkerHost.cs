using LoraDeploy.BaseModels;
using Microsoft.Extensions.Http.Resilience;
using Microsoft.Extensions.Options;
using Polly;

namespace LoraDeploy.Workers.Host;

/// <summary>
/// The worker app: a Kestrel app of its own serving <see cref="WorkerEndpoints"/>, with the <see cref="WorkerAgent"/>
/// talking to the server. <c>loradeploy worker</c> runs it as a process; <c>serve</c> can run the same app in-process
/// (pointed at its own URL) for pools configured on its host.
/// </summary>
public static class WorkerHost
{
    /// <summary>Default listen address of <c>loradeploy worker</c> (loopback: a remote server needs <c>--urls http://0.0.0.0:8090</c>).</summary>
    public const string DefaultUrls = "http://127.0.0.1:8090";

    /// <summary>The worker's request bodies come from the server, which has validated them already; this is a backstop.</summary>
    public const long MaxRequestBodyBytes = 16 * 1024 * 1024;

    /// <param name="args">Host arguments: <c>--urls</c>, <c>--DataDir</c>, <c>--Worker:Server</c>, <c>--Worker:Token</c>, any <c>--Section:Key=value</c>.</param>
    /// <param name="engines">The engines this process has; it serves every pool of the registry whose engine is among them.</param>
    /// <param name="configure">Runs first (tests and the embedding server add settings or services).</param>
    public static WebApplication Build(string[] args, IReadOnlyList<IServingEngine> engines, Action<WebApplicationBuilder>? configure = null)
    {
        var builder = WebApplication.CreateBuilder(new WebApplicationOptions { Args = args, ContentRootPath = AppContext.BaseDirectory });
        configure?.Invoke(builder);
        builder.WebHost.ConfigureKestrel(kestrel => kestrel.Limits.MaxRequestBodySize = MaxRequestBodyBytes);
        builder.Logging.AddSimpleConsole(console =>
        {
            console.SingleLine = true;
            console.TimestampFormat = "yyyy-MM-ddTHH:mm:ss.fffZ ";
            console.UseUtcTimestamp = true;
        });
        // Four lines per heartbeat otherwise; failures are logged by the agent, once per outage.
        builder.Logging.AddFilter("System.Net.Http.HttpClient", LogLevel.Warning);
        builder.Services.AddSingleton(TimeProvider.System);
        builder.Services.AddApiJson();
        builder.Services.AddBaseModels();
        builder.Services.AddOptions<WorkerOptions>().BindConfiguration(WorkerOptions.Section).ValidateOnStart();
        builder.Services.AddSingleton<IValidateOptions<WorkerOptions>, WorkerOptions.Validation>();
        builder.Services.AddSingleton<IValidateOptions<WorkerOptions>>(sp => new PoolsValidation(sp.GetRequiredService<BaseModelRegistry>(), engines));

        builder.Services.AddHttpClient(WorkerBlobCache.HttpClientName, (sp, client) =>
        {
            var options = sp.GetRequiredService<IOptions<WorkerOptions>>().Value;
            client.BaseAddress = new Uri(options.Server!.TrimEnd('/') + "/");
            client.DefaultRequestHeaders.Authorization = new("Bearer", options.Token);
            client.DefaultRequestHeaders.UserAgent.Add(new("LoraDeploy-Worker", WorkerAgent.Version.Split('+')[0]));
            client.Timeout = Timeout.InfiniteTimeSpan; // attempts time out in the pipeline; blob bodies may take long
        }).AddResilienceHandler("worker", static pipeline =>
        {
            // One policy for every call to the server: a few quick retries of transient failures (5xx, 408, 429,
            // connection errors, attempt timeouts); longer outages are the agent's backoff, resumes the cache's.
            pipeline.AddRetry(new HttpRetryStrategyOptions
            {
                MaxRetryAttempts = 3,
                BackoffType = DelayBackoffType.Exponential,
                UseJitter = true,
                Delay = TimeSpan.FromMilliseconds(200),
            });
            pipeline.AddTimeout(TimeSpan.FromSeconds(30));
        });

        builder.Services.AddSingleton<WorkerBlobCache>();
        builder.Services.AddSingleton(sp => CreateRuntime(sp, engines));
        builder.Services.AddSingleton<WorkerAgent>();
        builder.Services.AddHostedService(sp => sp.GetRequiredService<WorkerAgent>());

        var app = builder.Build();
        app.MapWorkerEndpoints();
        return app;
    }

    /// <summary>
    /// Starts the worker and runs it until stopped. Throws <see cref="WorkerStoppedException"/> when it stopped because
    /// an engine could not start (its message says why).
    /// </summary>
    public static async Task RunAsync(WebApplication app, CancellationToken ct)
    {
        await app.StartAsync(ct);
        foreach (var address in app.Urls)
        {
            Console.Out.WriteLine($"LoraDeploy worker is listening on {address}");
        }
        await app.WaitForShutdownAsync(ct);
        if (app.Services.GetRequiredService<WorkerAgent>().ExecuteTask is { IsFaulted: true } failed)
        {
            var cause = failed.Exception!.GetBaseException();
            throw new WorkerStoppedException($"the worker stopped: {cause.Message}", cause);
        }
    }

    /// <summary>One engine per kind in <paramref name="kinds"/> that this build has (llama.cpp in-process, ComfyUI over HTTP).</summary>
    public static List<IServingEngine> CreateEngines(IEnumerable<string> kinds, ILoggerFactory loggers)
    {
        var wanted = kinds.ToHashSet(StringComparer.Ordinal);
        var engines = new List<IServingEngine>();
        if (wanted.Contains(Engines.LlamaCpp))
        {
            engines.Add(new Serving.LlamaCppServingEngine(loggers));
        }
        if (wanted.Contains(Engines.ComfyUi))
        {
            engines.Add(new Serving.ComfyUi.ComfyUiServingEngine(loggers));
        }
        return engines;
    }

    public static async ValueTask DisposeEngineAsync(IServingEngine engine)
    {
        switch (engine)
        {
            case IAsyncDisposable asyncDisposable:
                await asyncDisposable.DisposeAsync();
                break;
            case IDisposable disposable:
                disposable.Dispose();
                break;
        }
    }

    private static WorkerRuntime CreateRuntime(IServiceProvider services, IReadOnlyList<IServingEngine> engines)
    {
        var registry = services.GetRequiredService<BaseModelRegistry>();
        var options = services.GetRequiredService<IOptions<WorkerOptions>>().Value;
        var cache = services.GetRequiredService<WorkerBlobCache>();
        var stopping = services.GetRequiredService<IHostApplicationLifetime>().ApplicationStopping;
        var logger = services.GetRequiredService<ILoggerFactory>().CreateLogger<AdapterResidency>();
        var units = new List<WorkerUnit>();
        foreach (var engine in engines)
        {
            var pools = registry.Pools.Where(p => p.Engine == engine.Engine).ToDictionary(p => p.Name, StringComparer.Ordinal);
            if (pools.Count > 0)
            {
                units.Add(new WorkerUnit(engine, pools, new AdapterResidency(engine, pools, cache, logger, stopping), options.Slots));
            }
        }
        return new WorkerRuntime(units);
    }

    /// <summary>A worker with nothing to serve is a configuration mistake: say which settings would give it a pool.</summary>
    private sealed class PoolsValidation(BaseModelRegistry registry, IReadOnlyList<IServingEngine> engines) : IValidateOptions<WorkerOptions>
    {
        public ValidateOptionsResult Validate(string? name, WorkerOptions options)
        {
            var kinds = engines.Select(e => e.Engine).ToList();
            if (kinds.Count != kinds.Distinct(StringComparer.Ordinal).Count())
            {
                return ValidateOptionsResult.Fail($"Two engines of one kind were given ({string.Join(", ", kinds)}).");
            }
            if (registry.Errors.Count > 0 || registry.Pools.Any(p => kinds.Contains(p.Engine!)))
            {
                return ValidateOptionsResult.Success; // registry errors are reported by its own validation
            }
            return ValidateOptionsResult.Fail(
                $"No pool for this worker's engines ({string.Join(", ", kinds)}): configure a base model with " +
                $"BaseModels:{{name}}:Engine={kinds.FirstOrDefault() ?? Engines.LlamaCpp} and what that engine needs.");
        }
    }
}

/// <summary>The worker stopped on its own (an engine failed to start).</summary>
public sealed class WorkerStoppedException(string message, Exception inner) : Exception(message, inner);
