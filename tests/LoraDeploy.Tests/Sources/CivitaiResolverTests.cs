using LoraDeploy.Sources;
using LoraDeploy.Tests.Simulator;

namespace LoraDeploy.Tests.Sources;

public class CivitaiResolverTests
{
    [Fact]
    public async Task Picks_the_model_file_even_when_a_training_zip_is_listed_first()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var model = sim.AddModel("Pixel Art");
        var v = model.AddVersion("SDXL 1.0", trainedWords: ["pixel art", "8bit"]);
        v.AddTrainingData();
        var content = SimContent.Safetensors();
        var file = v.AddFile(content, "pixel-art.safetensors", primary: false);
        await using var h = new SourcesHarness(sim);

        // Pasted on another host: the API is still called at Civitai:BaseUrl (the simulator).
        var resolved = await h.ResolveOkAsync($"https://civitai.red/models/{model.Id}?modelVersionId={v.Id}");

        Assert.Equal(model.Id, resolved.ModelId);
        Assert.Equal(v.Id, resolved.VersionId);
        Assert.Equal(file.Id, resolved.FileId);
        Assert.Equal("pixel-art.safetensors", resolved.FileName);
        Assert.Equal(content.Length, resolved.ListedSizeBytes);
        Assert.Equal(file.Sha256, resolved.ListedSha256);
        Assert.Equal("SDXL 1.0", resolved.BaseModel);
        Assert.Equal(["pixel art", "8bit"], resolved.TrainedWords);
        Assert.Equal("LORA", resolved.ModelType);
        Assert.Equal(new Uri($"{sim.ApiBaseUrl}/api/download/models/{v.Id}?fileId={file.Id}"), resolved.DownloadUrl);
    }

    [Fact]
    public async Task Model_link_without_version_picks_the_newest_version_and_its_primary_safetensors()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var model = sim.AddModel(type: "LoCon");
        model.AddVersion("SD 1.5").AddFile(SimContent.Safetensors(seed: 1), primary: true);
        var newest = model.AddVersion("Illustrious");
        newest.AddTrainingData();
        newest.AddFile(SimContent.Safetensors(seed: 2), "old.ckpt", format: "PickleTensor");
        var wanted = newest.AddFile(SimContent.Safetensors(seed: 3), "new.safetensors", primary: true);
        await using var h = new SourcesHarness(sim);

        var resolved = await h.ResolveOkAsync($"https://civitai.com/models/{model.Id}/some-slug");

        Assert.Equal(newest.Id, resolved.VersionId);
        Assert.Equal(wanted.Id, resolved.FileId);
        Assert.Equal("Illustrious", resolved.BaseModel);
        Assert.Equal("LoCon", resolved.ModelType);
    }

    [Fact]
    public async Task Explicit_file_id_wins_over_the_primary_file()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var v = sim.AddLora(SimContent.Safetensors(seed: 1));
        var fp32 = v.AddFile(SimContent.Safetensors(seed: 2), "lora-fp32.safetensors", fp: "fp32");
        await using var h = new SourcesHarness(sim);

        var byDownloadLink = await h.ResolveOkAsync($"https://civitai.com/api/download/models/{v.Id}?fileId={fp32.Id}");
        var byAir = await h.ResolveOkAsync($"urn:air:sdxl:lora:civitai:{v.Model.Id}@{v.Id}+{fp32.Id}");
        var byVersion = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");

        Assert.Equal(fp32.Id, byDownloadLink.FileId);
        Assert.Equal(fp32.Id, byAir.FileId);
        Assert.Equal(v.File.Id, byVersion.FileId);
    }

    [Fact]
    public async Task Pickle_only_version_is_refused()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var v = sim.AddModel().AddVersion();
        v.AddFile(new byte[100], "lora.pt", format: "PickleTensor", primary: true);
        await using var h = new SourcesHarness(sim);

        var result = await h.ResolveAsync($"https://civitai.com/model-versions/{v.Id}");

        Assert.Equal(ReasonClass.PickleOnly, result.ReasonClass);
        Assert.Contains("PickleTensor", result.FailReason);
    }

    [Theory]
    [InlineData("Checkpoint")]
    [InlineData("TextualInversion")]
    [InlineData("lora")]
    public async Task Models_that_are_not_lora_family_are_refused(string type)
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var v = sim.AddLora(SimContent.Safetensors(), modelType: type);
        await using var h = new SourcesHarness(sim);

        var byModel = await h.ResolveAsync($"https://civitai.com/models/{v.Model.Id}");
        var byVersion = await h.ResolveAsync($"https://civitai.com/api/download/models/{v.Id}");

        Assert.Equal(ReasonClass.UnsupportedType, byModel.ReasonClass);
        Assert.Equal(ReasonClass.UnsupportedType, byVersion.ReasonClass);
        Assert.Contains($"is a {type}, not a LoRA", byModel.FailReason);
    }

    [Fact]
    public async Task Archived_and_taken_down_models_are_refused()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var archived = sim.AddLora(SimContent.Safetensors());
        archived.Model.Mode = "Archived";
        var takenDown = sim.AddLora(SimContent.Safetensors());
        takenDown.Model.Mode = "TakenDown";
        await using var h = new SourcesHarness(sim);

        var a1 = await h.ResolveAsync($"https://civitai.com/models/{archived.Model.Id}");
        var a2 = await h.ResolveAsync($"https://civitai.com/model-versions/{archived.Id}");
        var t = await h.ResolveAsync($"https://civitai.com/models/{takenDown.Model.Id}?modelVersionId={takenDown.Id}");

        Assert.Equal(ReasonClass.Unavailable, a1.ReasonClass);
        Assert.Contains("archived", a1.FailReason);
        Assert.Equal(ReasonClass.Unavailable, a2.ReasonClass);
        Assert.Equal(ReasonClass.Unavailable, t.ReasonClass);
        Assert.Contains("taken down", t.FailReason);
    }

    [Fact]
    public async Task Early_access_is_refused_from_the_json_without_a_token_and_from_the_403_with_one()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var v = sim.AddLora(SimContent.Safetensors());
        v.EarlyAccessEndsAt = DateTimeOffset.UtcNow.AddDays(3);
        var url = $"https://civitai.com/model-versions/{v.Id}";

        await using (var anonymous = new SourcesHarness(sim))
        {
            var result = await anonymous.ResolveAsync(url);
            Assert.Equal(ReasonClass.EarlyAccess, result.ReasonClass);
            Assert.Contains("Early Access until", result.FailReason);
        }
        Assert.Equal(0, sim.DownloadEndpointHits(v.File.Id));

        await using (var withToken = new SourcesHarness(sim, token: sim.ValidToken))
        {
            var result = await withToken.ResolveAsync(url);
            Assert.Equal(ReasonClass.EarlyAccess, result.ReasonClass);
            Assert.Contains(sim.Requests, r => r.Status == 403 && r.PathAndQuery.StartsWith("/api/download/models/", StringComparison.Ordinal));

            v.EarlyAccessBought = true;
            Assert.True((await withToken.ResolveAsync(url)).Succeeded);
        }
    }

    [Fact]
    public async Task Missing_unpublished_and_unrated_versions_are_not_found()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var unpublished = sim.AddLora(SimContent.Safetensors());
        unpublished.Status = "Unpublished";
        var unrated = sim.AddLora(SimContent.Safetensors());
        unrated.NsfwLevel = 0;
        await using var h = new SourcesHarness(sim);

        foreach (var url in new[]
                 {
                     "https://civitai.com/model-versions/999999",
                     "https://civitai.com/models/999999",
                     $"https://civitai.com/model-versions/{unpublished.Id}",
                     $"https://civitai.com/model-versions/{unrated.Id}",
                     $"https://civitai.com/api/download/models/{unrated.Id}?fileId=1",
                 })
        {
            var result = await h.ResolveAsync(url);
            Assert.Equal(ReasonClass.NotFound, result.ReasonClass);
            Assert.False(string.IsNullOrWhiteSpace(result.FailReason));
        }
    }

    [Fact]
    public async Task Version_and_model_must_agree()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var a = sim.AddLora(SimContent.Safetensors());
        var b = sim.AddLora(SimContent.Safetensors());
        await using var h = new SourcesHarness(sim);

        var result = await h.ResolveAsync($"https://civitai.com/models/{a.Model.Id}?modelVersionId={b.Id}");

        Assert.Equal(ReasonClass.NotFound, result.ReasonClass);
        Assert.Contains($"belongs to model {b.Model.Id}", result.FailReason);
    }

    [Fact]
    public async Task Login_required_download_needs_the_token_and_the_token_goes_to_civitai_only()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var v = sim.AddLora(SimContent.Safetensors());
        v.RequireAuth = true;
        var url = $"https://civitai.com/models/{v.Model.Id}?modelVersionId={v.Id}";

        await using (var anonymous = new SourcesHarness(sim))
        {
            var result = await anonymous.ResolveAsync(url);
            Assert.Equal(ReasonClass.AuthRequired, result.ReasonClass);
            Assert.Equal($"CivitAI requires a login to download version {v.Id}; set Civitai:Token", result.FailReason);
        }
        Assert.Equal(0, sim.ApiRequestsWithAuthorization);

        await using (var wrongToken = new SourcesHarness(sim, token: "not-the-key"))
        {
            var result = await wrongToken.ResolveAsync(url);
            Assert.Equal(ReasonClass.AuthRequired, result.ReasonClass);
            Assert.Contains("did not accept Civitai:Token", result.FailReason);
        }

        await using (var withToken = new SourcesHarness(sim, token: sim.ValidToken))
        {
            var file = await withToken.ResolveOkAsync(url);
            Assert.DoesNotContain(sim.ValidToken, file.DownloadUrl.ToString(), StringComparison.Ordinal);
            var download = await withToken.Downloader.DownloadAsync(file, withToken.Blobs, withToken.StagingName, null, TestContext.Current.CancellationToken);
            Assert.Equal(v.File.Sha256, download.Sha256);
        }
        Assert.True(sim.ApiRequestsWithAuthorization > 0);
        Assert.Equal(0, sim.StorageRequestsWithAuthorization);
        Assert.All(sim.Requests.Where(r => r.Host == "storage"), r => Assert.InRange(r.Status, 200, 299));
        Assert.All(sim.Requests, r => Assert.Equal("LoraDeploy/0.1", r.UserAgent));
    }

    [Fact]
    public async Task Disabled_downloads_are_reported_as_unavailable()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var v = sim.AddLora(SimContent.Safetensors());
        v.DownloadsDisabled = true;
        await using var h = new SourcesHarness(sim, token: sim.ValidToken);

        var result = await h.ResolveAsync($"https://civitai.com/model-versions/{v.Id}");

        Assert.Equal(ReasonClass.Unavailable, result.ReasonClass);
        Assert.Contains("disabled downloads", result.FailReason);
    }

    [Fact]
    public async Task Rate_limited_api_is_retried_then_reported()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var v = sim.AddLora(SimContent.Safetensors());
        v.File.Faults.Download429Times = 100;
        await using var h = new SourcesHarness(sim);

        var result = await h.ResolveAsync($"https://civitai.com/model-versions/{v.Id}");

        Assert.Equal(ReasonClass.RateLimited, result.ReasonClass);
        Assert.Equal(4, sim.DownloadEndpointHits(v.File.Id)); // 1 attempt + Import:MaxRetryAttempts (3)
    }
}

