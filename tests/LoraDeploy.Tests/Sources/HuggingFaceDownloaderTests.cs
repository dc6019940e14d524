using LoraDeploy.Sources;
using LoraDeploy.Tests.Simulator;
using Microsoft.Extensions.Time.Testing;

namespace LoraDeploy.Tests.Sources;

public class HuggingFaceDownloaderTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public async Task Downloads_the_lfs_weights_from_storage_and_checks_size_and_sha()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var weights = SimContent.Safetensors(3 * 1024 * 1024 + 5);
        sim.AddAdapter("owner/adapter", weights);
        await using var h = new HuggingFaceHarness(sim);
        var a = await h.ResolveOkAsync("owner/adapter");
        var reported = new List<long>();

        var result = await h.DownloadAsync(a, progress: new CallbackProgress(reported.Add));

        Assert.Equal(a.Weights.Sha256, result.Sha256);
        Assert.Equal(weights.Length, result.Bytes);
        Assert.Equal(weights, await File.ReadAllBytesAsync(h.StagingPath(), Ct));
        Assert.Equal(weights.Length, reported[^1]);
        Assert.Contains(sim.Requests, r => r.Host == "hub" && r.Status == 302 && r.PathAndQuery.EndsWith("/adapter_model.safetensors", StringComparison.Ordinal));
        Assert.Single(sim.Requests, r => r.Host == "storage" && r.Status == 200);
        Assert.Empty(sim.RangeRequests);
    }

    [Fact]
    public async Task Weights_kept_in_git_come_from_the_hub_itself_and_their_size_is_checked()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var weights = SimContent.Safetensors(50_000);
        var repo = sim.AddRepo("owner/small");
        repo.Commit(HuggingFaceSimulator.AdapterFiles(weights).Select(f => f.Lfs ? new HfSimFile(f.Path, f.Content, lfs: false) : f));
        await using var h = new HuggingFaceHarness(sim);
        var a = await h.ResolveOkAsync("owner/small");

        var result = await h.DownloadAsync(a);

        Assert.Null(a.Weights.Sha256);
        Assert.Equal(weights.Length, a.Weights.SizeBytes);
        Assert.Equal(Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(weights)), result.Sha256);
        Assert.DoesNotContain(sim.Requests, r => r.Host == "storage");
    }

    [Fact]
    public async Task The_token_reaches_the_hub_but_never_the_storage_host_or_the_logs()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var weights = SimContent.Safetensors(2 * 1024 * 1024);
        var repo = sim.AddAdapter("owner/secret", weights, HfVisibility.Private);
        var file = repo.Files(repo.Head)["adapter_model.safetensors"];
        file.Faults.DropAfterBytes = 500_000; // a resume and a second storage request, so every path is exercised
        file.Faults.SignedLinkUses = 1;       // and the expired-link refresh back at the Hub
        await using var h = new HuggingFaceHarness(sim);

        var a = await h.ResolveOkAsync("owner/secret", sim.ValidToken);
        var config = await h.Client.FetchConfigAsync(a, sim.ValidToken, Ct);
        var result = await h.DownloadAsync(a, sim.ValidToken);

        Assert.True(config.Succeeded, config.FailReason);
        Assert.Equal(a.Weights.Sha256, result.Sha256);
        var storage = sim.Requests.Where(r => r.Host == "storage").ToList();
        Assert.True(storage.Count >= 3, $"{storage.Count} storage requests");
        Assert.All(storage, r => Assert.False(r.HadAuthorization, $"{r.PathAndQuery} carried Authorization"));
        Assert.Equal(0, sim.RequestsCarrying("storage", sim.ValidToken));
        Assert.Equal(sim.Requests.Count(r => r.Host == "hub"), sim.RequestsCarrying("hub", sim.ValidToken));
        Assert.True(sim.Requests.Count(r => r.Host == "hub") >= 4, "API, config, weights, refresh");
        Assert.NotEmpty(h.Logs.Lines);
        Assert.Contains(h.Logs.Lines, l => l.Contains("owner/secret", StringComparison.Ordinal));
        // The HTTP client's own trace logging, which lists request headers, is among the captured lines.
        Assert.Contains(h.Logs.Lines, l => l.Contains("System.Net.Http.HttpClient", StringComparison.Ordinal) && l.Contains("Authorization", StringComparison.Ordinal));
        Assert.DoesNotContain(h.Logs.Lines, l => l.Contains(sim.ValidToken, StringComparison.Ordinal));
    }

    [Fact]
    public async Task A_dropped_connection_resumes_with_range_and_the_sha_is_right()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var weights = SimContent.Safetensors(2 * 1024 * 1024);
        var repo = sim.AddAdapter("owner/adapter", weights);
        repo.Files(repo.Head)["adapter_model.safetensors"].Faults.DropAfterBytes = 700_000;
        await using var h = new HuggingFaceHarness(sim);
        var a = await h.ResolveOkAsync("owner/adapter");

        var result = await h.DownloadAsync(a);

        Assert.Equal(a.Weights.Sha256, result.Sha256);
        Assert.Equal(weights.Length, result.Bytes);
        var offset = Assert.Single(sim.RangeRequests);
        Assert.InRange(offset, 1, 700_000);
        Assert.Equal(1, sim.Requests.Count(r => r.Host == "hub" && r.Status == 302)); // the resume reused the signed link
        Assert.Contains(sim.Requests, r => r.Host == "storage" && r.Status == 206);
    }

    [Fact]
    public async Task An_expired_signed_link_is_resolved_again_at_the_hub_and_the_download_resumes()
    {
        var time = new FakeTimeProvider(DateTimeOffset.UtcNow);
        await using var sim = await HuggingFaceSimulator.StartAsync(time, Ct);
        var weights = SimContent.Safetensors(1024 * 1024);
        var repo = sim.AddAdapter("owner/adapter", weights);
        repo.Files(repo.Head)["adapter_model.safetensors"].Faults.DropAfterBytes = 400_000;
        await using var h = new HuggingFaceHarness(sim);
        var a = await h.ResolveOkAsync("owner/adapter");
        var expired = false;

        // Let the link's hour pass while the first answer streams, so it is dead by the time the download resumes.
        var result = await h.DownloadAsync(a, progress: new CallbackProgress(_ =>
        {
            if (!expired)
            {
                expired = true;
                time.Advance(TimeSpan.FromHours(2));
            }
        }));

        Assert.Equal(a.Weights.Sha256, result.Sha256);
        Assert.Contains(sim.Requests, r => r.Host == "storage" && r.Status == 403);
        Assert.Equal(2, sim.Requests.Count(r => r.Host == "hub" && r.Status == 302));
        Assert.Contains(sim.Requests, r => r.Host == "storage" && r.Status == 206);
        Assert.All(sim.RangeRequests, o => Assert.InRange(o, 1, 400_000));
    }

    [Fact]
    public async Task Resumes_from_a_partial_staging_file_left_by_an_earlier_run()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var weights = SimContent.Safetensors(1024 * 1024);
        sim.AddAdapter("owner/adapter", weights);
        await using var h = new HuggingFaceHarness(sim);
        var a = await h.ResolveOkAsync("owner/adapter");
        Directory.CreateDirectory(Path.GetDirectoryName(h.StagingPath())!);
        await File.WriteAllBytesAsync(h.StagingPath(), weights.AsSpan(0, 300_001).ToArray(), Ct);

        var result = await h.DownloadAsync(a);

        Assert.Equal(a.Weights.Sha256, result.Sha256);
        Assert.Equal([300_001L], sim.RangeRequests);
    }

    [Fact]
    public async Task Storage_serving_other_bytes_of_the_same_size_fails_the_sha_check_and_discards_them()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var repo = sim.AddAdapter("owner/adapter", SimContent.Safetensors(seed: 1));
        repo.Files(repo.Head)["adapter_model.safetensors"].Faults.ServeInstead = SimContent.Safetensors(seed: 2);
        await using var h = new HuggingFaceHarness(sim);
        var a = await h.ResolveOkAsync("owner/adapter");

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() => h.DownloadAsync(a));

        Assert.Equal(ReasonClass.HashMismatch, ex.ReasonClass);
        Assert.Contains($"but the Hugging Face Hub lists {a.Weights.Sha256}; the bytes were corrupted on the way or the storage host served another file, try again later", ex.FailReason);
        Assert.StartsWith($"adapter_model.safetensors of Hugging Face repo owner/adapter (commit {a.Commit[..12]}) arrived with SHA-256 ", ex.FailReason);
        Assert.False(File.Exists(h.StagingPath()));
    }

    [Fact]
    public async Task Storage_announcing_another_size_fails_before_reading()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var weights = SimContent.Safetensors(200_000);
        var repo = sim.AddAdapter("owner/adapter", weights);
        repo.Files(repo.Head)["adapter_model.safetensors"].Faults.ServeInstead = weights.AsSpan(0, 150_000).ToArray();
        await using var h = new HuggingFaceHarness(sim);
        var a = await h.ResolveOkAsync("owner/adapter");

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() => h.DownloadAsync(a, progress: new CallbackProgress(_ => Assert.Fail("read the body"))));

        Assert.Equal(ReasonClass.HashMismatch, ex.ReasonClass);
        Assert.Contains($"is sending 150000 bytes for adapter_model.safetensors of Hugging Face repo owner/adapter (commit {a.Commit[..12]}), but the Hugging Face Hub lists {weights.Length}", ex.FailReason);
        Assert.False(File.Exists(h.StagingPath()));
    }

    [Fact]
    public async Task A_listed_size_over_import_max_file_bytes_fails_without_a_request()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        sim.AddAdapter("owner/adapter", SimContent.Safetensors(200_000));
        await using var resolver = new HuggingFaceHarness(sim);
        var a = await resolver.ResolveOkAsync("owner/adapter");
        await using var h = new HuggingFaceHarness(sim, new() { ["Import:MaxFileBytes"] = "100000" });
        var before = sim.Requests.Count;

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() => h.DownloadAsync(a));

        Assert.Equal(ReasonClass.TooLarge, ex.ReasonClass);
        Assert.Contains("over Import:MaxFileBytes (100000); raise the limit to import it", ex.FailReason);
        Assert.Equal(before, sim.Requests.Count);
    }

    [Fact]
    public async Task A_pickle_behind_the_safetensors_name_is_named_as_one()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        sim.AddAdapter("owner/adapter", [0x80, 0x02, (byte)'}', (byte)'q', 0x00, (byte)'(', (byte)'X', 0x0a, 0x00, 0x00, 0x00, (byte)'.']);
        await using var h = new HuggingFaceHarness(sim);
        var a = await h.ResolveOkAsync("owner/adapter");

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() => h.DownloadAsync(a));

        Assert.Equal(ReasonClass.NotSafetensors, ex.ReasonClass);
        Assert.Contains("is a PickleTensor (pickle) file, which can run code when loaded", ex.FailReason);
        Assert.Contains("the Hugging Face Hub may have served an error page or another file than the one it lists", ex.FailReason);
        Assert.False(File.Exists(h.StagingPath()));
    }

    [Fact]
    public async Task A_rate_limited_resolve_is_retried_after_retry_after()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var repo = sim.AddAdapter("owner/adapter", SimContent.Safetensors());
        await using var h = new HuggingFaceHarness(sim);
        var a = await h.ResolveOkAsync("owner/adapter");
        var faults = repo.Files(repo.Head)["adapter_model.safetensors"].Faults;
        faults.Resolve429Times = 1;
        faults.RetryAfterSeconds = 1;

        var result = await h.DownloadAsync(a);

        Assert.Equal(a.Weights.Sha256, result.Sha256);
        Assert.Equal([429, 302], sim.Requests.Where(r => r.PathAndQuery.EndsWith("/adapter_model.safetensors", StringComparison.Ordinal)).Select(r => r.Status));
    }

    [Fact]
    public async Task A_rate_limit_that_persists_fails_with_try_again_later()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var repo = sim.AddAdapter("owner/adapter", SimContent.Safetensors());
        await using var h = new HuggingFaceHarness(sim);
        var a = await h.ResolveOkAsync("owner/adapter");
        repo.Files(repo.Head)["adapter_model.safetensors"].Faults.Resolve429Times = 100;

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() => h.DownloadAsync(a));

        Assert.Equal(ReasonClass.RateLimited, ex.ReasonClass);
        Assert.Equal("the Hugging Face Hub is rate-limiting requests (429) while downloading adapter_model.safetensors of owner/adapter; try again later", ex.FailReason);
        Assert.Equal(1 + 3, sim.Requests.Count(r => r.Status == 429));
    }

    [Fact]
    public async Task A_private_repo_downloaded_without_its_token_asks_for_one()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        sim.AddAdapter("owner/secret", SimContent.Safetensors(), HfVisibility.Private);
        await using var h = new HuggingFaceHarness(sim);
        var a = await h.ResolveOkAsync("owner/secret", sim.ValidToken);

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() => h.DownloadAsync(a));

        Assert.Equal(ReasonClass.AuthRequired, ex.ReasonClass);
        Assert.StartsWith("Hugging Face repo owner/secret is private or gated", ex.FailReason);
        Assert.DoesNotContain(sim.Requests, r => r.Host == "storage");
    }
}
