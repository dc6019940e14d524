using System.Net;
using System.Text.Json;
using LoraDeploy.Data;
using LoraDeploy.Lora.Gguf;
using LoraDeploy.Lora.Tests.Support;
using LoraDeploy.Tests.Pipeline;
using LoraDeploy.Tests.Simulator;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Serving;

/// <summary>
/// <c>POST /lora-model</c>: a PEFT adapter from the (simulated) Hub, checked against the pool's base GGUF and converted
/// to a llama.cpp LoRA blob once, tracked on <c>/deploy/{id}</c>; every failure is a failed deploy with a reason.
/// </summary>
public sealed class LoraModelImportTests : IAsyncLifetime
{
    public const string Pool = "sim/tiny-llama";
    private readonly string _dir = Directory.CreateTempSubdirectory("lora-model-").FullName;
    private HuggingFaceSimulator _hub = null!;
    private LoraDeployServer _server = null!;
    private TestUser _user = null!;
    private TinyLlama _model = null!;

    public static Dictionary<string, string?> LlmPoolSettings(HuggingFaceSimulator hub, string gguf) => new()
    {
        [$"BaseModels:{Pool}:Family"] = "llama",
        [$"BaseModels:{Pool}:Engine"] = "llamacpp",
        [$"BaseModels:{Pool}:Gguf"] = gguf,
        ["HuggingFace:BaseUrl"] = hub.HubBaseUrl,
        ["Network:AllowedPrivateRanges:0"] = hub.AllowedRange,
        ["Import:RetryBaseDelay"] = "00:00:00.010",
        ["Import:MaxRetryAttempts"] = "2",
        ["Pipeline:PollInterval"] = "00:00:00.200",
        ["Workers:Embedded"] = "false",
    };

    public async ValueTask InitializeAsync()
    {
        _hub = await HuggingFaceSimulator.StartAsync();
        _model = new TinyLlama().Generate();
        var gguf = _model.WriteGguf(Path.Combine(_dir, "tiny.gguf"));
        _server = await LoraDeployServer.StartAsync(TestDatabase.Sqlite, LlmPoolSettings(_hub, gguf));
        _user = await _server.CreateUserAsync("llm");
    }

    public async ValueTask DisposeAsync()
    {
        await _server.DisposeAsync();
        await _hub.DisposeAsync();
        Directory.Delete(_dir, recursive: true);
    }

    private byte[] Weights(PeftAdapterFixture fixture) => fixture.Generate(_model).Safetensors().ToBytes();

    private async Task<JsonElement> CreateAsync(string repo, string name, string? token = null)
    {
        var response = await _user.Client.PostJsonAsync("/lora-model",
            new { hf_model_name = repo, lora_model_name = name, base_model_name = Pool, hf_token = token });
        return await response.ExpectAsync(HttpStatusCode.OK);
    }

    private async Task<JsonElement> SettledAsync(string deployId)
    {
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (true)
        {
            var deploy = await (await _user.Client.GetAsync($"/deploy/{deployId}")).ExpectAsync(HttpStatusCode.OK);
            if (deploy.GetProperty("status").GetString() is "deploying" or "running" or "failed")
            {
                return deploy;
            }
            Assert.True(DateTime.UtcNow < deadline, $"never settled: {deploy}");
            await Task.Delay(50);
        }
    }