public class CivitaiResolverRetryTests
{
    [Fact]
    public async Task Api_503_and_429_are_retried()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var v = sim.AddLora(SimContent.Safetensors());
        sim.Api503Times = 1;
        sim.Api429Times = 1;
        await using var h = new SourcesHarness(sim);

        var file = await h.ResolveOkAsync($"https://civitai.com/models/{v.Model.Id}");

        Assert.Equal(v.File.Id, file.FileId);
        Assert.Equal(3, sim.Requests.Count(r => r.PathAndQuery.StartsWith("/api/v1/", StringComparison.Ordinal)));
    }

    [Fact]
    public async Task Api_down_for_good_is_reported_as_upstream_error()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var v = sim.AddLora(SimContent.Safetensors());
        sim.Api503Times = 100;
        await using var h = new SourcesHarness(sim);

        var result = await h.ResolveAsync($"https://civitai.com/model-versions/{v.Id}");

        Assert.Equal(ReasonClass.Upstream, result.ReasonClass);
        Assert.Contains("503", result.FailReason);
    }

    [Fact]
    public async Task Nothing_listening_is_a_network_failure()
    {
        int port;
        using (var probe = new System.Net.Sockets.TcpListener(System.Net.IPAddress.Loopback, 0))
        {
            probe.Start();
            port = ((System.Net.IPEndPoint)probe.LocalEndpoint).Port;
        }
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        await using var h = new SourcesHarness(sim, extra: new() { ["Civitai:BaseUrl"] = $"http://127.0.0.1:{port}", ["Import:MaxRetryAttempts"] = "1" });

        var result = await h.ResolveAsync("https://civitai.com/model-versions/1");

        Assert.Equal(ReasonClass.Network, result.ReasonClass);
        Assert.Contains($"http://127.0.0.1:{port}/", result.FailReason);
    }
}
