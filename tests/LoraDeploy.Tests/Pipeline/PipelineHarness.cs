using System.Net;
using System.Text.Json;
using LoraDeploy.Tests.Simulator;

namespace LoraDeploy.Tests.Pipeline;

/// <summary>A CivitAI simulator plus a real LoraDeploy host pointed at it, with short timings so tests are quick.</summary>
public sealed class PipelineHarness : IAsyncDisposable
{
    public const string Flux = "black-forest-labs/FLUX-1-dev";
    public const string Sdxl = "stabilityai/stable-diffusion-xl-base-1.0";

    private PipelineHarness(CivitaiSimulator simulator, LoraDeployServer server, TestUser user)
    {
        Simulator = simulator;
        Server = server;
        User = user;
    }

    public CivitaiSimulator Simulator { get; }
    public LoraDeployServer Server { get; }
    public TestUser User { get; }

    public static Dictionary<string, string?> FastSettings() => new()
    {
        ["Pipeline:PollInterval"] = "00:00:00.200",
        ["Pipeline:LeaseDuration"] = "00:00:03",
        ["Pipeline:ProgressInterval"] = "00:00:00.100",
        ["Import:RetryBaseDelay"] = "00:00:00.050",
        ["Import:RetryMaxDelay"] = "00:00:02",
        ["Import:AttemptTimeout"] = "00:00:10",
    };

    /// <summary>A private <c>CreateLoraApiRequest</c> for a CivitAI URL.</summary>
    public static object CreateBody(string name, string url, string baseModel = Flux) => new
    {
        lora_name = name,
        base_model = baseModel,
        source = new { type = "civitai", civit_url = url },
        @private = true,
    };

    /// <summary>Fast pipeline timings plus the simulator's settings: what a server (in-process or a child process) needs.</summary>
    public static Dictionary<string, string?> ServerSettings(CivitaiSimulator simulator, bool withToken = false)
    {
        var settings = FastSettings();
        foreach (var (key, value) in simulator.Configuration(withToken))
        {
            settings[key] = value;
        }
        return settings;
    }

    public static async Task<PipelineHarness> StartAsync(
        bool withToken = false,
        IDictionary<string, string?>? settings = null,
        TestDatabase database = TestDatabase.Sqlite,
        CivitaiSimulatorOptions? simulatorOptions = null)
    {
        var simulator = await CivitaiSimulator.StartAsync(simulatorOptions);
        var all = ServerSettings(simulator, withToken);
        foreach (var (key, value) in settings ?? new Dictionary<string, string?>())
        {
            all[key] = value;
        }
        var server = await LoraDeployServer.StartAsync(database, all);
        return new PipelineHarness(simulator, server, await server.CreateUserAsync("importer"));
    }

    public static string ModelUrl(SimVersion version) => $"https://civitai.com/models/{version.Model.Id}?modelVersionId={version.Id}";

    public async Task<JsonElement> CreateAsync(string name, string url, string baseModel = Flux, TestUser? user = null)
    {
        var response = await (user ?? User).Client.PostJsonAsync("/v1/lora/create", CreateBody(name, url, baseModel));
        return await response.ExpectAsync(HttpStatusCode.OK);
    }

    /// <summary>Polls the deploy until it leaves initializing/downloading (or reaches <paramref name="until"/>).</summary>
    public async Task<JsonElement> WaitAsync(string deployId, TestUser? user = null, string? until = null, TimeSpan? timeout = null)
    {
        var client = (user ?? User).Client;
        var deadline = DateTime.UtcNow + (timeout ?? TimeSpan.FromSeconds(60));
        while (true)
        {
            var deploy = await (await client.GetAsync($"/deploy/{deployId}")).ExpectAsync(HttpStatusCode.OK);
            var status = deploy.GetProperty("status").GetString();
            if (until is null ? status is not ("initializing" or "downloading") : status == until || status == "failed")
            {
                return deploy;
            }
            if (DateTime.UtcNow > deadline)
            {
                Assert.Fail($"Deploy {deployId} still {status} after the timeout: {deploy}");
            }
            await Task.Delay(50);
        }
    }

    public async Task<JsonElement> CreateAndWaitAsync(string name, string url, string baseModel = Flux)
    {
        var created = await CreateAsync(name, url, baseModel);
        return await WaitAsync(created.GetProperty("deploy_id").GetString()!);
    }

    public async Task<JsonElement> LoraAsync(string name, TestUser? user = null) =>
        await (await (user ?? User).Client.GetAsync($"/v1/lora/{name}")).ExpectAsync(HttpStatusCode.OK);

    public async ValueTask DisposeAsync()
    {
        await Server.DisposeAsync();
        await Simulator.DisposeAsync();
    }
}

public static class DeployAssertions
{
    public static void AssertDeploying(this JsonElement deploy) =>
        Assert.True(deploy.GetProperty("status").GetString() == "deploying", $"Expected deploying: {deploy}");

    /// <summary>Asserts a failure and returns its reason, which must be a readable sentence.</summary>
    public static string AssertFailed(this JsonElement deploy)
    {
        Assert.True(deploy.GetProperty("status").GetString() == "failed", $"Expected failed: {deploy}");
        var reason = deploy.GetProperty("fail_reason").GetString()!;
        Assert.True(reason.Length > 20, $"fail_reason should be a sentence: '{reason}'");
        return reason;
    }
}
