using System.Text;
using LoraDeploy.Sources;
using LoraDeploy.Tests.Simulator;

namespace LoraDeploy.Tests.Sources;

public class HuggingFaceResolverTests
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public async Task Public_adapter_resolves_to_its_commit_with_sizes_hashes_and_pinned_urls()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var weights = SimContent.Safetensors(100_000);
        var repo = sim.AddAdapter("owner/adapter", weights);
        var files = repo.Files(repo.Head);
        await using var h = new HuggingFaceHarness(sim);

        var a = await h.ResolveOkAsync("owner/adapter");

        Assert.Equal("owner/adapter", a.RepoId);
        Assert.Null(a.Revision);
        Assert.Equal(repo.Head, a.Commit);
        Assert.False(a.IsPrivate);
        Assert.Null(a.Gated);
        Assert.Equal("sim/tiny-llama", a.CardBaseModel);
        Assert.Equal(weights.Length, a.Weights.SizeBytes);
        Assert.Equal(files["adapter_model.safetensors"].Sha256, a.Weights.Sha256);
        Assert.Equal(new Uri($"{sim.HubBaseUrl}/owner/adapter/resolve/{repo.Head}/adapter_model.safetensors"), a.Weights.DownloadUrl);
        Assert.Equal(files["adapter_config.json"].Content.Length, a.Config.SizeBytes);
        Assert.Null(a.Config.Sha256); // a git file, not LFS
        Assert.Equal(files["adapter_config.json"].BlobId, a.Config.GitBlobId);
        Assert.Equal(new Uri($"{sim.HubBaseUrl}/owner/adapter/resolve/{repo.Head}/adapter_config.json"), a.Config.DownloadUrl);
        Assert.Contains(sim.Requests, r => r.PathAndQuery == "/api/models/owner/adapter?blobs=true");

        var config = await h.Client.FetchConfigAsync(a, null, Ct);

        Assert.True(config.Succeeded, config.FailReason);
        Assert.Equal(files["adapter_config.json"].Content, config.Bytes);
    }

    [Fact]
    public async Task A_tag_or_tree_link_pins_the_commit_it_names_not_main()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var repo = sim.AddRepo("owner/adapter");
        var first = repo.Commit(HuggingFaceSimulator.AdapterFiles(SimContent.Safetensors(seed: 1)));
        repo.Tag("v1", first);
        var second = repo.Commit(HuggingFaceSimulator.AdapterFiles(SimContent.Safetensors(seed: 2)));
        await using var h = new HuggingFaceHarness(sim);

        var byTag = await h.ResolveOkAsync("owner/adapter@v1");
        var byTree = await h.ResolveOkAsync($"{sim.HubBaseUrl}/owner/adapter/tree/v1");
        var byCommit = await h.ResolveOkAsync($"owner/adapter@{first}");
        var byDefault = await h.ResolveOkAsync("https://huggingface.co/owner/adapter");

        Assert.Equal(first, byTag.Commit);
        Assert.Equal("v1", byTag.Revision);
        Assert.Contains($"/resolve/{first}/", byTag.Weights.DownloadUrl.AbsolutePath);
        Assert.Equal(repo.Files(first)["adapter_model.safetensors"].Sha256, byTag.Weights.Sha256);
        Assert.Equal(first, byTree.Commit);
        Assert.Equal(first, byCommit.Commit);
        Assert.Equal(second, byDefault.Commit);
        Assert.Contains(sim.Requests, r => r.PathAndQuery == "/api/models/owner/adapter/revision/v1?blobs=true");
    }

    [Fact]
    public async Task A_bin_only_repo_is_refused_as_pickle_without_downloading()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var repo = sim.AddRepo("owner/old-adapter");
        repo.Commit(
        [
            new HfSimFile("adapter_config.json", Encoding.UTF8.GetBytes(HuggingFaceSimulator.PeftConfig()), lfs: false),
            new HfSimFile("adapter_model.bin", [0x80, 0x02, (byte)'}', (byte)'q', 0x00, (byte)'.'], lfs: true),
        ]);
        await using var h = new HuggingFaceHarness(sim);

        var result = await h.ResolveAsync("owner/old-adapter");

        Assert.Equal(ReasonClass.PickleOnly, result.ReasonClass);
        Assert.Equal("Hugging Face repo owner/old-adapter has its adapter weights only as adapter_model.bin, a pickle file that can run code when loaded, so it was not downloaded; ask its author for adapter_model.safetensors (PEFT's default format), or convert it and import a repo of your own", result.FailReason);
        Assert.DoesNotContain(sim.Requests, r => r.Host == "storage" || r.PathAndQuery.Contains("/resolve/", StringComparison.Ordinal));
    }

    [Fact]
    public async Task A_full_model_repo_is_named_as_one()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var repo = sim.AddRepo("owner/tiny-llama");
        repo.LibraryName = "transformers";
        repo.Commit(
        [
            new HfSimFile("config.json", Encoding.UTF8.GetBytes("{\"model_type\":\"llama\"}"), lfs: false),
            new HfSimFile("model.safetensors", SimContent.Safetensors(), lfs: true),
            new HfSimFile("tokenizer.json", Encoding.UTF8.GetBytes("{}"), lfs: false),
        ]);
        await using var h = new HuggingFaceHarness(sim);

        var result = await h.ResolveAsync("owner/tiny-llama");

        Assert.Equal(ReasonClass.UnsupportedType, result.ReasonClass);
        Assert.Equal("Hugging Face repo owner/tiny-llama is not a PEFT adapter: it has no adapter_config.json; it looks like a full model (library transformers, task text-generation): config.json with model weights, not a LoRA adapter. Give a repo holding adapter_config.json and adapter_model.safetensors", result.FailReason);
    }

    [Fact]
    public async Task Adapters_in_subfolders_are_named()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var repo = sim.AddRepo("owner/runs");
        repo.Commit(HuggingFaceSimulator.AdapterFiles(SimContent.Safetensors()).Select(f => new HfSimFile("checkpoint-500/" + f.Path, f.Content, f.Lfs)));
        await using var h = new HuggingFaceHarness(sim);

        var result = await h.ResolveAsync("owner/runs");

        Assert.Equal(ReasonClass.UnsupportedType, result.ReasonClass);
        Assert.Contains("keeps adapters in subfolders (checkpoint-500/adapter_config.json)", result.FailReason);
    }

    [Fact]
    public async Task Weights_without_a_config_or_a_config_without_weights_are_refused()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var files = HuggingFaceSimulator.AdapterFiles(SimContent.Safetensors());
        sim.AddRepo("owner/no-config").Commit(files.Where(f => f.Path != "adapter_config.json"));
        sim.AddRepo("owner/no-weights").Commit(files.Where(f => f.Path != "adapter_model.safetensors"));
        await using var h = new HuggingFaceHarness(sim);

        var noConfig = await h.ResolveAsync("owner/no-config");
        var noWeights = await h.ResolveAsync("owner/no-weights");

        Assert.Equal(ReasonClass.UnsupportedType, noConfig.ReasonClass);
        Assert.Contains("has adapter_model.safetensors but no adapter_config.json", noConfig.FailReason);
        Assert.Equal(ReasonClass.NotFound, noWeights.ReasonClass);
        Assert.Contains("has adapter_config.json but no adapter_model.safetensors", noWeights.FailReason);
    }

    [Fact]
    public async Task Private_repo_without_a_token_asks_for_hf_token()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        sim.AddAdapter("owner/secret", SimContent.Safetensors(), HfVisibility.Private);
        await using var h = new HuggingFaceHarness(sim);

        var result = await h.ResolveAsync("owner/secret");

        Assert.Equal(ReasonClass.AuthRequired, result.ReasonClass);
        Assert.Equal("Hugging Face repo owner/secret is private or gated, or does not exist (the Hub answers 401 to anonymous requests for all three): give an hf_token with access to it", result.FailReason);
    }

    [Fact]
    public async Task Private_repo_with_a_token_that_cannot_see_it_is_not_found()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        sim.AddAdapter("owner/secret", SimContent.Safetensors(), HfVisibility.Private);
        await using var h = new HuggingFaceHarness(sim);

        var result = await h.ResolveAsync("owner/secret", sim.OtherToken);

        Assert.Equal(ReasonClass.NotFound, result.ReasonClass);
        Assert.Equal("Hugging Face repo owner/secret does not exist, or the account of hf_token cannot see it; check the name and the token", result.FailReason);
    }

    [Fact]
    public async Task Private_repo_with_its_token_resolves_and_the_token_goes_to_the_hub()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var repo = sim.AddAdapter("owner/secret", SimContent.Safetensors(), HfVisibility.Private);
        await using var h = new HuggingFaceHarness(sim);

        var a = await h.ResolveOkAsync("owner/secret", "  " + sim.ValidToken + "\n");
        var config = await h.Client.FetchConfigAsync(a, sim.ValidToken, Ct);

        Assert.True(a.IsPrivate);
        Assert.Equal(repo.Head, a.Commit);
        Assert.True(config.Succeeded, config.FailReason);
        Assert.Equal(2, sim.RequestsCarrying("hub", sim.ValidToken));
    }

    [Fact]
    public async Task An_invalid_token_is_named_as_the_problem()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        sim.AddAdapter("owner/adapter", SimContent.Safetensors());
        await using var h = new HuggingFaceHarness(sim);

        var result = await h.ResolveAsync("owner/adapter", "hf_notARealToken");

        Assert.Equal(ReasonClass.AuthRequired, result.ReasonClass);
        Assert.Equal("the Hugging Face Hub did not accept hf_token while looking up owner/adapter (401: Invalid credentials in Authorization header); check that the token is valid and not expired", result.FailReason);
    }

    [Fact]
    public async Task A_token_with_spaces_inside_is_refused_without_repeating_it()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        sim.AddAdapter("owner/adapter", SimContent.Safetensors());
        await using var h = new HuggingFaceHarness(sim);

        var result = await h.ResolveAsync("owner/adapter", "hf_abc def");

        Assert.Equal(ReasonClass.AuthRequired, result.ReasonClass);
        Assert.Equal("hf_token contains spaces or characters no Hugging Face token has; paste the token (hf_…) exactly", result.FailReason);
        Assert.Empty(sim.Requests);
    }

    [Fact]
    public async Task Gated_repo_without_a_token_asks_for_one_with_access()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        sim.AddAdapter("owner/gated", SimContent.Safetensors(), HfVisibility.Gated);
        await using var h = new HuggingFaceHarness(sim);

        var result = await h.ResolveAsync("owner/gated");

        Assert.Equal(ReasonClass.AuthRequired, result.ReasonClass);
        Assert.Equal($"Hugging Face repo owner/gated is gated: give an hf_token of an account that has been granted access (ask for it at {sim.HubBaseUrl}/owner/gated)", result.FailReason);
    }

    [Fact]
    public async Task Gated_repo_with_a_token_not_granted_says_where_to_ask_for_access()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        sim.AddAdapter("owner/gated", SimContent.Safetensors(), HfVisibility.Gated);
        await using var h = new HuggingFaceHarness(sim);
        var expected = $"access to the gated Hugging Face repo owner/gated has not been granted to the account of hf_token; visit {sim.HubBaseUrl}/owner/gated to ask for access, then try again";

        var a = await h.ResolveOkAsync("owner/gated", sim.OtherToken);
        var config = await h.Client.FetchConfigAsync(a, sim.OtherToken, Ct);
        var download = await Assert.ThrowsAsync<DownloadFailedException>(() => h.DownloadAsync(a, sim.OtherToken));

        Assert.Equal("manual", a.Gated);
        Assert.Equal(ReasonClass.AuthRequired, config.ReasonClass);
        Assert.Equal(expected, config.FailReason);
        Assert.Equal(ReasonClass.AuthRequired, download.ReasonClass);
        Assert.Equal(expected, download.FailReason);
        Assert.Contains(sim.Requests, r => r.Status == 403 && r.Host == "hub");
        Assert.DoesNotContain(sim.Requests, r => r.Host == "storage");
    }

    [Fact]
    public async Task Gated_repo_with_a_granted_token_downloads()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var weights = SimContent.Safetensors();
        sim.AddAdapter("owner/gated", weights, HfVisibility.Gated);
        await using var h = new HuggingFaceHarness(sim);

        var a = await h.ResolveOkAsync("owner/gated", sim.ValidToken);
        var config = await h.Client.FetchConfigAsync(a, sim.ValidToken, Ct);
        var result = await h.DownloadAsync(a, sim.ValidToken);

        Assert.True(config.Succeeded, config.FailReason);
        Assert.Equal(a.Weights.Sha256, result.Sha256);
        Assert.Equal(weights.Length, result.Bytes);
    }

    [Fact]
    public async Task Missing_repo_revision_and_file_are_each_named()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var repo = sim.AddAdapter("owner/adapter", SimContent.Safetensors());
        await using var h = new HuggingFaceHarness(sim);

        var noRepo = await h.ResolveAsync("owner/nothing-here", sim.OtherToken);
        var noRepoAnonymous = await h.ResolveAsync("owner/nothing-here");
        var noRevision = await h.ResolveAsync("owner/adapter@nope");
        var a = await h.ResolveOkAsync("owner/adapter");
        repo.Files(repo.Head)["adapter_config.json"].Faults.EntryNotFound = true;
        var noFile = await h.Client.FetchConfigAsync(a, null, Ct);

        Assert.Equal(ReasonClass.NotFound, noRepo.ReasonClass);
        Assert.Contains("owner/nothing-here does not exist, or the account of hf_token cannot see it", noRepo.FailReason);
        Assert.Equal(ReasonClass.AuthRequired, noRepoAnonymous.ReasonClass);
        Assert.Equal(ReasonClass.NotFound, noRevision.ReasonClass);
        Assert.Equal("Hugging Face repo owner/adapter has no revision 'nope'; give an existing branch, tag or commit after '@'", noRevision.FailReason);
        Assert.Equal(ReasonClass.NotFound, noFile.ReasonClass);
        Assert.Equal($"Hugging Face repo owner/adapter has no file adapter_config.json at commit {repo.Head}", noFile.FailReason);
    }

    [Fact]
    public async Task Rate_limit_once_with_retry_after_is_retried()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        sim.AddAdapter("owner/adapter", SimContent.Safetensors());
        sim.Api429Times = 1;
        sim.ApiRetryAfterSeconds = 1;
        await using var h = new HuggingFaceHarness(sim);

        var a = await h.ResolveOkAsync("owner/adapter");

        Assert.NotNull(a.Commit);
        Assert.Equal([429, 200], sim.Requests.Where(r => r.PathAndQuery.StartsWith("/api/", StringComparison.Ordinal)).Select(r => r.Status));
    }

    [Theory]
    [InlineData(429, ReasonClass.RateLimited, "the Hugging Face Hub is rate-limiting requests (429) while looking up owner/adapter; try again later")]
    [InlineData(503, ReasonClass.Upstream, "the Hugging Face Hub answered 503 while looking up owner/adapter; try again later")]
    public async Task Rate_limit_or_outage_that_persists_says_try_again_later(int status, string reasonClass, string reason)
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        sim.AddAdapter("owner/adapter", SimContent.Safetensors());
        if (status == 429)
        {
            sim.Api429Times = 100;
        }
        else
        {
            sim.Api503Times = 100;
        }
        await using var h = new HuggingFaceHarness(sim);

        var result = await h.ResolveAsync("owner/adapter");

        Assert.Equal(reasonClass, result.ReasonClass);
        Assert.Equal(reason, result.FailReason);
        Assert.Equal(1 + 3, sim.Requests.Count(r => r.Status == status)); // 1 + Import:MaxRetryAttempts
    }

    [Fact]
    public async Task A_renamed_repo_is_followed_on_the_hub_with_the_token()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var repo = sim.AddAdapter("owner/new-name", SimContent.Safetensors(), HfVisibility.Private);
        sim.Rename("owner/old-name", "owner/new-name");
        await using var h = new HuggingFaceHarness(sim);

        var a = await h.ResolveOkAsync("owner/old-name", sim.ValidToken);
        var config = await h.Client.FetchConfigAsync(a, sim.ValidToken, Ct);

        Assert.Equal(repo.Head, a.Commit);
        Assert.Equal("owner/new-name", a.RepoId);
        Assert.Equal(new Uri($"{sim.HubBaseUrl}/owner/new-name/resolve/{repo.Head}/adapter_config.json"), a.Config.DownloadUrl);
        Assert.True(config.Succeeded, config.FailReason);
        Assert.Single(sim.Requests, r => r.Status == 307); // the config link already uses the new name
        Assert.Contains(sim.Requests, r => r.Status == 307 && r.HadAuthorization);
        Assert.Contains(sim.Requests, r => r.Status == 200 && r.PathAndQuery.StartsWith("/api/models/owner/new-name", StringComparison.Ordinal) && r.HadAuthorization);
    }

    [Fact]
    public async Task Weights_over_import_max_file_bytes_are_refused_at_resolve()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        sim.AddAdapter("owner/adapter", SimContent.Safetensors(200_000));
        await using var h = new HuggingFaceHarness(sim, new() { ["Import:MaxFileBytes"] = "100000" });

        var result = await h.ResolveAsync("owner/adapter");

        Assert.Equal(ReasonClass.TooLarge, result.ReasonClass);
        Assert.Contains("over Import:MaxFileBytes (100000); raise the limit to import it", result.FailReason);
    }

    [Fact]
    public async Task A_config_listed_over_one_mebibyte_is_refused_at_resolve()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var huge = "{\"peft_type\": \"LORA\", \"pad\": \"" + new string('x', HuggingFaceClient.MaxConfigBytes) + "\"}";
        sim.AddAdapter("owner/adapter", SimContent.Safetensors(), config: huge);
        await using var h = new HuggingFaceHarness(sim);

        var result = await h.ResolveAsync("owner/adapter");

        Assert.Equal(ReasonClass.TooLarge, result.ReasonClass);
        Assert.Equal($"adapter_config.json of Hugging Face repo owner/adapter is {huge.Length} bytes; a PEFT config is a few KiB and at most 1048576 bytes are read", result.FailReason);
    }

    [Fact]
    public async Task A_config_served_larger_than_the_cap_is_not_read_whole()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var repo = sim.AddAdapter("owner/adapter", SimContent.Safetensors());
        await using var h = new HuggingFaceHarness(sim);
        var a = await h.ResolveOkAsync("owner/adapter");
        repo.Files(repo.Head)["adapter_config.json"].Faults.ServeInstead = new byte[3 * 1024 * 1024];

        var result = await h.Client.FetchConfigAsync(a, null, Ct);

        Assert.Equal(ReasonClass.TooLarge, result.ReasonClass);
        Assert.Equal("adapter_config.json of Hugging Face repo owner/adapter is larger than 1048576 bytes; a PEFT config is a few KiB", result.FailReason);
    }

    [Fact]
    public async Task A_config_that_is_not_the_listed_blob_is_refused()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var repo = sim.AddAdapter("owner/adapter", SimContent.Safetensors());
        await using var h = new HuggingFaceHarness(sim);
        var a = await h.ResolveOkAsync("owner/adapter");
        var listed = repo.Files(repo.Head)["adapter_config.json"];
        var swapped = (byte[])listed.Content.Clone();
        swapped[^2] = (byte)' '; // same length, another blob
        listed.Faults.ServeInstead = swapped;

        var result = await h.Client.FetchConfigAsync(a, null, Ct);

        Assert.Equal(ReasonClass.HashMismatch, result.ReasonClass);
        Assert.Contains($"do not match the {listed.Content.Length}-byte file the Hub lists at commit {repo.Head}", result.FailReason);
    }

    [Fact]
    public async Task A_config_that_is_not_a_json_object_is_refused()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        sim.AddAdapter("owner/list", SimContent.Safetensors(), config: "[1, 2]");
        sim.AddAdapter("owner/garbage", SimContent.Safetensors(), config: "peft_type = LORA");
        await using var h = new HuggingFaceHarness(sim);

        var list = await h.Client.FetchConfigAsync(await h.ResolveOkAsync("owner/list"), null, Ct);
        var garbage = await h.Client.FetchConfigAsync(await h.ResolveOkAsync("owner/garbage"), null, Ct);

        Assert.Equal(ReasonClass.UnsupportedType, list.ReasonClass);
        Assert.Equal("adapter_config.json of Hugging Face repo owner/list is not a JSON object, so it is not a PEFT config", list.FailReason);
        Assert.Equal(ReasonClass.UnsupportedType, garbage.ReasonClass);
        Assert.StartsWith("adapter_config.json of Hugging Face repo owner/garbage is not valid JSON (", garbage.FailReason);
    }

    [Fact]
    public async Task A_repo_listing_over_import_max_api_body_bytes_is_not_read_whole()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        var extra = Enumerable.Range(0, 50).Select(i => new HfSimFile($"samples/sample-{i:D3}.txt", [(byte)i], lfs: false));
        sim.AddRepo("owner/adapter").Commit(HuggingFaceSimulator.AdapterFiles(SimContent.Safetensors()).Concat(extra));
        await using var h = new HuggingFaceHarness(sim, new() { ["Import:MaxApiBodyBytes"] = "2048" });

        var result = await h.ResolveAsync("owner/adapter");

        Assert.Equal(ReasonClass.Upstream, result.ReasonClass);
        Assert.StartsWith("the Hugging Face Hub's answer about owner/adapter was larger than Import:MaxApiBodyBytes (2048 bytes)", result.FailReason);
    }

    [Fact]
    public async Task A_hub_at_a_refused_address_names_the_setting()
    {
        await using var sim = await HuggingFaceSimulator.StartAsync(cancellationToken: Ct);
        sim.AddAdapter("owner/adapter", SimContent.Safetensors());
        await using var h = new HuggingFaceHarness(sim, new() { ["Network:AllowedPrivateRanges:0"] = "10.0.0.0/8" });

        var result = await h.ResolveAsync("owner/adapter");

        Assert.Equal(ReasonClass.Refused, result.ReasonClass);
        Assert.Contains("HuggingFace:BaseUrl is contacted only at public addresses or ones listed in Network:AllowedPrivateRanges", result.FailReason);
        Assert.Empty(sim.Requests);
    }
}