    [Fact]
    public async Task A_peft_adapter_is_imported_converted_once_and_tracked_like_any_deploy()
    {
        var fixture = new PeftAdapterFixture { Rank = 4, Alpha = 8 };
        var weights = Weights(fixture);
        var repo = _hub.AddAdapter("alice/tiny-lora", weights, config: fixture.ConfigJson());

        var created = await CreateAsync("alice/tiny-lora", "tiny-lora");
        Assert.Equal("text-generation", created.GetProperty("task").GetString());
        Assert.Equal($"{_user.Name}/tiny-lora", created.GetProperty("model_name").GetString());
        var deploy = await SettledAsync(created.GetProperty("deploy_id").GetString()!);
        deploy.AssertDeploying();
        Assert.Equal(repo.Head, deploy.GetProperty("version").GetString());

        var adapter = await _server.QueryAsync(db => db.Loras.Where(l => l.Name == "tiny-lora").Select(l => l.Adapter!).SingleAsync());
        Assert.Equal(("llamacpp-gguf", "llama", "lora", 4), (adapter.Format, adapter.Architecture, adapter.Network, adapter.RankMax));
        Assert.StartsWith("peft-gguf:v1:", adapter.DerivedKey);
        // The derived blob is a llama.cpp LoRA GGUF for the base's architecture.
        var blob = Path.Combine(_server.DataDir, "blobs", "sha256", adapter.Sha256[..2], adapter.Sha256);
        var gguf = GgufReader.ReadFile(File.Exists(blob) ? blob : Directory.EnumerateFiles(_server.DataDir, adapter.Sha256, SearchOption.AllDirectories).Single());
        Assert.Equal("adapter", gguf.GetString("general.type"));
        Assert.Equal("llama", gguf.GetString("general.architecture"));

        // The same weights and config again (another name, even another repo): nothing converted or fetched again.
        _hub.AddAdapter("bob/copy", weights, config: fixture.ConfigJson());
        var fetchesBefore = _hub.Requests.Count(r => r.PathAndQuery.Contains("adapter_model.safetensors", StringComparison.Ordinal));
        var second = await SettledAsync((await CreateAsync("bob/copy", "copy")).GetProperty("deploy_id").GetString()!);
        second.AssertDeploying();
        Assert.Equal(fetchesBefore, _hub.Requests.Count(r => r.PathAndQuery.Contains("adapter_model.safetensors", StringComparison.Ordinal)));
        Assert.Equal(1, await _server.QueryAsync(db => db.Adapters.CountAsync(a => a.DerivedKey != null)));

        // Same weights, different config (rsLoRA): another conversion.
        var rs = new PeftAdapterFixture { Rank = 4, Alpha = 8, UseRslora = true };
        _hub.AddAdapter("carol/rs", Weights(rs), config: rs.ConfigJson());
        (await SettledAsync((await CreateAsync("carol/rs", "rs")).GetProperty("deploy_id").GetString()!)).AssertDeploying();
        Assert.Equal(2, await _server.QueryAsync(db => db.Adapters.CountAsync(a => a.DerivedKey != null)));

        var listed = await (await _user.Client.GetAsync("/deploy/list")).ExpectAsync(HttpStatusCode.OK);
        Assert.Contains(listed.EnumerateArray(), d => d.GetProperty("model_name").GetString() == $"{_user.Name}/tiny-lora");
        Assert.Equal(HttpStatusCode.OK, (await _user.Client.DeleteAsync("/lora-model/tiny-lora")).StatusCode);
        Assert.Equal("deleted", (await (await _user.Client.GetAsync($"/deploy/{created.GetProperty("deploy_id").GetString()}")).ExpectAsync(HttpStatusCode.OK)).GetProperty("status").GetString());
    }

    [Fact]
    public async Task Concurrent_imports_of_one_repo_download_its_weights_once()
    {
        var fixture = new PeftAdapterFixture { Seed = 9 };
        var files = HuggingFaceSimulator.AdapterFiles(Weights(fixture), fixture.ConfigJson());
        // The Hub answers the first weights request 429 (Retry-After 1 s): every create lands while that one fetch waits.
        var weights = files.Single(f => f.Path == "adapter_model.safetensors");
        weights.Faults.Resolve429Times = 1;
        weights.Faults.RetryAfterSeconds = 1;
        _hub.AddRepo("alice/popular").Commit(files);
        var ids = await Task.WhenAll(Enumerable.Range(0, 4).Select(async i => (await CreateAsync("alice/popular", $"popular-{i}")).GetProperty("deploy_id").GetString()!));
        foreach (var id in ids)
        {
            (await SettledAsync(id)).AssertDeploying();
        }
        Assert.Equal(1, _hub.Requests.Count(r => r.PathAndQuery.Contains("adapter_model.safetensors", StringComparison.Ordinal) && r.Status == 200));
        Assert.Equal(1, await _server.QueryAsync(db => db.Adapters.CountAsync(a => a.DerivedKey != null)));
    }

