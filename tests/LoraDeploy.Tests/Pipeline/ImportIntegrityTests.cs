using System.Net;
using System.Security.Cryptography;
using LoraDeploy.Data;
using LoraDeploy.Tests.Simulator;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Pipeline;

/// <summary>
/// What a file is (its listed hash), what CivitAI's download quota sees, and how imports end when the upstream
/// or the disk misbehaves: the real host, the simulator on loopback, real files.
/// </summary>
public sealed class ImportIntegrityTests
{
    private static string Sha(byte[] bytes) => Convert.ToHexStringLower(SHA256.HashData(bytes));

    [Fact]
    public async Task A_file_id_relisted_with_other_bytes_is_fetched_again_and_reports_the_new_bytes()
    {
        await using var h = await PipelineHarness.StartAsync();
        byte[] before = AdapterFiles.Flux1(seed: 1, rank: 4), after = AdapterFiles.Flux1(seed: 2, rank: 8);
        var version = h.Simulator.AddLora(before, baseModel: "Flux.1 D");
        (await h.CreateAndWaitAsync("old-bytes", PipelineHarness.ModelUrl(version))).AssertDeploying();
        var oldProbe = (await h.LoraAsync("old-bytes")).GetProperty("probe").GetRawText();

        h.Simulator.Relist(version.File, after);
        var deploy = await h.CreateAndWaitAsync("new-bytes", PipelineHarness.ModelUrl(version));

        deploy.AssertDeploying();
        Assert.Equal(Sha(after), deploy.GetProperty("version").GetString());
        var lora = await h.LoraAsync("new-bytes");
        Assert.Equal(after.Length, lora.GetProperty("size_bytes").GetInt64());
        Assert.NotEqual(oldProbe, lora.GetProperty("probe").GetRawText());
        Assert.Equal(2, h.Simulator.DownloadsStarted(version.File.Id));
        Assert.Equal(Sha(after), await h.Server.QueryAsync(db => db.Loras.Where(l => l.Name == "new-bytes").Select(l => l.AdapterSha256).SingleAsync()));
    }

    [Fact]
    public async Task A_file_without_a_listed_hash_is_shared_only_while_in_flight()
    {
        await using var h = await PipelineHarness.StartAsync();
        byte[] before = AdapterFiles.Flux1(seed: 3, rank: 4), after = AdapterFiles.Flux1(seed: 4, rank: 8);
        var version = h.Simulator.AddLora(before, baseModel: "Flux.1 D");
        h.Simulator.OmitHashes(version.File);
        var first = await h.CreateAndWaitAsync("unhashed-1", PipelineHarness.ModelUrl(version));
        first.AssertDeploying();
        Assert.Equal(Sha(before), first.GetProperty("version").GetString());

        h.Simulator.Relist(version.File, after);
        var second = await h.CreateAndWaitAsync("unhashed-2", PipelineHarness.ModelUrl(version));

        second.AssertDeploying();
        Assert.Equal(Sha(after), second.GetProperty("version").GetString());
        Assert.Equal(after.Length, (await h.LoraAsync("unhashed-2")).GetProperty("size_bytes").GetInt64());
        Assert.Equal(2, h.Simulator.DownloadsStarted(version.File.Id));
    }

    [Fact]
    public async Task Creates_of_one_version_hit_the_download_endpoint_once_in_flight_and_stored()
    {
        await using var h = await PipelineHarness.StartAsync();
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(seed: 5, rank: 16), baseModel: "Flux.1 D");
        version.File.Faults.ChunkDelay = TimeSpan.FromMilliseconds(5);

        var created = await Task.WhenAll(Enumerable.Range(0, 8).Select(i => h.CreateAsync($"quota-{i}", PipelineHarness.ModelUrl(version))));
        foreach (var deploy in created)
        {
            (await h.WaitAsync(deploy.GetProperty("deploy_id").GetString()!)).AssertDeploying();
        }
        for (var i = 0; i < 3; i++)
        {
            (await h.CreateAndWaitAsync($"stored-{i}", PipelineHarness.ModelUrl(version))).AssertDeploying();
        }

