using System.Net;
using System.Text.Json;
using LoraDeploy.Data;
using LoraDeploy.Tests.Simulator;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Pipeline;

/// <summary>CivitAI import end to end: the real host, the simulator on loopback, real files.</summary>
public sealed class ImportPipelineTests
{
    public static TheoryData<string> UrlForms => new()
    {
        "https://civitai.com/models/{m}",
        "https://civitai.com/models/{m}?modelVersionId={v}",
        "https://www.civitai.com/models/{m}/pixel-art-style?modelVersionId={v}",
        "https://civitai.red/models/{m}/slug/more?foo=1&modelVersionId={v}",
        "https://civitai.green/model-versions/{v}",
        "https://civitai.com/api/download/models/{v}",
        "https://civitai.com/api/download/models/{v}?fileId={f}",
        "https://civitai.com/api/download/models/{v}?type=Model&format=SafeTensor",
        "https://civitai.com/api/v1/model-versions/{v}",
        "https://civitai.com/api/v1/models/{m}",
        "urn:air:flux1:lora:civitai:{m}@{v}",
        "urn:air:flux1:lora:civitai:{m}@{v}+{f}",
    };

    [Theory]
    [MemberData(nameof(UrlForms))]
    public async Task Every_url_form_imports_to_deploying(string form)
    {
        await using var h = await PipelineHarness.StartAsync();
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(), baseModel: "Flux.1 D", trainedWords: ["pixel art"]);
        var url = form.Replace("{m}", version.Model.Id.ToString()).Replace("{v}", version.Id.ToString()).Replace("{f}", version.File.Id.ToString());

        var deploy = await h.CreateAndWaitAsync("form", url);

