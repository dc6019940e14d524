using System.Net;
using System.Text.Json;
using LoraDeploy.Auth;
using LoraDeploy.Tests.Pipeline;

namespace LoraDeploy.Tests.Serving;

/// <summary>
/// <c>MaxAdaptersPerWorker</c> counts adapters (bytes) pinned on a worker, not deploys: two deploys of the same file share
/// one copy there, so the second needs no room of its own; a different file past the cap waits, pending.
/// </summary>
public sealed class PlacementCapTests : IAsyncLifetime
{
    private const string Pool = PipelineHarness.Flux;
    private PipelineHarness _h = null!;
    private FakeWorker? _worker;

    public async ValueTask InitializeAsync()
    {
        var settings = ServingCoreTests.PoolSettings();
        settings[$"BaseModels:{Pool}:MaxAdaptersPerWorker"] = "1";
        _h = await PipelineHarness.StartAsync(settings: settings);
    }

    public async ValueTask DisposeAsync()
    {
        if (_worker is not null)
        {
            await _worker.DisposeAsync();
        }
        await _h.DisposeAsync();
    }

    private async Task<string> DeployAsync(string name, int seed)
    {
        var version = _h.Simulator.AddLora(AdapterFiles.Flux1(seed: seed), baseModel: "Flux.1 D");
        var id = (await _h.CreateAsync(name, PipelineHarness.ModelUrl(version))).GetProperty("deploy_id").GetString()!;
        await _h.WaitAsync(id);
        return id;
    }

    private async Task<JsonElement> WaitForAsync(string deployId, Func<JsonElement, bool> done, string what)
    {
        var deadline = DateTime.UtcNow.AddSeconds(20);
        while (true)
        {
            var deploy = await (await _h.User.Client.GetAsync($"/deploy/{deployId}")).ExpectAsync(HttpStatusCode.OK);
            if (done(deploy))
            {
                return deploy;
            }
            Assert.True(DateTime.UtcNow < deadline, $"Deploy {deployId} never {what}: {deploy}");
            await Task.Delay(50);
        }
    }

    [Fact]
    public async Task Deploys_of_the_same_adapter_share_one_place_under_the_cap_and_another_adapter_waits()
    {
        var first = await DeployAsync("same-a", seed: 7);
        var second = await DeployAsync("same-b", seed: 7); // another CivitAI version with the very same bytes
        var other = await DeployAsync("other", seed: 8);
        var token = await _h.Server.QueryAsync(db => WorkerTokens.CreateAsync(db, "gpu-box", DateTime.UtcNow, CancellationToken.None));
        _worker = await FakeWorker.StartAsync(_h.Server.BaseUrl, token, "w1", Pool);

        static bool Running(JsonElement d) => d.GetProperty("status").GetString() == "running" && d.GetProperty("instances").GetProperty("running").GetInt32() == 1;
        await WaitForAsync(first, Running, "ran");
        await WaitForAsync(second, Running, "ran beside the first on its one copy");
        var waiting = await WaitForAsync(other, d => d.GetProperty("instances").GetProperty("pending").GetInt32() == 1, "counted as pending");
        Assert.Equal("deploying", waiting.GetProperty("status").GetString());
        Assert.Single(_worker.Resident);
    }
}
