using System.Net;
using System.Text.Json;
using LoraDeploy.Data;
using LoraDeploy.Tests.Pipeline;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Tests.Quotas;

/// <summary>Per-user quotas on the real host: exact edges, per-user overrides, and no overshoot under parallel creates.</summary>
public sealed class QuotaTests
{
    /// <summary>The pipeline off: every deploy stays <c>initializing</c>, so only the create path is under test.</summary>
    private static Dictionary<string, string?> NoPipeline(params (string Key, string Value)[] quotas)
    {
        var settings = new Dictionary<string, string?> { ["Pipeline:Enabled"] = "false" };
        foreach (var (key, value) in quotas)
        {
            settings[key] = value;
        }
        return settings;
    }

    private static object Body(string name, int versionId = 1) =>
        PipelineHarness.CreateBody(name, $"https://civitai.com/models/1?modelVersionId={versionId}");

    private static async Task<JsonElement> QuotaOf(TestUser user) =>
        await (await user.Client.GetAsync("/v1/me/quota")).ExpectAsync(HttpStatusCode.OK);

    [Fact]
    public async Task Max_deploys_the_last_one_fits_the_next_is_refused_and_a_delete_makes_room()
    {
        await using var server = await LoraDeployServer.StartAsync(settings: NoPipeline(("Quotas:MaxDeploys", "2")));
        var user = await server.CreateUserAsync();

        var first = await (await user.Client.PostJsonAsync("/v1/lora/create", Body("one"))).ExpectAsync(HttpStatusCode.OK);
        await (await user.Client.PostJsonAsync("/v1/lora/create", Body("two"))).ExpectAsync(HttpStatusCode.OK);
        var refused = await (await user.Client.PostJsonAsync("/v1/lora/create", Body("three"))).ExpectErrorAsync(HttpStatusCode.Forbidden);

        Assert.Equal("Quota max_deploys reached: you have 2 of 2 deploys (failed ones count until deleted). "
            + "Delete a deploy you no longer need, or ask the operator to raise your Quotas:MaxDeploys.", refused);
        Assert.Equal(2, await server.QueryAsync(db => db.Deploys.CountAsync()));
        var quota = await QuotaOf(user);
        Assert.Equal(2, quota.GetProperty("max_deploys").GetInt32());
        Assert.Equal(2, quota.GetProperty("deploys").GetInt32());
        Assert.Equal(JsonValueKind.Null, quota.GetProperty("max_stored_bytes").ValueKind);
        Assert.Equal(JsonValueKind.Null, quota.GetProperty("max_concurrent_imports").ValueKind);

        // A failed deploy still counts; a deleted one does not.
        var firstId = first.GetProperty("deploy_id").GetString()!;
        await server.QueryAsync(db => db.Deploys.Where(d => d.Id == firstId).ExecuteUpdateAsync(set => set.SetProperty(d => d.Status, DeployStatus.Failed)));
        await (await user.Client.PostJsonAsync("/v1/lora/create", Body("three"))).ExpectErrorAsync(HttpStatusCode.Forbidden);
        await (await user.Client.DeleteAsync($"/deploy/{firstId}")).ExpectAsync(HttpStatusCode.OK);
        await (await user.Client.PostJsonAsync("/v1/lora/create", Body("three"))).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(2, (await QuotaOf(user)).GetProperty("deploys").GetInt32());
    }

