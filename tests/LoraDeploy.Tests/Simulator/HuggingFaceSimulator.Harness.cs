using System.Collections.Concurrent;
using LoraDeploy.Sources;
using LoraDeploy.Storage;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace LoraDeploy.Tests.Simulator;

/// <summary>The real AddSources() wiring pointed at a <see cref="HuggingFaceSimulator"/>, fast retries, every log line captured.</summary>
internal sealed class HuggingFaceHarness : IAsyncDisposable
{
    private readonly ServiceProvider _services;

    public HuggingFaceHarness(HuggingFaceSimulator sim, Dictionary<string, string?>? extra = null)
    {
        var settings = new Dictionary<string, string?>
        {
            ["HuggingFace:BaseUrl"] = sim.HubBaseUrl,
            ["Network:AllowedPrivateRanges:0"] = sim.AllowedRange,
            ["Import:RetryBaseDelay"] = "00:00:00.010",
            ["Import:RetryMaxDelay"] = "00:00:03",
            ["Import:MaxRetryAttempts"] = "3",
            ["Import:AttemptTimeout"] = "00:00:10",
            ["Import:ReadIdleTimeout"] = "00:00:10",
        };
        foreach (var (k, v) in extra ?? [])
        {
            settings[k] = v;
        }
        var configuration = new ConfigurationBuilder().AddInMemoryCollection(settings).Build();
        var services = new ServiceCollection();
        services.AddLogging(b => b.SetMinimumLevel(LogLevel.Trace).AddProvider(Logs));
        services.AddSources(configuration);
        _services = services.BuildServiceProvider(new ServiceProviderOptions { ValidateOnBuild = true, ValidateScopes = true });
        StoreDir = Directory.CreateTempSubdirectory("loradeploy-hf-").FullName;
        Blobs = new FileSystemBlobStore(StoreDir);
        HubBase = new Uri(sim.HubBaseUrl + "/");
    }

    public CapturedLogs Logs { get; } = new();
    public string StoreDir { get; }
    public FileSystemBlobStore Blobs { get; }
    public Uri HubBase { get; }
    public string StagingName => "hf.part";
    public string StagingPath() => Path.Combine(StoreDir, "staging", StagingName);

    public HuggingFaceClient Client => _services.GetRequiredService<HuggingFaceClient>();
    public HuggingFaceDownloader Downloader => _services.GetRequiredService<HuggingFaceDownloader>();

    public async Task<HuggingFaceResolveResult> ResolveAsync(string input, string? token = null)
    {
        Assert.True(HuggingFaceRepoRef.TryParse(input, HubBase, out var repo, out var error), error);
        return await Client.ResolveAsync(repo, token, TestContext.Current.CancellationToken);
    }

    public async Task<ResolvedHuggingFaceAdapter> ResolveOkAsync(string input, string? token = null)
    {
        var result = await ResolveAsync(input, token);
        Assert.True(result.Succeeded, $"{result.ReasonClass}: {result.FailReason}");
        return result.Adapter;
    }

    public Task<DownloadResult> DownloadAsync(ResolvedHuggingFaceAdapter adapter, string? token = null, IProgress<long>? progress = null, CancellationToken? ct = null) =>
        Downloader.DownloadAsync(adapter.Weights, token, Blobs, StagingName, progress, ct ?? TestContext.Current.CancellationToken);

    public async ValueTask DisposeAsync()
    {
        await _services.DisposeAsync();
        try
        {
            Directory.Delete(StoreDir, recursive: true);
        }
        catch (IOException)
        {
            // Temp folder; leftovers are harmless.
        }
    }
}

/// <summary>Every log line of every category and level, with its template values and exception, as text.</summary>
internal sealed class CapturedLogs : ILoggerProvider
{
    private readonly ConcurrentQueue<string> _lines = new();

    public IReadOnlyList<string> Lines => _lines.ToArray();

    public ILogger CreateLogger(string categoryName) => new Logger(this, categoryName);

    public void Dispose()
    {
    }

    private sealed class Logger(CapturedLogs owner, string category) : ILogger
    {
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull
        {
            owner._lines.Enqueue($"{category} scope: {state}");
            return null;
        }

        public bool IsEnabled(LogLevel logLevel) => true;

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            var values = state is IEnumerable<KeyValuePair<string, object?>> pairs ? string.Join(" ", pairs.Select(p => $"{p.Key}={p.Value}")) : "";
            owner._lines.Enqueue($"{logLevel} {category}: {formatter(state, exception)} [{values}] {exception}");
        }
    }
}

internal sealed class CallbackProgress(Action<long> report) : IProgress<long>
{
    public void Report(long value) => report(value);
}
