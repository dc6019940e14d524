using LoraDeploy.Sources;
using LoraDeploy.Storage;
using LoraDeploy.Tests.Simulator;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;

namespace LoraDeploy.Tests.Sources;

/// <summary>Builds the real AddSources() wiring against a simulator, with fast retry delays.</summary>
internal sealed class SourcesHarness : IAsyncDisposable
{
    private readonly ServiceProvider _services;

    public SourcesHarness(CivitaiSimulator sim, string? token = null, string[]? allowedRanges = null, Dictionary<string, string?>? extra = null)
    {
        var settings = new Dictionary<string, string?>
        {
            ["Civitai:BaseUrl"] = sim.ApiBaseUrl,
            ["Civitai:Token"] = token,
            ["Import:RetryBaseDelay"] = "00:00:00.010",
            ["Import:RetryMaxDelay"] = "00:00:03",
            ["Import:MaxRetryAttempts"] = "3",
            ["Import:AttemptTimeout"] = "00:00:10",
            ["Import:ReadIdleTimeout"] = "00:00:10",
        };
        var ranges = allowedRanges ?? [sim.AllowedRange];
        for (var i = 0; i < ranges.Length; i++)
        {
            settings[$"Network:AllowedPrivateRanges:{i}"] = ranges[i];
        }
        foreach (var (k, v) in extra ?? [])
        {
            settings[k] = v;
        }
        var configuration = new ConfigurationBuilder().AddInMemoryCollection(settings).Build();
        var services = new ServiceCollection();
        services.AddLogging();
        services.AddSources(configuration);
        _services = services.BuildServiceProvider(new ServiceProviderOptions { ValidateOnBuild = true, ValidateScopes = true });
        StoreDir = Directory.CreateTempSubdirectory("loradeploy-sources-").FullName;
        Blobs = new FileSystemBlobStore(StoreDir);
    }

    /// <summary>The root of <see cref="Blobs"/>, a real blob store the downloader stages into.</summary>
    public string StoreDir { get; }

    public FileSystemBlobStore Blobs { get; }

    public string StagingName => "file.part";

    /// <summary>Where the store keeps <see cref="StagingName"/>, for tests that plant or inspect the bytes.</summary>
    public string StagingPath() => Path.Combine(StoreDir, "staging", StagingName);

    public CivitaiClient Client => _services.GetRequiredService<CivitaiClient>();

    public CivitaiDownloader Downloader => _services.GetRequiredService<CivitaiDownloader>();

    public T Get<T>() where T : notnull => _services.GetRequiredService<T>();

    public async Task<CivitaiResolveResult> ResolveAsync(string url)
    {
        Assert.True(CivitaiUrl.TryParse(url, out var reference, out var error), error);
        return await Client.ResolveAsync(reference, TestContext.Current.CancellationToken);
    }

    public async Task<ResolvedCivitaiFile> ResolveOkAsync(string url)
    {
        var result = await ResolveAsync(url);
        Assert.True(result.Succeeded, $"{result.ReasonClass}: {result.FailReason}");
        return result.File;
    }

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
