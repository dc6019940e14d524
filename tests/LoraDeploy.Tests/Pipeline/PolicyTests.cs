using System.Net;
using System.Text.Json;
using LoraDeploy.Tests.Dashboard;
using LoraDeploy.Tests.Simulator;

namespace LoraDeploy.Tests.Pipeline;

/// <summary>The license and content policy end to end: the real host, the CivitAI simulator's metadata, the API and CLI.</summary>
public sealed class PolicyTests
{
    private const int BlockedModelId = 770001;

    [Fact]
    public async Task Each_rule_refuses_the_model_that_breaks_it_and_records_its_terms()
    {
        await using var h = await PipelineHarness.StartAsync(settings: new Dictionary<string, string?>
        {
            ["Policy:RequireCommercialUse"] = "rentcivit",
            ["Policy:MaxNsfwLevel"] = "R",
            ["Policy:BlockedCreators:0"] = "Spammer",
            ["Policy:BlockedModels:0"] = BlockedModelId.ToString(),
        });
        var sim = h.Simulator;
        var noRent = Lora(sim, seed: 1);
        noRent.Model.AllowCommercialUse = "{Image}";
        var tooSpicy = Lora(sim, seed: 2);
        tooSpicy.NsfwLevel = 8;
        var spammer = Lora(sim, seed: 3);
        spammer.Model.Creator = "spammer";
        var blocked = sim.AddModel("Blocked", id: BlockedModelId).AddVersion("Flux.1 D");
        blocked.AddFile(AdapterFiles.Flux1(seed: 4), "blocked.safetensors", primary: true);
        var fine = Lora(sim, seed: 5);
        fine.NsfwLevel = 4;

        Assert.Equal("refused by policy: Policy:RequireCommercialUse is rentcivit, this model allows commercial use for Image, not RentCivit",
            (await h.CreateAndWaitAsync("no-rent", PipelineHarness.ModelUrl(noRent))).AssertFailed());
        Assert.Equal("refused by policy: Policy:MaxNsfwLevel is R, this model is rated X",
            (await h.CreateAndWaitAsync("spicy", PipelineHarness.ModelUrl(tooSpicy))).AssertFailed());
        Assert.Equal("refused by policy: Policy:BlockedCreators lists spammer, the creator of this model",
            (await h.CreateAndWaitAsync("spammer", PipelineHarness.ModelUrl(spammer))).AssertFailed());
        Assert.Equal($"refused by policy: Policy:BlockedModels lists CivitAI model {BlockedModelId}",
            (await h.CreateAndWaitAsync("blocked", PipelineHarness.ModelUrl(blocked))).AssertFailed());
        (await h.CreateAndWaitAsync("fine", PipelineHarness.ModelUrl(fine))).AssertDeploying();

        // A refused LoRA's bytes are never fetched; its terms are recorded and shown all the same.
        Assert.Equal(0, sim.DownloadEndpointHits(tooSpicy.File.Id));
        var refused = await h.LoraAsync("spicy");
        Assert.Equal(8, refused.GetProperty("nsfw_level").GetInt32());
        var failClass = await h.Server.QueryAsync(db => Task.FromResult(db.Deploys.Single(d => d.Id == refused.GetProperty("deploy_id").GetString()).FailClass));
        Assert.Equal("policy", failClass);

        var shown = await h.LoraAsync("fine");
        Assert.Equal(4, shown.GetProperty("nsfw_level").GetInt32());
        var license = shown.GetProperty("license");
        Assert.Equal(["Image", "RentCivit"], license.GetProperty("allow_commercial_use").EnumerateArray().Select(e => e.GetString()));
        Assert.True(license.GetProperty("allow_derivatives").GetBoolean());
        Assert.True(license.GetProperty("allow_different_license").GetBoolean());
        Assert.True(license.GetProperty("allow_no_credit").GetBoolean());
        Assert.Equal("simulated", license.GetProperty("creator").GetString());
        var status = await LoraDeployExe.RunAsync(["status", "fine", "--server", h.Server.BaseUrl.ToString(), "--token", h.User.Token]);
        Assert.True(status.ExitCode == 0, status.ToString());
        Assert.Contains("license      commercial use: Image, RentCivit; derivatives: yes; other license: yes; no credit needed: yes", status.StdOut);
        Assert.Contains("creator      simulated", status.StdOut);
        Assert.Contains("nsfw         R (level 4)", status.StdOut);
        var listed = await (await h.User.Client.GetAsync("/v1/user/loras")).ExpectAsync(HttpStatusCode.OK);
        Assert.Contains(listed.EnumerateArray(), l => l.GetProperty("lora_name").GetString() == "fine"
            && l.GetProperty("license").GetProperty("creator").GetString() == "simulated" && l.GetProperty("nsfw_level").GetInt32() == 4);
    }

    [Fact]
    public async Task Without_a_policy_anything_deploys()
    {
        await using var h = await PipelineHarness.StartAsync();
        var v = Lora(h.Simulator, seed: 1);
        v.NsfwLevel = 16;
        v.Model.AllowCommercialUse = "None";
        v.Model.Creator = "spammer";

        (await h.CreateAndWaitAsync("anything", PipelineHarness.ModelUrl(v))).AssertDeploying();

        var lora = await h.LoraAsync("anything");
        Assert.Empty(lora.GetProperty("license").GetProperty("allow_commercial_use").EnumerateArray());
    }

