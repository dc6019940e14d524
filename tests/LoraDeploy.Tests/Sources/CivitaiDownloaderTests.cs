using System.Diagnostics;
using LoraDeploy.Sources;
using LoraDeploy.Tests.Simulator;
using Microsoft.Extensions.Time.Testing;

namespace LoraDeploy.Tests.Sources;

public class CivitaiDownloaderTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public async Task Downloads_and_hashes_in_one_pass()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors(3 * 1024 * 1024 + 17));
        await using var h = new SourcesHarness(sim);
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");
        var reported = new List<long>();

        var result = await h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, new SyncProgress(reported.Add), Ct);

        Assert.Equal(v.File.Sha256, result.Sha256);
        Assert.Equal(file.ListedSha256, result.Sha256);
        Assert.Equal(v.File.Content.Length, result.Bytes);
        Assert.Equal(v.File.Content, await File.ReadAllBytesAsync(h.StagingPath(), Ct));
        Assert.Equal(v.File.Content.Length, reported[^1]);
        Assert.Equal(1, sim.DownloadsStarted(v.File.Id));
        Assert.Empty(sim.RangeRequests);
    }

    [Fact]
    public async Task Dropped_connection_resumes_with_range_and_the_hash_is_right()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors(2 * 1024 * 1024));
        v.File.Faults.DropAfterBytes = 700_000;
        await using var h = new SourcesHarness(sim);
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");

        var result = await h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, Ct);

        Assert.Equal(v.File.Sha256, result.Sha256);
        Assert.Equal(v.File.Content.Length, result.Bytes);
        var range = Assert.Single(sim.RangeRequests);
        Assert.Equal(v.File.Id, range.FileId);
        Assert.InRange(range.Offset, 1, 700_000);
        Assert.Equal(2, sim.DownloadsStarted(v.File.Id));
        Assert.Equal(2, sim.DownloadEndpointHits(v.File.Id)); // probe + first GET; the resume reused the signed link
    }

    [Fact]
    public async Task Resumes_from_an_existing_partial_staging_file()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors(1024 * 1024));
        await using var h = new SourcesHarness(sim);
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");
        await File.WriteAllBytesAsync(h.StagingPath(), v.File.Content.AsSpan(0, 300_001).ToArray(), Ct);

        var result = await h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, Ct);

        Assert.Equal(v.File.Sha256, result.Sha256);
        Assert.Equal(v.File.Content.Length, result.Bytes);
        Assert.Equal(new SimRangeRequest(v.File.Id, 300_001), Assert.Single(sim.RangeRequests));
    }

    [Fact]
    public async Task A_complete_staging_file_gets_416_and_is_accepted()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors(100_000));
        await using var h = new SourcesHarness(sim);
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");
        await File.WriteAllBytesAsync(h.StagingPath(), v.File.Content, Ct);

        var result = await h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, Ct);

        Assert.Equal(v.File.Sha256, result.Sha256);
        Assert.Contains(sim.Requests, r => r.Host == "storage" && r.Status == 416);
    }

    [Fact]
    public async Task Server_ignoring_range_restarts_from_zero()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors(500_000));
        v.File.Faults.IgnoreRange = true;
        await using var h = new SourcesHarness(sim);
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");
        await File.WriteAllBytesAsync(h.StagingPath(), v.File.Content.AsSpan(0, 200_000).ToArray(), Ct);

        var result = await h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, Ct);

        Assert.Equal(v.File.Sha256, result.Sha256);
        Assert.Equal(v.File.Content.Length, new FileInfo(h.StagingPath()).Length);
    }

    [Fact]
    public async Task Rate_limit_with_retry_after_is_honoured()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors());
        await using var h = new SourcesHarness(sim);
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");
        v.File.Faults.Download429Times = 1;
        v.File.Faults.RetryAfterSeconds = 1;

        var clock = Stopwatch.StartNew();
        var result = await h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, Ct);

        Assert.Equal(v.File.Sha256, result.Sha256);
        Assert.True(clock.Elapsed >= TimeSpan.FromMilliseconds(900), $"retried after {clock.Elapsed}, not after Retry-After: 1");
        Assert.Equal(3, sim.DownloadEndpointHits(v.File.Id)); // probe, 429, retry
        Assert.Contains(sim.Requests, r => r.Status == 429);
    }

    [Fact]
    public async Task Storage_503_once_is_retried()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors());
        v.File.Faults.Storage503Times = 1;
        await using var h = new SourcesHarness(sim);
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");

        var result = await h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, Ct);

        Assert.Equal(v.File.Sha256, result.Sha256);
        Assert.Equal(2, sim.DownloadsStarted(v.File.Id));
        Assert.Contains(sim.Requests, r => r.Host == "storage" && r.Status == 503);
    }

    [Fact]
    public async Task A_pickle_served_as_the_file_is_named_as_one()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        // torch.save's legacy format: pickle protocol 2 (PROTO 0x80 0x02), then the pickled objects.
        var v = sim.AddLora([0x80, 0x02, (byte)'}', (byte)'q', 0x00, (byte)'(', (byte)'X', 0x0a, 0x00, 0x00, 0x00, (byte)'.']);
        await using var h = new SourcesHarness(sim);
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() => h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, Ct));

        Assert.Equal(ReasonClass.NotSafetensors, ex.ReasonClass);
        Assert.Contains("is a PickleTensor (pickle) file, which can run code when loaded", ex.FailReason);
        Assert.False(File.Exists(h.StagingPath()));
    }

    [Theory]
    [InlineData(false, "HTML page (text/html)")]
    [InlineData(true, "is an HTML page, not a safetensors file")]
    public async Task Html_instead_of_safetensors_fails_and_discards_the_staging_file(bool disguised, string expected)
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors());
        v.File.Faults.ServeHtml = true;
        v.File.Faults.DisguiseHtml = disguised;
        await using var h = new SourcesHarness(sim);
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() => h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, Ct));

        Assert.Equal(ReasonClass.NotSafetensors, ex.ReasonClass);
        Assert.Contains(expected, ex.FailReason);
        Assert.False(File.Exists(h.StagingPath()));
    }

    [Fact]
    public async Task Oversize_by_content_length_is_refused_before_reading()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors(200_000));
        await using var h = new SourcesHarness(sim, extra: new() { ["Import:MaxFileBytes"] = "100000" });
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() => h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, new SyncProgress(_ => Assert.Fail("read body")), Ct));

        Assert.Equal(ReasonClass.TooLarge, ex.ReasonClass);
        Assert.Contains("over Import:MaxFileBytes (100000)", ex.FailReason);
        Assert.False(File.Exists(h.StagingPath()));
    }

    [Fact]
    public async Task Oversize_by_stream_aborts_and_deletes_the_staging_file()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors(3 * 1024 * 1024));
        v.File.Faults.OmitContentLength = true;
        await using var h = new SourcesHarness(sim, extra: new() { ["Import:MaxFileBytes"] = "1500000" });
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() => h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, Ct));

        Assert.Equal(ReasonClass.TooLarge, ex.ReasonClass);
        Assert.Contains("grew past Import:MaxFileBytes", ex.FailReason);
        Assert.False(File.Exists(h.StagingPath()));
    }

    [Fact]
    public async Task Expired_signed_link_is_refreshed_from_civitai()
    {
        var time = new FakeTimeProvider(DateTimeOffset.UtcNow);
        await using var sim = await CivitaiSimulator.StartAsync(new CivitaiSimulatorOptions { TimeProvider = time, SignedLinkLifetime = TimeSpan.FromHours(24) }, Ct);
        var v = sim.AddLora(SimContent.Safetensors(1024 * 1024));
        v.File.Faults.DropAfterBytes = 400_000;
        await using var h = new SourcesHarness(sim);
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");
        var expired = false;

        // Let a day pass while the first response is streaming, so the link is dead by the time we resume.
        var result = await h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, new SyncProgress(_ =>
        {
            if (!expired)
            {
                expired = true;
                time.Advance(TimeSpan.FromHours(25));
            }
        }), Ct);

        Assert.Equal(v.File.Sha256, result.Sha256);
        Assert.Contains(sim.Requests, r => r.Host == "storage" && r.Status == 403);
        Assert.Equal(3, sim.DownloadEndpointHits(v.File.Id)); // probe, first GET, refresh
        Assert.Contains(sim.Requests, r => r.Host == "storage" && r.Status == 206);
    }

    [Fact]
    public async Task Wrong_listed_hash_is_visible_to_the_caller()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors());
        v.File.ListedSha256 = new string('a', 64);
        await using var h = new SourcesHarness(sim);
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");

        var result = await h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, Ct);

        Assert.Equal(new string('a', 64), file.ListedSha256);
        Assert.Equal(v.File.Sha256, result.Sha256);
    }

    [Fact]
    public async Task Login_required_at_download_time_fails_with_the_civitai_reason()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors());
        await using var h = new SourcesHarness(sim);
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");
        v.RequireAuth = true;

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() => h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, Ct));

        Assert.Equal(ReasonClass.AuthRequired, ex.ReasonClass);
        Assert.Equal($"CivitAI requires a login to download version {v.Id}; set Civitai:Token", ex.FailReason);
    }

    private sealed class SyncProgress(Action<long> report) : IProgress<long>
    {
        public void Report(long value) => report(value);
    }
}

public class CivitaiDownloaderTimeoutTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public async Task A_body_slower_than_the_attempt_timeout_still_completes()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors(10 * 64 * 1024));
        await using var h = new SourcesHarness(sim, extra: new() { ["Import:AttemptTimeout"] = "00:00:00.200" });
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");
        v.File.Faults.ChunkDelay = TimeSpan.FromMilliseconds(60); // ~660 ms in all, each gap well under the idle timeout

        var result = await h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, Ct);

        Assert.Equal(v.File.Sha256, result.Sha256);
        Assert.Empty(sim.RangeRequests);
    }

    [Fact]
    public async Task A_stalled_body_hits_the_idle_timeout_and_gives_up_after_the_attempt_budget()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors(4 * 64 * 1024));
        await using var h = new SourcesHarness(sim, extra: new()
        {
            ["Import:ReadIdleTimeout"] = "00:00:00.100",
            ["Import:MaxResumeAttempts"] = "1",
        });
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");
        v.File.Faults.ChunkDelay = TimeSpan.FromSeconds(2);
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(Ct);
        deadline.CancelAfter(TimeSpan.FromSeconds(30)); // only so a build without the budget fails instead of hanging

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() => h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, deadline.Token));

        Assert.Equal(ReasonClass.Network, ex.ReasonClass);
        Assert.Contains("5 requests in a row brought no new data", ex.FailReason);
        Assert.Equal(1 + 3 + 1, sim.DownloadsStarted(v.File.Id)); // 1 + Import:MaxRetryAttempts + Import:MaxResumeAttempts
    }
}
