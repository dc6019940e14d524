using LoraDeploy.Sources;
using LoraDeploy.Tests.Simulator;

namespace LoraDeploy.Tests.Sources;

/// <summary>
/// Storage that misbehaves on purpose (issue 16): every way back to the network spends from one bounded budget, and a
/// trickle fails by the minimum rate. The deadlines only stop a broken build from hanging the run.
/// </summary>
public class HostileStorageTests
{
    // Harness settings: MaxRetryAttempts 3; MaxResumeAttempts keeps its default 5.
    private const int AttemptBound = 1 + 3 + 5;

    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static CancellationTokenSource Deadline()
    {
        var cts = CancellationTokenSource.CreateLinkedTokenSource(Ct);
        cts.CancelAfter(TimeSpan.FromSeconds(30));
        return cts;
    }

    [Fact]
    public async Task Storage_answering_503_forever_gets_a_bounded_number_of_requests()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors());
        await using var h = new SourcesHarness(sim);
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");
        sim.Hostile.Storage503Forever = true;
        using var deadline = Deadline();

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() => h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, deadline.Token));

        Assert.Equal(ReasonClass.Upstream, ex.ReasonClass);
        Assert.Contains("answered 503", ex.FailReason);
        // The resilience handler's 1 + MaxRetryAttempts (3) and nothing on top: the downloader's loop does not retry 5xx.
        Assert.Equal(1 + 3, sim.DownloadsStarted(v.File.Id));
    }

    [Fact]
    public async Task Storage_ignoring_range_and_closing_early_fails_within_the_attempt_budget()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors(200_000));
        await using var h = new SourcesHarness(sim);
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");
        sim.Hostile.StorageIgnoresRangeAndClosesEarly = true;
        using var deadline = Deadline();

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() => h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, deadline.Token));

        Assert.Equal(ReasonClass.Network, ex.ReasonClass);
        Assert.Contains($"cannot make progress: {AttemptBound} requests in a row brought no new data", ex.FailReason);
        Assert.InRange(sim.DownloadsStarted(v.File.Id), 2, AttemptBound);
    }

    [Fact]
    public async Task Storage_answering_206_from_the_wrong_offset_fails_within_the_attempt_budget()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors(200_000));
        await using var h = new SourcesHarness(sim);
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");
        sim.Hostile.StorageWrongOffset = true;
        using var deadline = Deadline();

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() => h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, deadline.Token));

        Assert.Equal(ReasonClass.Network, ex.ReasonClass);
        Assert.Contains("when asked for bytes from 0", ex.FailReason);
        Assert.InRange(sim.DownloadsStarted(v.File.Id), 2, AttemptBound);
    }

    [Fact]
    public async Task A_trickling_download_fails_by_the_minimum_rate()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors(64 * 1024));
        await using var h = new SourcesHarness(sim, extra: new()
        {
            ["Import:MinBytesPerSecond"] = "65536",
            ["Import:MinRateWindow"] = "00:00:00.300",
        });
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");
        sim.Hostile.StorageTrickleBytes = 64; // about 3 KB/s: the whole file would take 20 s
        sim.Hostile.StorageTrickleDelay = TimeSpan.FromMilliseconds(20);
        using var deadline = Deadline();

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() => h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, deadline.Token));

        Assert.Equal(ReasonClass.Network, ex.ReasonClass);
        Assert.Contains("slower than Import:MinBytesPerSecond (65536 bytes/s)", ex.FailReason);
        Assert.Equal(1, sim.DownloadsStarted(v.File.Id)); // failed at once, not resumed
    }
}