    [Fact]
    public async Task Max_concurrent_imports_counts_deploys_before_deploying_on_both_create_routes()
    {
        await using var server = await LoraDeployServer.StartAsync(settings: NoPipeline(("Quotas:MaxConcurrentImports", "2"),
            ("BaseModels:acme/llm:Family", "llama"), ("BaseModels:acme/llm:Engine", "llamacpp"), ("BaseModels:acme/llm:Gguf", "/models/llm.gguf"),
            ("Workers:Embedded", "false"))); // a pool for the route only: nothing serves it
        var user = await server.CreateUserAsync();

        var first = await (await user.Client.PostJsonAsync("/v1/lora/create", Body("one"))).ExpectAsync(HttpStatusCode.OK);
        await (await user.Client.PostJsonAsync("/v1/lora/create", Body("two"))).ExpectAsync(HttpStatusCode.OK);
        var refused = await (await user.Client.PostJsonAsync("/v1/lora/create", Body("three"))).ExpectErrorAsync(HttpStatusCode.Forbidden);
        Assert.Equal("Quota max_concurrent_imports reached: 2 of 2 imports are still running. "
            + "Wait for one to finish, delete one, or ask the operator to raise your Quotas:MaxConcurrentImports.", refused);
        // The Hugging Face route creates an import too, and is held to the same quota.
        var viaHub = await user.Client.PostJsonAsync("/lora-model", new { hf_model_name = "someone/adapter", lora_model_name = "llm", base_model_name = "acme/llm" });
        Assert.Equal(refused, await viaHub.ExpectErrorAsync(HttpStatusCode.Forbidden));

        // An import that is done (deploying) no longer counts; a deleted one neither.
        var firstId = first.GetProperty("deploy_id").GetString()!;
        await server.QueryAsync(db => db.Deploys.Where(d => d.Id == firstId).ExecuteUpdateAsync(set => set.SetProperty(d => d.Status, DeployStatus.Deploying)));
        var quota = await QuotaOf(user);
        Assert.Equal(1, quota.GetProperty("concurrent_imports").GetInt32());
        Assert.Equal(2, quota.GetProperty("max_concurrent_imports").GetInt32());
        await (await user.Client.PostJsonAsync("/v1/lora/create", Body("three"))).ExpectAsync(HttpStatusCode.OK);
        await (await user.Client.PostJsonAsync("/v1/lora/create", Body("four"))).ExpectErrorAsync(HttpStatusCode.Forbidden);

        // Starting a failed import again is an import too.
        await server.QueryAsync(db => db.Deploys.Where(d => d.Id == firstId).ExecuteUpdateAsync(set => set.SetProperty(d => d.Status, DeployStatus.Failed)));
        Assert.Equal($"Deploy {firstId} cannot be started: {refused}",
            await (await user.Client.PostAsync($"/deploy/{firstId}/start", null)).ExpectErrorAsync(HttpStatusCode.BadRequest));
        var two = await server.QueryAsync(db => db.Deploys.Where(d => d.ModelName.EndsWith("/two")).Select(d => d.Id).SingleAsync());
        await (await user.Client.DeleteAsync($"/deploy/{two}")).ExpectAsync(HttpStatusCode.OK);
        await (await user.Client.PostAsync($"/deploy/{firstId}/start", null)).ExpectAsync(HttpStatusCode.OK);
    }

    [Fact]
    public async Task A_per_user_override_beats_the_default_and_other_users_are_unaffected()
    {
        var alice = $"alice-{Guid.NewGuid().ToString("N")[..8]}";
        await using var server = await LoraDeployServer.StartAsync(settings: NoPipeline(
            ("Quotas:MaxDeploys", "1"), ("Quotas:MaxConcurrentImports", "5"), ($"Quotas:Users:{alice}:MaxDeploys", "3")));
        var aliceToken = await server.CreateTokenAsync(alice);
        var aliceUser = new TestUser(alice, aliceToken, server.CreateClient(aliceToken));
        var bob = await server.CreateUserAsync("bob");

        await (await bob.Client.PostJsonAsync("/v1/lora/create", Body("b1"))).ExpectAsync(HttpStatusCode.OK);
        for (var i = 1; i <= 3; i++)
        {
            await (await aliceUser.Client.PostJsonAsync("/v1/lora/create", Body($"a{i}"))).ExpectAsync(HttpStatusCode.OK);
        }
        Assert.Contains("3 of 3 deploys", await (await aliceUser.Client.PostJsonAsync("/v1/lora/create", Body("a4"))).ExpectErrorAsync(HttpStatusCode.Forbidden));
        Assert.Contains("1 of 1 deploys", await (await bob.Client.PostJsonAsync("/v1/lora/create", Body("b2"))).ExpectErrorAsync(HttpStatusCode.Forbidden));

        var aliceQuota = await QuotaOf(aliceUser);
        Assert.Equal(3, aliceQuota.GetProperty("max_deploys").GetInt32());
        Assert.Equal(3, aliceQuota.GetProperty("deploys").GetInt32());
        Assert.Equal(5, aliceQuota.GetProperty("max_concurrent_imports").GetInt32()); // not overridden: the default
        var bobQuota = await QuotaOf(bob);
        Assert.Equal(1, bobQuota.GetProperty("max_deploys").GetInt32());
        Assert.Equal(1, bobQuota.GetProperty("deploys").GetInt32());
    }