    [Fact]
    public async Task A_private_repo_uses_the_token_for_that_import_only_and_never_stores_it()
    {
        var fixture = new PeftAdapterFixture();
        var repo = _hub.AddAdapter("alice/private-lora", Weights(fixture), HfVisibility.Private, fixture.ConfigJson());
        repo.GrantedTokens.Add(_hub.ValidToken);

        var without = await SettledAsync((await CreateAsync("alice/private-lora", "no-token")).GetProperty("deploy_id").GetString()!);
        Assert.Contains("hf_token", without.AssertFailed());

        var with = await SettledAsync((await CreateAsync("alice/private-lora", "with-token", _hub.ValidToken)).GetProperty("deploy_id").GetString()!);
        with.AssertDeploying();
        // Not in any row, not in the database file at all.
        var files = Directory.EnumerateFiles(_server.DataDir, "*.db*", SearchOption.AllDirectories).ToList();
        Assert.NotEmpty(files);
        foreach (var file in files)
        {
            using var stream = new FileStream(file, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
            using var reader = new StreamReader(stream);
            Assert.DoesNotContain(_hub.ValidToken, await reader.ReadToEndAsync());
        }
        // Never sent to the storage host.
        Assert.DoesNotContain(_hub.Requests, r => r.Host.StartsWith("localhost", StringComparison.Ordinal) && r.HadAuthorization);
    }

    [Fact]
    public async Task Adapters_that_cannot_work_on_the_base_fail_with_a_reason_naming_both_sides()
    {
        var dora = new PeftAdapterFixture { ConfigOverrides = { ["use_dora"] = "true" } };
        _hub.AddAdapter("x/dora", Weights(dora), config: dora.ConfigJson());
        Assert.Contains("DoRA", (await SettledAsync((await CreateAsync("x/dora", "dora")).GetProperty("deploy_id").GetString()!)).AssertFailed());

        // An adapter made for a wider model: its shapes do not fit the tiny base.
        var wide = new TinyLlama { Hidden = 128, FeedForward = 256 }.Generate();
        var wideFixture = new PeftAdapterFixture();
        _hub.AddAdapter("x/wide", wideFixture.Generate(wide).Safetensors().ToBytes(), config: wideFixture.ConfigJson());
        var reason = (await SettledAsync((await CreateAsync("x/wide", "wide")).GetProperty("deploy_id").GetString()!)).AssertFailed();
        Assert.Contains("128", reason);
        Assert.Contains("64", reason);

        var notPeft = _hub.AddRepo("x/full-model");
        notPeft.Commit([new HfSimFile("config.json", "{}"u8.ToArray(), lfs: false), new HfSimFile("model.safetensors", new byte[64], lfs: true)]);
        Assert.Contains("full model", (await SettledAsync((await CreateAsync("x/full-model", "full")).GetProperty("deploy_id").GetString()!)).AssertFailed(),
            StringComparison.OrdinalIgnoreCase);
        // The Hub answers a missing repo like a private one (401 without a token): the reason says both.
        var missing = (await SettledAsync((await CreateAsync("x/missing", "missing")).GetProperty("deploy_id").GetString()!)).AssertFailed();
        Assert.Contains("x/missing", missing);
        Assert.Contains("private", missing);
    }

    [Fact]
    public async Task Bad_requests_are_422_naming_the_field()
    {
        async Task<string> Field(object body)
        {
            var detail = (await (await _user.Client.PostJsonAsync("/lora-model", body)).ExpectAsync(HttpStatusCode.UnprocessableEntity)).GetProperty("detail");
            return string.Join(".", detail[0].GetProperty("loc").EnumerateArray().Select(e => e.ToString()));
        }
        Assert.Equal("body.hf_model_name", await Field(new { lora_model_name = "a", base_model_name = Pool }));
        Assert.Equal("body.hf_model_name", await Field(new { hf_model_name = "not a repo!", lora_model_name = "a", base_model_name = Pool }));
        Assert.Equal("body.lora_model_name", await Field(new { hf_model_name = "a/b", lora_model_name = "../x", base_model_name = Pool }));
        Assert.Equal("body.base_model_name", await Field(new { hf_model_name = "a/b", lora_model_name = "a", base_model_name = PipelineHarness.Flux }));
        Assert.Equal("body.hf_token", await Field(new { hf_model_name = "a/b", lora_model_name = "a", hf_token = 42 }));
    }
}