    [Fact]
    public async Task A_policy_tightened_after_a_deploy_refuses_its_start_naming_the_rule()
    {
        await using var h = await PipelineHarness.StartAsync();
        var v = Lora(h.Simulator, seed: 1);
        v.NsfwLevel = 8;
        var deployId = (await h.CreateAndWaitAsync("later", PipelineHarness.ModelUrl(v))).GetProperty("deploy_id").GetString()!;
        await (await h.User.Client.PostAsync($"/deploy/{deployId}/stop", null)).ExpectAsync(HttpStatusCode.OK);

        h.Server.ChangeSetting("Policy:MaxNsfwLevel", "PG13");
        await h.Server.RestartAsync();
        var client = h.Server.CreateClient(h.User.Token);
        var refused = await client.PostAsync($"/deploy/{deployId}/start", null);

        var error = await refused.ExpectAsync(HttpStatusCode.BadRequest);
        Assert.Equal($"Deploy {deployId} cannot be started: refused by policy: Policy:MaxNsfwLevel is PG13, this model is rated X.",
            error.GetProperty("error").GetString());
        var still = await (await client.GetAsync($"/deploy/{deployId}")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal("stopped", still.GetProperty("status").GetString());

        h.Server.ChangeSetting("Policy:MaxNsfwLevel", "X");
        await h.Server.RestartAsync();
        client = h.Server.CreateClient(h.User.Token);
        await (await client.PostAsync($"/deploy/{deployId}/start", null)).ExpectAsync(HttpStatusCode.OK);
    }

    [Fact]
    public async Task By_hash_lookup_found_not_found_malformed_and_the_cli()
    {
        await using var h = await PipelineHarness.StartAsync(settings: new Dictionary<string, string?> { ["Policy:MaxNsfwLevel"] = "PG13" });
        var v = h.Simulator.AddLora(AdapterFiles.Flux1(seed: 1), baseModel: "Flux.1 D", fileName: "Pixel Art (v2).safetensors", trainedWords: ["pixel art"]);
        v.NsfwLevel = 4;
        v.Model.Name = "Pixel Art";
        var file = Path.Combine(h.Server.DataDir, "downloaded.safetensors");
        await File.WriteAllBytesAsync(file, v.File.Content, TestContext.Current.CancellationToken);

        var found = await (await h.User.Client.GetAsync($"/v1/lora/civitai/by-hash/{v.File.Sha256.ToUpperInvariant()}")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(v.File.Sha256, found.GetProperty("sha256").GetString());
        Assert.Equal(v.Model.Id, found.GetProperty("model_id").GetInt32());
        Assert.Equal("Pixel Art", found.GetProperty("model_name").GetString());
        Assert.Equal(v.Id, found.GetProperty("version_id").GetInt32());
        Assert.Equal("Flux.1 D", found.GetProperty("base_model").GetString());
        Assert.Equal($"https://civitai.com/api/download/models/{v.Id}?fileId={v.File.Id}", found.GetProperty("civit_url").GetString());
        Assert.Equal("simulated", found.GetProperty("license").GetProperty("creator").GetString());
        Assert.Equal(4, found.GetProperty("nsfw_level").GetInt32());
        Assert.Equal("refused by policy: Policy:MaxNsfwLevel is PG13, this model is rated R", found.GetProperty("policy_refusal").GetString());

        var missing = await h.User.Client.GetAsync($"/v1/lora/civitai/by-hash/{new string('a', 64)}");
        Assert.Contains("CivitAI knows no published file", (await missing.ExpectAsync(HttpStatusCode.NotFound)).GetProperty("error").GetString());
        var checkpoint = h.Simulator.AddLora(AdapterFiles.Flux1(seed: 9), modelType: "Checkpoint");
        var notLora = await h.User.Client.GetAsync($"/v1/lora/civitai/by-hash/{checkpoint.File.Sha256}");
        Assert.Contains("is a Checkpoint, not a LoRA", (await notLora.ExpectAsync(HttpStatusCode.UnprocessableEntity)).GetProperty("error").GetString());
        var malformed = await h.User.Client.GetAsync("/v1/lora/civitai/by-hash/abc123");
        var detail = (await malformed.ExpectAsync(HttpStatusCode.UnprocessableEntity)).GetProperty("detail")[0];
        Assert.Equal(["path", "sha256"], detail.GetProperty("loc").EnumerateArray().Select(e => e.GetString()));

        // The CLI hashes the file itself and prints what to run; the create it prints works once the policy allows it.
        string[] server = ["--server", h.Server.BaseUrl.ToString(), "--token", h.User.Token];
        var cli = await LoraDeployExe.RunAsync(["lookup", file, .. server]);
        Assert.True(cli.ExitCode == 0, cli.ToString());
        Assert.Contains($"Pixel Art v1.0 (CivitAI model {v.Model.Id}, version {v.Id})", cli.StdOut);
        Assert.Contains("commercial use: Image, RentCivit; derivatives: yes", cli.StdOut);
        Assert.Contains("R (level 4)", cli.StdOut);
        Assert.Contains("Policy:MaxNsfwLevel is PG13", cli.StdOut);
        Assert.True(cli.StdOut.Contains($"loradeploy create --civitai 'https://civitai.com/api/download/models/{v.Id}?fileId={v.File.Id}' --name Pixel-Art--v2 --base MODEL", StringComparison.Ordinal), cli.ToString());

        var unknown = await LoraDeployExe.RunAsync(["lookup", new string('b', 64), .. server]);
        Assert.Equal(1, unknown.ExitCode);
        Assert.Contains($"CivitAI knows no published file with SHA-256 {new string('b', 64)}", unknown.StdErr);
        var bad = await LoraDeployExe.RunAsync(["lookup", "no-such-file.safetensors", .. server]);
        Assert.Equal(2, bad.ExitCode);
        Assert.Contains("neither a file nor a SHA-256", bad.StdErr);
    }

    private static SimVersion Lora(CivitaiSimulator sim, int seed) => sim.AddLora(AdapterFiles.Flux1(seed: seed), baseModel: "Flux.1 D");
}
