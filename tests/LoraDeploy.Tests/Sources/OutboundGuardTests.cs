using System.Net;
using LoraDeploy.Sources;
using LoraDeploy.Tests.Simulator;

namespace LoraDeploy.Tests.Sources;

public class OutboundGuardTests
{
    [Fact]
    public async Task Loopback_civitai_is_refused_before_any_connection_when_no_range_is_allowed()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var v = sim.AddLora(SimContent.Safetensors());
        await using var h = new SourcesHarness(sim, allowedRanges: []);

        var result = await h.ResolveAsync($"https://civitai.com/model-versions/{v.Id}");

        Assert.Equal(ReasonClass.Refused, result.ReasonClass);
        Assert.Contains("refused to connect to 127.0.0.1 (loopback address); Civitai:BaseUrl is contacted only at public addresses or ones listed in Network:AllowedPrivateRanges", result.FailReason);
        Assert.Equal(0, sim.Connections);
        Assert.Empty(sim.Requests);
    }

    [Fact]
    public async Task Redirect_to_another_loopback_address_is_refused_and_never_connected()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        await using var trap = await CivitaiSimulator.StartAsync(new CivitaiSimulatorOptions { ApiAddress = IPAddress.Parse("127.0.0.2") }, TestContext.Current.CancellationToken);
        var v = sim.AddLora(SimContent.Safetensors());
        await using var h = new SourcesHarness(sim, allowedRanges: ["127.0.0.1/32"]);
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");
        v.File.Faults.RedirectTo = new Uri($"{trap.ApiBaseUrl}/latest/meta-data/");

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() =>
            h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, TestContext.Current.CancellationToken));

        Assert.Equal(ReasonClass.Refused, ex.ReasonClass);
        Assert.Contains("redirect to 127.0.0.2 refused: loopback address is not CivitAI", ex.FailReason);
        Assert.DoesNotContain("AllowedPrivateRanges", ex.FailReason); // never advise widening the guard for a redirect
        Assert.Equal(0, trap.Connections);
        Assert.Equal(1, sim.DownloadEndpointHits(v.File.Id) - 1); // refusals are not retried
    }

    [Fact]
    public async Task Redirect_to_a_non_http_scheme_is_refused()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var v = sim.AddLora(SimContent.Safetensors());
        await using var h = new SourcesHarness(sim);
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");
        v.File.Faults.RedirectTo = new Uri("file:///etc/passwd");

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() =>
            h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, TestContext.Current.CancellationToken));

        Assert.Equal(ReasonClass.Refused, ex.ReasonClass);
    }

    [Fact]
    public async Task Token_never_reaches_the_storage_host()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var v = sim.AddLora(SimContent.Safetensors(256 * 1024));
        v.File.Faults.DropAfterBytes = 100_000; // the resume must not add it either
        await using var h = new SourcesHarness(sim, token: sim.ValidToken);
        var file = await h.ResolveOkAsync($"https://civitai.com/api/download/models/{v.Id}");

        var result = await h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, TestContext.Current.CancellationToken);

        Assert.Equal(v.File.Sha256, result.Sha256);
        Assert.True(sim.ApiRequestsWithAuthorization >= 2);
        Assert.Equal(0, sim.StorageRequestsWithAuthorization);
        Assert.True(sim.StorageConnections > 0);
    }
}

public class RedirectLimitTests
{
    [Fact]
    public async Task Redirect_loops_stop_after_the_limit_without_retry_storms()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var v = sim.AddLora(SimContent.Safetensors());
        await using var h = new SourcesHarness(sim);
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");
        v.File.Faults.RedirectTo = new Uri($"{sim.ApiBaseUrl}{v.File.DownloadPath}");

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() =>
            h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, TestContext.Current.CancellationToken));

        Assert.Equal(ReasonClass.Refused, ex.ReasonClass);
        Assert.Contains("5 redirects", ex.FailReason);
        Assert.Equal(1 + 6, sim.DownloadEndpointHits(v.File.Id)); // probe + first request and 5 hops
    }
}