        deploy.AssertDeploying();
        Assert.Equal(version.File.Sha256, deploy.GetProperty("version").GetString());
        var lora = await h.LoraAsync("form");
        Assert.Equal(version.Id, lora.GetProperty("civitai").GetProperty("version_id").GetInt32());
        Assert.Equal(version.File.Id, lora.GetProperty("civitai").GetProperty("file_id").GetInt32());
        Assert.Equal(["pixel art"], lora.GetProperty("civitai").GetProperty("trained_words").EnumerateArray().Select(w => w.GetString()));
        Assert.Equal(version.File.Content.Length, lora.GetProperty("size_bytes").GetInt64());
        Assert.Equal(version.File.Content.Length, lora.GetProperty("downloaded_bytes").GetInt64());
        var probe = lora.GetProperty("probe");
        Assert.Equal("flux1", probe.GetProperty("architecture").GetString());
        Assert.Equal("lora", probe.GetProperty("network").GetString());
        Assert.Equal(0, h.Simulator.StorageRequestsWithAuthorization);
    }

    [Fact]
    public async Task The_model_file_is_chosen_even_when_a_training_zip_is_listed_first()
    {
        await using var h = await PipelineHarness.StartAsync();
        var model = h.Simulator.AddModel();
        var version = model.AddVersion("Flux.1 D");
        var zip = version.AddTrainingData(4096);
        var file = version.AddFile(AdapterFiles.Flux1(2), primary: false);

        (await h.CreateAndWaitAsync("choice", $"https://civitai.com/models/{model.Id}")).AssertDeploying();

        Assert.Equal(0, h.Simulator.DownloadsStarted(zip.Id));
        Assert.Equal(1, h.Simulator.DownloadsStarted(file.Id));
    }

    [Fact]
    public async Task A_login_only_file_fails_without_a_token_and_imports_with_one()
    {
        await using (var h = await PipelineHarness.StartAsync(withToken: false))
        {
            var version = h.Simulator.AddLora(AdapterFiles.Flux1(), baseModel: "Flux.1 D");
            version.RequireAuth = true;
            var reason = (await h.CreateAndWaitAsync("login", PipelineHarness.ModelUrl(version))).AssertFailed();
            Assert.Contains("Civitai:Token", reason);
            Assert.Equal(0, h.Simulator.DownloadsStarted(version.File.Id));
        }
        await using (var h = await PipelineHarness.StartAsync(withToken: true))
        {
            var version = h.Simulator.AddLora(AdapterFiles.Flux1(), baseModel: "Flux.1 D");
            version.RequireAuth = true;
            (await h.CreateAndWaitAsync("login", PipelineHarness.ModelUrl(version))).AssertDeploying();
            Assert.True(h.Simulator.ApiRequestsWithAuthorization > 0);
            Assert.Equal(0, h.Simulator.StorageRequestsWithAuthorization); // the token stays with CivitAI
        }
    }

    [Fact]
    public async Task Early_access_fails_with_a_reason()
    {
        await using var h = await PipelineHarness.StartAsync(withToken: true);
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(), baseModel: "Flux.1 D");
        version.EarlyAccessEndsAt = DateTimeOffset.UtcNow.AddDays(3);
        var reason = (await h.CreateAndWaitAsync("early", PipelineHarness.ModelUrl(version))).AssertFailed();
        Assert.Contains("early access", reason, StringComparison.OrdinalIgnoreCase);
    }

    [Fact]
    public async Task Unknown_models_and_versions_fail_as_not_found()
    {
        await using var h = await PipelineHarness.StartAsync();
        var reason = (await h.CreateAndWaitAsync("missing-model", "https://civitai.com/models/987654")).AssertFailed();
        Assert.Contains("987654", reason);
        var reason2 = (await h.CreateAndWaitAsync("missing-version", "https://civitai.com/model-versions/876543")).AssertFailed();
        Assert.Contains("876543", reason2);
    }

    [Fact]
    public async Task Rate_limits_with_retry_after_and_a_503_are_retried()
    {
        await using var h = await PipelineHarness.StartAsync();
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(), baseModel: "Flux.1 D");
        version.File.Faults.Download429Times = 1;
        version.File.Faults.RetryAfterSeconds = 1;
        version.File.Faults.Storage503Times = 1;

        (await h.CreateAndWaitAsync("flaky", PipelineHarness.ModelUrl(version))).AssertDeploying();

        Assert.Contains(h.Simulator.Requests, r => r.Status == 429);
        Assert.Contains(h.Simulator.Requests, r => r.Status == 503);
    }

    [Fact]
    public async Task A_connection_dropped_mid_body_resumes_with_range_and_the_hash_is_right()
    {
        await using var h = await PipelineHarness.StartAsync();
        var content = AdapterFiles.Flux1(3);
        var version = h.Simulator.AddLora(content, baseModel: "Flux.1 D");
        version.File.Faults.DropAfterBytes = content.Length / 2;

        var deploy = await h.CreateAndWaitAsync("dropped", PipelineHarness.ModelUrl(version));

        deploy.AssertDeploying();
        Assert.Contains(h.Simulator.RangeRequests, r => r.FileId == version.File.Id && r.Offset > 0);
        Assert.Equal(version.File.Sha256, deploy.GetProperty("version").GetString());
    }

    [Fact]
    public async Task Bytes_that_differ_from_the_listed_hash_fail_and_keep_the_listed_version()
    {
        await using var h = await PipelineHarness.StartAsync();
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(), baseModel: "Flux.1 D");
        var listed = new string('a', 64);
        version.File.ListedSha256 = listed;

        var deploy = await h.CreateAndWaitAsync("mismatch", PipelineHarness.ModelUrl(version));

        var reason = deploy.AssertFailed();
        Assert.Contains(listed, reason);
        Assert.Contains(version.File.Sha256, reason);
        Assert.Equal(listed, deploy.GetProperty("version").GetString());
        Assert.Equal(0, await h.Server.QueryAsync(db => db.Blobs.CountAsync()));
    }

    [Fact]
    public async Task An_html_page_instead_of_the_file_is_recognised()
    {
        await using var h = await PipelineHarness.StartAsync();
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(), baseModel: "Flux.1 D");
        version.File.Faults.ServeHtml = true;
        var reason = (await h.CreateAndWaitAsync("html", PipelineHarness.ModelUrl(version))).AssertFailed();
        Assert.Contains("HTML", reason);
    }

    [Fact]
    public async Task A_file_over_the_size_cap_is_refused()
    {
        await using var h = await PipelineHarness.StartAsync(settings: new Dictionary<string, string?> { ["Import:MaxFileBytes"] = "100000" });
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(rank: 8), baseModel: "Flux.1 D");
        Assert.True(version.File.Content.Length > 100000);
        var reason = (await h.CreateAndWaitAsync("big", PipelineHarness.ModelUrl(version))).AssertFailed();
        Assert.Contains("Import:MaxFileBytes", reason);
    }

    [Fact]
    public async Task A_truncated_safetensors_file_is_refused_and_not_stored()
    {
        await using var h = await PipelineHarness.StartAsync();
        var full = AdapterFiles.Flux1();
        var version = h.Simulator.AddLora(full[..(full.Length - 1000)], baseModel: "Flux.1 D");
        var reason = (await h.CreateAndWaitAsync("truncated", PipelineHarness.ModelUrl(version))).AssertFailed();
        Assert.Contains("safetensors", reason);
        Assert.Equal(0, await h.Server.QueryAsync(db => db.Blobs.CountAsync()));
    }

    [Fact]
    public async Task A_redirect_outside_the_allowed_ranges_is_refused_without_connecting()
    {
        await using var trap = await CivitaiSimulator.StartAsync(new CivitaiSimulatorOptions { ApiAddress = System.Net.IPAddress.Parse("127.0.0.2") });
        await using var h = await PipelineHarness.StartAsync(settings: new Dictionary<string, string?>
        {
            ["Network:AllowedPrivateRanges:0"] = "127.0.0.1/32",
        });
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(), baseModel: "Flux.1 D");
        version.File.Faults.RedirectTo = new Uri($"{trap.ApiBaseUrl}/file.safetensors");

        var reason = (await h.CreateAndWaitAsync("ssrf", PipelineHarness.ModelUrl(version))).AssertFailed();

        Assert.Contains("127.0.0.2", reason);
        Assert.Equal(0, trap.Connections);
    }

    [Fact]
    public async Task A_loopback_civitai_is_refused_before_any_request_when_no_range_is_allowed()
    {
        await using var h = await PipelineHarness.StartAsync(settings: new Dictionary<string, string?>
        {
            ["Network:AllowedPrivateRanges:0"] = null,
        });
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(), baseModel: "Flux.1 D");
        var reason = (await h.CreateAndWaitAsync("loopback", PipelineHarness.ModelUrl(version))).AssertFailed();
        Assert.Contains("Network:AllowedPrivateRanges", reason);
        Assert.Equal(0, h.Simulator.Connections);
    }

    [Fact]
    public async Task Twenty_concurrent_creates_of_one_version_download_once()
    {
        await using var h = await PipelineHarness.StartAsync();
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(rank: 16), baseModel: "Flux.1 D");
        version.File.Faults.ChunkDelay = TimeSpan.FromMilliseconds(5);
        var users = await Task.WhenAll(Enumerable.Range(0, 4).Select(_ => h.Server.CreateUserAsync("crowd")));

        var created = await Task.WhenAll(Enumerable.Range(0, 20).Select(i => h.CreateAsync($"same-{i}", PipelineHarness.ModelUrl(version), user: users[i % 4])));
        var finished = await Task.WhenAll(created.Select((d, i) => h.WaitAsync(d.GetProperty("deploy_id").GetString()!, users[i % 4])));

        Assert.All(finished, d => d.AssertDeploying());
        Assert.Equal(1, h.Simulator.DownloadsStarted(version.File.Id));
        Assert.Single(await h.Server.QueryAsync(db => db.Blobs.ToListAsync()));
    }

    [Fact]
    public async Task A_stored_version_skips_the_download()
    {
        await using var h = await PipelineHarness.StartAsync();
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(), baseModel: "Flux.1 D");
        (await h.CreateAndWaitAsync("first", PipelineHarness.ModelUrl(version))).AssertDeploying();
        (await h.CreateAndWaitAsync("second", PipelineHarness.ModelUrl(version))).AssertDeploying();
        Assert.Equal(1, h.Simulator.DownloadsStarted(version.File.Id));
    }

    [Fact]
    public async Task Progress_is_visible_while_downloading()
    {
        await using var h = await PipelineHarness.StartAsync();
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(rank: 16), baseModel: "Flux.1 D");
        version.File.Faults.ChunkDelay = TimeSpan.FromMilliseconds(100);
        var created = await h.CreateAsync("slow", PipelineHarness.ModelUrl(version));

        var seenPartial = false;
        var deadline = DateTime.UtcNow.AddSeconds(60);
        while (DateTime.UtcNow < deadline)
        {
            var lora = await h.LoraAsync("slow");
            var done = lora.GetProperty("downloaded_bytes").GetInt64();
            if (lora.GetProperty("status").GetString() == "downloading" && done > 0 && done < version.File.Content.Length)
            {
                Assert.Equal(version.File.Sha256, lora.GetProperty("version").GetString()); // listed hash shown early
                seenPartial = true;
                break;
            }
            await Task.Delay(50);
        }
        Assert.True(seenPartial, "never saw a partial downloaded_bytes while downloading");
        (await h.WaitAsync(created.GetProperty("deploy_id").GetString()!)).AssertDeploying();
    }

    [Fact]
    public async Task Deleting_during_the_download_cancels_it_and_removes_the_staging_file()
    {
        await using var h = await PipelineHarness.StartAsync();
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(rank: 16), baseModel: "Flux.1 D");
        version.File.Faults.ChunkDelay = TimeSpan.FromMilliseconds(200);
        var id = (await h.CreateAsync("cancel-me", PipelineHarness.ModelUrl(version))).GetProperty("deploy_id").GetString()!;
        var staging = Path.Combine(h.Server.DataDir, "blobs", "staging");

        await WaitUntilAsync(async () => (await h.Server.QueryAsync(db => db.Downloads.Select(d => d.BytesDone).FirstOrDefaultAsync())) > 0);
        await (await h.User.Client.DeleteAsync($"/deploy/{id}")).ExpectAsync(HttpStatusCode.OK);

        await WaitUntilAsync(async () => await h.Server.QueryAsync(db => db.Downloads.AnyAsync(d => d.Status == DownloadStatus.Cancelled)));
        Assert.Empty(Directory.GetFiles(staging));
        Assert.Equal(0, await h.Server.QueryAsync(db => db.Blobs.CountAsync()));
        Assert.Equal("deleted", (await (await h.User.Client.GetAsync($"/deploy/{id}")).ExpectAsync(HttpStatusCode.OK)).GetProperty("status").GetString());
    }

    [Fact]
    public async Task A_lora_for_another_architecture_fails_naming_both()
    {
        await using var h = await PipelineHarness.StartAsync();
        var version = h.Simulator.AddLora(AdapterFiles.Sdxl(), baseModel: "SDXL 1.0");
        var deploy = await h.CreateAndWaitAsync("wrong-base", PipelineHarness.ModelUrl(version), PipelineHarness.Flux);
        var reason = deploy.AssertFailed();
        Assert.Contains("SDXL", reason);
        Assert.Contains("FLUX.1", reason);
        Assert.Contains(PipelineHarness.Flux, reason);
        var lora = await h.LoraAsync("wrong-base");
        Assert.Equal("sdxl", lora.GetProperty("probe").GetProperty("architecture").GetString()); // the probe is kept to explain why
    }

    [Fact]
    public async Task A_civitai_label_that_disagrees_with_the_keys_is_a_warning_not_a_verdict()
    {
        await using var h = await PipelineHarness.StartAsync();
        var version = h.Simulator.AddLora(AdapterFiles.Sdxl(), baseModel: "Flux.1 D"); // mislabelled on CivitAI
        (await h.CreateAndWaitAsync("mislabelled", PipelineHarness.ModelUrl(version), PipelineHarness.Sdxl)).AssertDeploying();
        var lora = await h.LoraAsync("mislabelled");
        Assert.Contains(lora.GetProperty("warnings").EnumerateArray(), w => w.GetString()!.Contains("Flux.1 D"));
    }

    [Fact]
    public async Task A_token_in_the_pasted_url_is_never_stored()
    {
        await using var h = await PipelineHarness.StartAsync();
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(), baseModel: "Flux.1 D");
        await h.CreateAsync("tokened", $"https://civitai.com/api/download/models/{version.Id}?token=supersecret123");
        var lora = await h.LoraAsync("tokened");
        Assert.DoesNotContain("supersecret123", lora.GetRawText());
        Assert.DoesNotContain("supersecret123", await h.Server.QueryAsync(db => db.Loras.Select(l => l.SourceUrl).FirstAsync()));
    }

    [Fact]
    public async Task Unreferenced_blobs_are_collected_after_the_grace_period()
    {
        await using var h = await PipelineHarness.StartAsync(settings: new Dictionary<string, string?>
        {
            ["Pipeline:BlobGracePeriod"] = "00:00:00",
            ["Pipeline:CollectInterval"] = "00:00:00.200",
        });
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(), baseModel: "Flux.1 D");
        var other = h.Simulator.AddLora(AdapterFiles.Flux1(seed: 2), baseModel: "Flux.1 D");
        (await h.CreateAndWaitAsync("collect", PipelineHarness.ModelUrl(version))).AssertDeploying();
        (await h.CreateAndWaitAsync("dropped", PipelineHarness.ModelUrl(other))).AssertDeploying();
        var blob = Path.Combine(h.Server.DataDir, "blobs", "sha256", version.File.Sha256[..2], version.File.Sha256);
        var otherBlob = Path.Combine(h.Server.DataDir, "blobs", "sha256", other.File.Sha256[..2], other.File.Sha256);
        Assert.True(File.Exists(blob));

        // The collector has run once the other, unreferenced blob is gone; the referenced one must have survived it.
        await (await h.User.Client.DeleteAsync("/v1/lora/dropped")).ExpectAsync(HttpStatusCode.OK);
        await WaitUntilAsync(() => Task.FromResult(!File.Exists(otherBlob)));
        Assert.True(File.Exists(blob)); // still referenced

        await (await h.User.Client.DeleteAsync("/v1/lora/collect")).ExpectAsync(HttpStatusCode.OK);
        await WaitUntilAsync(() => Task.FromResult(!File.Exists(blob)));
        Assert.Equal(0, await h.Server.QueryAsync(db => db.Blobs.CountAsync()));
    }

    [Fact]
    public async Task A_download_that_failed_on_the_network_keeps_its_partial_file_and_starting_again_resumes_it()
    {
        await using var h = await PipelineHarness.StartAsync(settings: new Dictionary<string, string?>
        {
            ["Import:MaxResumeAttempts"] = "1",
            ["Import:MaxRetryAttempts"] = "1",
        });
        var content = AdapterFiles.Flux1(rank: 16);
        var version = h.Simulator.AddLora(content, baseModel: "Flux.1 D");
        // The first response slowly delivers a quarter and breaks; from then on storage only answers 503.
        version.File.Faults.ChunkDelay = TimeSpan.FromMilliseconds(100);
        version.File.Faults.DropAfterBytes = content.Length / 4;
        var staging = Path.Combine(h.Server.DataDir, "blobs", "staging");
        var id = (await h.CreateAsync("broken", PipelineHarness.ModelUrl(version))).GetProperty("deploy_id").GetString()!;
        await WaitUntilAsync(() => Task.FromResult(Directory.Exists(staging) && Directory.GetFiles(staging).Any(f => new FileInfo(f).Length > 0)));
        version.File.Faults.Storage503Times = 1000;

        var reason = (await h.WaitAsync(id)).AssertFailed();

        Assert.Contains(version.File.Id.ToString(System.Globalization.CultureInfo.InvariantCulture), reason);
        var kept = Assert.Single(Directory.GetFiles(staging));
        var keptBytes = new FileInfo(kept).Length;
        Assert.True(keptBytes > 0);

        // The host recovers; starting the deploy again goes on from the kept bytes instead of from zero.
        version.File.Faults.Storage503Times = 0;
        version.File.Faults.DropAfterBytes = null;
        version.File.Faults.ChunkDelay = TimeSpan.Zero;
        await (await h.User.Client.PostAsync($"/deploy/{id}/start", null)).ExpectAsync(HttpStatusCode.OK);
        (await h.WaitAsync(id)).AssertDeploying();
        Assert.Contains(new SimRangeRequest(version.File.Id, keptBytes), h.Simulator.RangeRequests);
        Assert.Empty(Directory.GetFiles(staging));
    }

    internal static async Task WaitUntilAsync(Func<Task<bool>> condition, int seconds = 30)
    {
        var deadline = DateTime.UtcNow.AddSeconds(seconds);
        while (!await condition())
        {
            Assert.True(DateTime.UtcNow < deadline, "condition not reached in time");
            await Task.Delay(50);
        }
    }
}