        Assert.Equal(1, h.Simulator.DownloadEndpointHits(version.File.Id));
        Assert.Equal(1, h.Simulator.DownloadsStarted(version.File.Id));
    }

    [Fact]
    public async Task A_download_with_no_bytes_for_a_while_shows_stalled_since_and_clears_it_when_bytes_flow()
    {
        await using var h = await PipelineHarness.StartAsync(settings: new Dictionary<string, string?>
        {
            ["Pipeline:StalledAfter"] = "00:00:00.300",
        });
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(seed: 6, rank: 16), baseModel: "Flux.1 D");
        version.File.Faults.ChunkDelay = TimeSpan.FromSeconds(2);
        var id = (await h.CreateAsync("stalling", PipelineHarness.ModelUrl(version))).GetProperty("deploy_id").GetString()!;

        string? stalledSince = null;
        await ImportPipelineTests.WaitUntilAsync(async () =>
        {
            var lora = await h.LoraAsync("stalling");
            stalledSince = lora.GetProperty("stalled_since").GetString();
            return stalledSince is not null && lora.GetProperty("status").GetString() == "downloading";
        });
        Assert.True(DateTime.Parse(stalledSince!, System.Globalization.CultureInfo.InvariantCulture, System.Globalization.DateTimeStyles.RoundtripKind) <= DateTime.UtcNow);
        var status = await (await h.User.Client.GetAsync("/v1/lora/stalling/status")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(System.Text.Json.JsonValueKind.String, status.GetProperty("stalled_since").ValueKind);

        version.File.Faults.ChunkDelay = TimeSpan.Zero;
        (await h.WaitAsync(id)).AssertDeploying();
        Assert.Equal(System.Text.Json.JsonValueKind.Null, (await h.LoraAsync("stalling")).GetProperty("stalled_since").ValueKind);
    }

    [Fact]
    public async Task A_download_past_its_deadline_fails_as_download_deadline_and_keeps_its_bytes_for_a_retry()
    {
        await using var h = await PipelineHarness.StartAsync(settings: new Dictionary<string, string?>
        {
            ["Pipeline:DownloadDeadline"] = "00:00:01",
        });
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(seed: 7, rank: 16), baseModel: "Flux.1 D");
        version.File.Faults.ChunkDelay = TimeSpan.FromMilliseconds(300); // every chunk arrives: only the deadline ends it
        var id = (await h.CreateAsync("too-slow", PipelineHarness.ModelUrl(version))).GetProperty("deploy_id").GetString()!;

        var reason = (await h.WaitAsync(id)).AssertFailed();

        Assert.Contains("Pipeline:DownloadDeadline", reason);
        Assert.Equal("download_deadline", await h.Server.QueryAsync(db => db.Deploys.Where(d => d.Id == id).Select(d => d.FailClass).SingleAsync()));
        // A slow host may be faster later: what arrived stays (for Pipeline:BlobGracePeriod), so a start resumes it.
        var kept = Assert.Single(Directory.GetFiles(Path.Combine(h.Server.DataDir, "blobs", "staging")));
        Assert.True(new FileInfo(kept).Length > 0);
    }

    [Fact]
    public async Task Start_on_a_failed_import_retries_it_under_the_same_name_and_id()
    {
        await using var h = await PipelineHarness.StartAsync();
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(seed: 8), baseModel: "Flux.1 D");
        version.RequireAuth = true;
        var id = (await h.CreateAsync("retry-me", PipelineHarness.ModelUrl(version))).GetProperty("deploy_id").GetString()!;
        (await h.WaitAsync(id)).AssertFailed();

        version.RequireAuth = false; // the cause is gone
        var started = await (await h.User.Client.PostAsync($"/deploy/{id}/start", null)).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(id, started.GetProperty("deploy_id").GetString());

        var deploy = await h.WaitAsync(id);
        deploy.AssertDeploying();
        Assert.Equal("", deploy.GetProperty("fail_reason").GetString());
        Assert.Equal(version.File.Sha256, (await h.LoraAsync("retry-me")).GetProperty("version").GetString());
        // A deploy that did not fail keeps the old rule: only a stopped one can be started.
        var again = await h.User.Client.PostAsync($"/deploy/{id}/start", null);
        Assert.Equal(HttpStatusCode.BadRequest, again.StatusCode);
    }

    [Fact]
    public async Task A_trickling_civitai_answer_holds_only_its_own_deploy_and_deleting_it_cancels_the_resolution()
    {
        await using var h = await PipelineHarness.StartAsync();
        var stuck = h.Simulator.AddLora(AdapterFiles.Flux1(seed: 9), baseModel: "Flux.1 D");
        h.Simulator.TrickleJson(stuck.Model);
        var normal = h.Simulator.AddLora(AdapterFiles.Flux1(seed: 10), baseModel: "Flux.1 D");

        var stuckId = (await h.CreateAsync("stuck", PipelineHarness.ModelUrl(stuck))).GetProperty("deploy_id").GetString()!;
        var normalId = (await h.CreateAsync("normal", PipelineHarness.ModelUrl(normal))).GetProperty("deploy_id").GetString()!;

        (await h.WaitAsync(normalId, timeout: TimeSpan.FromSeconds(30))).AssertDeploying();
        var stuckDeploy = await (await h.User.Client.GetAsync($"/deploy/{stuckId}")).ExpectAsync(HttpStatusCode.OK);
        Assert.Contains(stuckDeploy.GetProperty("status").GetString(), new[] { "initializing", "downloading" });

        await (await h.User.Client.DeleteAsync($"/deploy/{stuckId}")).ExpectAsync(HttpStatusCode.OK);
        await ImportPipelineTests.WaitUntilAsync(() => Task.FromResult(h.Simulator.TrickleAborts > 0));
        Assert.Equal("deleted", (await (await h.User.Client.GetAsync($"/deploy/{stuckId}")).ExpectAsync(HttpStatusCode.OK)).GetProperty("status").GetString());
    }

    [Fact]
    public async Task A_full_disk_fails_the_import_with_a_reason_deletes_its_staging_file_and_others_go_on()
    {
        Assert.SkipUnless(OperatingSystem.IsLinux() && File.Exists("/dev/full"), "needs Linux's /dev/full (every write fails with ENOSPC)");
        await using var h = await PipelineHarness.StartAsync();
        var full = h.Simulator.AddLora(AdapterFiles.Flux1(seed: 11), baseModel: "Flux.1 D");
        var fine = h.Simulator.AddLora(AdapterFiles.Flux1(seed: 12), baseModel: "Flux.1 D");
        // The first download's staging file is the kernel's full disk: a real ENOSPC from a real write.
        var staging = Path.Combine(h.Server.DataDir, "blobs", "staging");
        File.CreateSymbolicLink(Path.Combine(staging, "download-1.part"), "/dev/full");

        var fullId = (await h.CreateAsync("disk-full", PipelineHarness.ModelUrl(full))).GetProperty("deploy_id").GetString()!;
        await ImportPipelineTests.WaitUntilAsync(() => h.Server.QueryAsync(db => db.Downloads.AnyAsync()));
        var fineId = (await h.CreateAsync("disk-fine", PipelineHarness.ModelUrl(fine))).GetProperty("deploy_id").GetString()!;

        var reason = (await h.WaitAsync(fullId)).AssertFailed();
        Assert.Contains("full", reason);
        Assert.Equal("disk_full", await h.Server.QueryAsync(db => db.Deploys.Where(d => d.Id == fullId).Select(d => d.FailClass).SingleAsync()));
        (await h.WaitAsync(fineId)).AssertDeploying();
        Assert.Empty(Directory.GetFiles(staging));
        var download = await h.Server.QueryAsync(db => db.Downloads.SingleAsync(d => d.Id == 1));
        Assert.Equal(DownloadStatus.Failed, download.Status);
        Assert.Null(download.LeaseOwner);
    }

    [Fact]
    public async Task A_worker_that_dies_of_an_unexpected_error_stops_renewing_its_lease_so_the_download_is_taken_over()
    {
        await using var h = await PipelineHarness.StartAsync();
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(seed: 14), baseModel: "Flux.1 D");
        // A folder where the staging file should be: opening it throws, which no catch of the worker expects.
        var blocker = Path.Combine(h.Server.DataDir, "blobs", "staging", "download-1.part");
        Directory.CreateDirectory(blocker);
        var id = (await h.CreateAsync("crashing", PipelineHarness.ModelUrl(version))).GetProperty("deploy_id").GetString()!;

        // Claimed again only once the dead worker's lease (3 s here) has lapsed, i.e. nobody renews it any more.
        await ImportPipelineTests.WaitUntilAsync(() => h.Server.QueryAsync(db => db.Downloads.AnyAsync(d => d.Attempts >= 2)));
        Directory.Delete(blocker);

        (await h.WaitAsync(id)).AssertDeploying();
    }

    [Fact]
    public async Task A_download_whose_worker_keeps_dying_fails_after_Pipeline_MaxDownloadStarts()
    {
        await using var h = await PipelineHarness.StartAsync(settings: new Dictionary<string, string?> { ["Pipeline:MaxDownloadStarts"] = "2" });
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(seed: 15), baseModel: "Flux.1 D");
        // As above, the worker dies on every start; this time nothing clears the cause.
        Directory.CreateDirectory(Path.Combine(h.Server.DataDir, "blobs", "staging", "download-1.part"));
        var id = (await h.CreateAsync("always-crashing", PipelineHarness.ModelUrl(version))).GetProperty("deploy_id").GetString()!;

        var reason = (await h.WaitAsync(id)).AssertFailed();

        Assert.Contains("was started 2 times and each time its worker stopped without finishing", reason);
        Assert.Equal(3, await h.Server.QueryAsync(db => db.Downloads.Select(d => d.Attempts).SingleAsync()));
    }

    [Fact]
    public async Task A_refused_download_leaves_no_staging_file_behind()
    {
        await using var h = await PipelineHarness.StartAsync();
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(seed: 13), baseModel: "Flux.1 D");
        version.RequireAuth = true;

        (await h.CreateAndWaitAsync("refused", PipelineHarness.ModelUrl(version))).AssertFailed();

        Assert.Empty(Directory.GetFiles(Path.Combine(h.Server.DataDir, "blobs", "staging")));
    }
}