    [Fact]
    public async Task A_hugging_face_import_is_held_to_the_stored_bytes_by_its_converted_size_and_a_refused_one_holds_nothing()
    {
        var dir = Directory.CreateTempSubdirectory("quota-hf-").FullName;
        try
        {
            await using var hub = await Simulator.HuggingFaceSimulator.StartAsync();
            var model = new LoraDeploy.Lora.Tests.Support.TinyLlama().Generate();
            var settings = Serving.LoraModelImportTests.LlmPoolSettings(hub, model.WriteGguf(Path.Combine(dir, "tiny.gguf")));
            settings["Quotas:MaxStoredBytes"] = "1000"; // the converted GGUF is larger: only its real size shows it
            await using var server = await LoraDeployServer.StartAsync(TestDatabase.Sqlite, settings);
            var user = await server.CreateUserAsync("hf-quota");
            var fixture = new LoraDeploy.Lora.Tests.Support.PeftAdapterFixture { Rank = 4, Alpha = 8 };
            hub.AddAdapter("alice/tiny-lora", fixture.Generate(model).Safetensors().ToBytes(), config: fixture.ConfigJson());

            var created = await (await user.Client.PostJsonAsync("/lora-model",
                new { hf_model_name = "alice/tiny-lora", lora_model_name = "tiny-lora", base_model_name = Serving.LoraModelImportTests.Pool }))
                .ExpectAsync(HttpStatusCode.OK);
            var id = created.GetProperty("deploy_id").GetString()!;
            var deadline = DateTime.UtcNow.AddSeconds(30);
            JsonElement deploy;
            while ((deploy = await (await user.Client.GetAsync($"/deploy/{id}")).ExpectAsync(HttpStatusCode.OK)).GetProperty("status").GetString() is "initializing" or "downloading")
            {
                Assert.True(DateTime.UtcNow < deadline, $"never settled: {deploy}");
                await Task.Delay(50);
            }
            var reason = deploy.AssertFailed();
            Assert.StartsWith("Quota max_stored_bytes exceeded: with this file your LoRAs would use ", reason);
            Assert.Equal(0, (await QuotaOf(user)).GetProperty("stored_bytes").GetInt64());
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public async Task An_upload_counts_its_size_at_create_and_nothing_when_the_user_already_has_that_file()
    {
        var content = AdapterFiles.Flux1(seed: 61);
        await using var h = await PipelineHarness.StartAsync(settings: new Dictionary<string, string?>
        {
            ["Quotas:MaxStoredBytes"] = (content.Length + content.Length / 2).ToString(),
        });
        var first = await UploadTests.UploadAsync(h, "uploaded", content);
        (await h.WaitAsync(first.GetProperty("deploy_id").GetString()!)).AssertDeploying();
        // The same bytes again add nothing: one file, counted once.
        var again = await UploadTests.UploadAsync(h, "uploaded-again", content);
        (await h.WaitAsync(again.GetProperty("deploy_id").GetString()!)).AssertDeploying();
        Assert.Equal(content.Length, (await QuotaOf(h.User)).GetProperty("stored_bytes").GetInt64());

        // Another file of that size does not fit: refused at create, with its size, and no LoRA row for it.
        var other = AdapterFiles.Flux1(seed: 62);
        var refused = await (await h.User.Client.PostAsync("/v1/lora/create", UploadTests.Form(UploadTests.CreateJson("too-much"), other), TestContext.Current.CancellationToken))
            .ExpectErrorAsync(HttpStatusCode.Forbidden);
        Assert.Equal($"Quota max_stored_bytes exceeded: this file is {other.Length} bytes and your LoRAs already use {content.Length} of "
            + $"{content.Length + content.Length / 2} bytes. Delete a LoRA you no longer need, or ask the operator to raise your Quotas:MaxStoredBytes.", refused);
        Assert.False(await h.Server.QueryAsync(db => db.Loras.AnyAsync(l => l.Name == "too-much")));
    }

    [Theory]
    [InlineData(TestDatabase.Sqlite)]
    [InlineData(TestDatabase.Postgres)]
    public async Task Max_stored_bytes_counts_one_file_once_and_fails_an_import_that_does_not_fit_naming_the_quota(TestDatabase database)
    {
        long size = AdapterFiles.Flux1(seed: 1).Length;
        var tight = $"tight-{Guid.NewGuid().ToString("N")[..8]}";

        await using var h = await PipelineHarness.StartAsync(database: database, settings: new Dictionary<string, string?>
        {
            // Room for one file and a half: the second LoRA of the same file fits, another file does not.
            ["Quotas:MaxStoredBytes"] = (size + size / 2).ToString(),
            [$"Quotas:Users:{tight}:MaxStoredBytes"] = size.ToString(),
        });
        var first = h.Simulator.AddLora(AdapterFiles.Flux1(seed: 1), baseModel: "Flux.1 D");
        var second = h.Simulator.AddLora(AdapterFiles.Flux1(seed: 2), baseModel: "Flux.1 D");
        Assert.Equal(size, first.File.Content.Length);

        (await h.CreateAndWaitAsync("first", PipelineHarness.ModelUrl(first))).AssertDeploying();
        (await h.CreateAndWaitAsync("same-file", PipelineHarness.ModelUrl(first))).AssertDeploying();
        var quota = await QuotaOf(h.User);
        Assert.Equal(size, quota.GetProperty("stored_bytes").GetInt64());
        Assert.Equal(size + size / 2, quota.GetProperty("max_stored_bytes").GetInt64());

        var reason = (await h.CreateAndWaitAsync("too-much", PipelineHarness.ModelUrl(second))).AssertFailed();
        Assert.Equal($"Quota max_stored_bytes exceeded: with this file your LoRAs would use {2L * size} of {size + size / 2} bytes "
            + "(each distinct file counted once, imports in progress by their listed size). "
            + "Delete a LoRA you no longer need, or ask the operator to raise your Quotas:MaxStoredBytes.", reason);
        Assert.Equal(0, h.Simulator.DownloadEndpointHits(second.File.Id)); // refused before any byte moved
        Assert.Equal(size, (await QuotaOf(h.User)).GetProperty("stored_bytes").GetInt64()); // a failed import holds nothing

        // A user whose stored files already fill the quota is refused at create: no new file can fit.
        var tightToken = await h.Server.CreateTokenAsync(tight);
        var tightUser = new TestUser(tight, tightToken, h.Server.CreateClient(tightToken));
        var created = await h.CreateAsync("fills-it", PipelineHarness.ModelUrl(first), user: tightUser);
        (await h.WaitAsync(created.GetProperty("deploy_id").GetString()!, tightUser)).AssertDeploying();
        var refused = await (await tightUser.Client.PostJsonAsync("/v1/lora/create", PipelineHarness.CreateBody("more", PipelineHarness.ModelUrl(second))))
            .ExpectErrorAsync(HttpStatusCode.Forbidden);
        Assert.Equal($"Quota max_stored_bytes exceeded: your LoRAs already use {size} of {size} bytes, so no new file fits. "
            + "Delete a LoRA you no longer need, or ask the operator to raise your Quotas:MaxStoredBytes.", refused);

        // Deleting the LoRA frees its bytes.
        await (await tightUser.Client.DeleteAsync($"/deploy/{created.GetProperty("deploy_id").GetString()}")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(0, (await QuotaOf(tightUser)).GetProperty("stored_bytes").GetInt64());
        await (await tightUser.Client.PostJsonAsync("/v1/lora/create", PipelineHarness.CreateBody("more", PipelineHarness.ModelUrl(second))))
            .ExpectAsync(HttpStatusCode.OK);
    }

    [Theory]
    [InlineData(TestDatabase.Sqlite)]
    [InlineData(TestDatabase.Postgres)]
    public async Task Two_imports_resolved_at_once_cannot_together_overshoot_the_stored_bytes(TestDatabase database)
    {
        long size = AdapterFiles.Flux1(seed: 1).Length;
        await using var h = await PipelineHarness.StartAsync(database: database, settings: new Dictionary<string, string?>
        {
            ["Quotas:MaxStoredBytes"] = (size + size / 2).ToString(),
        });
        var urls = Enumerable.Range(1, 4)
            .Select(seed => PipelineHarness.ModelUrl(h.Simulator.AddLora(AdapterFiles.Flux1(seed: seed), baseModel: "Flux.1 D")))
            .ToList();

        // Created together, so the pipeline resolves them in one batch: each one's listed size counts while it is in flight.
        var created = await Task.WhenAll(urls.Select((url, i) => h.CreateAsync($"racer-{i}", url)));
        var ended = await Task.WhenAll(created.Select(c => h.WaitAsync(c.GetProperty("deploy_id").GetString()!)));

        var statuses = ended.Select(d => d.GetProperty("status").GetString()).ToList();
        Assert.True(statuses.Count(s => s == "deploying") == 1, string.Join(", ", ended.Select(d => d.ToString())));
        Assert.All(ended.Where(d => d.GetProperty("status").GetString() == "failed"),
            d => Assert.StartsWith("Quota max_stored_bytes exceeded", d.GetProperty("fail_reason").GetString()));
        Assert.Equal(size, (await QuotaOf(h.User)).GetProperty("stored_bytes").GetInt64());
    }

    [Theory]
    [InlineData(TestDatabase.Sqlite)]
    [InlineData(TestDatabase.Postgres)]
    public async Task Twenty_parallel_creates_with_max_deploys_5_accept_exactly_5(TestDatabase database)
    {
        await using var server = await LoraDeployServer.StartAsync(database, NoPipeline(("Quotas:MaxDeploys", "5")));
        var user = await server.CreateUserAsync();

        var statuses = await Task.WhenAll(Enumerable.Range(0, 20).Select(async i =>
            (await user.Client.PostJsonAsync("/v1/lora/create", Body($"parallel-{i}"))).StatusCode));

        Assert.Equal(5, statuses.Count(s => s == HttpStatusCode.OK));
        Assert.Equal(15, statuses.Count(s => s == HttpStatusCode.Forbidden));
        Assert.Equal(5, await server.QueryAsync(db => db.Deploys.CountAsync()));
    }

    [Fact]
    public async Task A_negative_limit_stops_the_server_at_start_naming_the_key()
    {
        var failure = await Assert.ThrowsAsync<OptionsValidationException>(() =>
            LoraDeployServer.StartAsync(settings: NoPipeline(("Quotas:Users:carol:MaxStoredBytes", "-1"))));
        Assert.Contains("Quotas:Users:carol:MaxStoredBytes must be 0 or more", failure.Message);
    }
}
