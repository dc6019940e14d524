using System.Diagnostics;
using System.Net;
using System.Text.Json;
using LoraDeploy.Auth;
using LoraDeploy.BaseModels;
using LoraDeploy.Data;
using LoraDeploy.Tests.Pipeline;
using LoraDeploy.Tests.Workers;
using LoraDeploy.Workers.Host;
using Microsoft.AspNetCore.Builder;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Serving;

/// <summary>
/// The server wakes a worker it gave something to do: a real worker app (with <see cref="TestEchoEngine"/>) on a
/// heartbeat period far longer than the test, so only the wake can bring the placement to it in time.
/// </summary>
public sealed class WorkerWakeTests : IAsyncLifetime
{
    private const int HeartbeatSeconds = 60;
    private PipelineHarness _h = null!;
    private WebApplication _worker = null!;
    private TestEchoEngine _engine = null!;
    private readonly string _dataDir = Path.Combine(Path.GetTempPath(), "loradeploy-tests", Guid.NewGuid().ToString("N"));

    public async ValueTask InitializeAsync()
    {
        var settings = ServingCoreTests.PoolSettings();
        settings["Workers:HeartbeatSeconds"] = HeartbeatSeconds.ToString(System.Globalization.CultureInfo.InvariantCulture);
        settings["Workers:TimeoutSeconds"] = "600";
        _h = await PipelineHarness.StartAsync(settings: settings);
        var token = await _h.Server.QueryAsync(db => WorkerTokens.CreateAsync(db, "gpu-box", DateTime.UtcNow, CancellationToken.None));
        var args = settings.Where(s => s.Key.StartsWith("BaseModels:", StringComparison.Ordinal))
            .Select(s => $"--{s.Key}={s.Value}")
            .Concat(["--urls", "http://127.0.0.1:0", $"--DataDir={_dataDir}", $"--Worker:Server={_h.Server.BaseUrl}", $"--Worker:Token={token}"])
            .ToArray();
        _engine = new TestEchoEngine(Engines.ComfyUi);
        _worker = WorkerHost.Build(args, [_engine], builder => builder.Logging.AddFilter("Microsoft", LogLevel.Warning));
        await _worker.StartAsync();
        await Eventually.TrueAsync(() => _h.Server.QueryAsync(db => db.Workers.AnyAsync()), "the worker registers");
    }

    public async ValueTask DisposeAsync()
    {
        await _worker.StopAsync();
        await _worker.DisposeAsync();
        await _h.DisposeAsync();
        try
        {
            Directory.Delete(_dataDir, recursive: true);
        }
        catch (IOException)
        {
        }
    }

    [Fact]
    public async Task A_placement_reaches_a_worker_without_waiting_for_its_heartbeat_period()
    {
        var version = _h.Simulator.AddLora(AdapterFiles.Flux1(seed: 31), baseModel: "Flux.1 D");
        var clock = Stopwatch.StartNew();
        var id = (await _h.CreateAsync("woken", PipelineHarness.ModelUrl(version))).GetProperty("deploy_id").GetString()!;
        JsonElement deploy;
        do
        {
            await Task.Delay(50);
            deploy = await (await _h.User.Client.GetAsync($"/deploy/{id}")).ExpectAsync(HttpStatusCode.OK);
            // Without the wake the worker would ask at its next heartbeat, a minute after it registered.
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(HeartbeatSeconds / 3), $"not running after {clock.Elapsed}: {deploy}");
        }
        while (deploy.GetProperty("status").GetString() != "running");
        Assert.Equal(1, deploy.GetProperty("instances").GetProperty("running").GetInt32());
        Assert.Single(_engine.Loads);

        // Stopping drops the adapter from the worker just as quickly.
        (await _h.User.Client.PostAsync($"/deploy/{id}/stop", null)).EnsureSuccessStatusCode();
        clock.Restart();
        await Eventually.TrueAsync(() => !_engine.Unloads.IsEmpty, "the stopped deploy's adapter is unloaded");
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(HeartbeatSeconds / 3), $"unloaded only after {clock.Elapsed}");
    }
}
