using System.Net;
using System.Security.Cryptography;
using LoraDeploy.Workers;
using LoraDeploy.Workers.Host;

namespace LoraDeploy.Tests.Workers;

/// <summary>The worker ↔ server conversation: registration, heartbeats, Hold/Drop assignments, re-registration.</summary>
public sealed class WorkerAgentTests
{
    [Fact]
    public async Task A_worker_that_stops_on_purpose_tells_the_server_it_leaves()
    {
        var worker = await WorkerHarness.StartAsync();
        var server = worker.Server;
        var id = worker.Registration.Id;
        await worker.App.StopAsync();
        Assert.Equal([id], server.Left);
        await worker.DisposeAsync();
    }

    [Fact]
    public async Task Registers_its_engine_pools_slots_url_version_and_a_fresh_call_key_and_keeps_its_id()
    {
        var dataDir = Path.Combine(Path.GetTempPath(), "loradeploy-tests", Guid.NewGuid().ToString("N"));
        string firstId, firstKey;
        await using (var worker = await WorkerHarness.StartAsync(new Dictionary<string, string> { ["Worker:Slots"] = "3" }, dataDir))
        {
            var registration = worker.Registration;
            Assert.Equal("llamacpp", registration.Engine);
            Assert.Equal([WorkerHarness.Pool], registration.Pools);
            Assert.Equal(3, registration.Slots);
            Assert.Equal(worker.App.Urls.First(), registration.Url);
            Assert.False(string.IsNullOrWhiteSpace(registration.Version));
            Assert.True(registration.CallKey.Length >= 32);
            Assert.Matches("^[A-Za-z0-9._-]{1,64}$", registration.Id);
            Assert.Equal(registration.Id, File.ReadAllText(Path.Combine(dataDir, WorkerIdentity.FileName)).Trim());
            Assert.Equal(registration.Id, worker.Server.Heartbeats.First().Id);
            Assert.Equal([WorkerHarness.Pool], worker.Engine.StartedPools.Select(p => p.Name));
            Assert.Empty(worker.Server.Unauthorized);
            using var client = worker.CreateClient(callKey: null);
            Assert.Equal("ready", await client.GetStringAsync(WorkerProtocol.ReadyPath));
            (firstId, firstKey) = (registration.Id, registration.CallKey);
        }
        // Restarted on the same data: the same id (the server keeps its placement), a new call key.
        try
        {
            await using var restarted = await WorkerHarness.StartAsync(dataDir: dataDir);
            Assert.Equal(firstId, restarted.Registration.Id);
            Assert.NotEqual(firstKey, restarted.Registration.CallKey);
        }
        finally
        {
            Directory.Delete(dataDir, recursive: true);
        }
    }

    [Fact]
    public async Task Hold_fetches_verifies_loads_pins_and_reports_ready_then_Drop_unloads_at_once()
    {
        await using var worker = await WorkerHarness.StartAsync();
        var bytes = RandomNumberGenerator.GetBytes(200_000);
        var sha = worker.Server.AddBlob(bytes);

        worker.Server.Assignments = new WorkerAssignments([new AdapterAssignment(sha, WorkerHarness.Pool, bytes.Length)], []);
        await Eventually.TrueAsync(() => worker.Reported(sha)?.State == AdapterStates.Ready, "the held adapter is reported ready");

        var load = Assert.Single(worker.Engine.Loads);
        Assert.Equal((WorkerHarness.Pool, sha), (load.Pool, load.Sha256));
        Assert.Equal(bytes, load.Bytes);
        Assert.Equal(bytes, File.ReadAllBytes(Path.Combine(worker.Cache.Location, sha)));
        Assert.Empty(Directory.GetFiles(Path.Combine(worker.Cache.Location, "partial")));
        Assert.Equal(WorkerHarness.Pool, worker.Reported(sha)!.Pool);

        worker.Server.Assignments = new WorkerAssignments([], [sha]);
        await Eventually.TrueAsync(() => worker.Engine.Unloads.Contains((WorkerHarness.Pool, sha)), "the dropped adapter is unloaded");
        await Eventually.TrueAsync(() => worker.Reported(sha) is null, "the dropped adapter is no longer reported");
        Assert.Single(worker.Engine.Loads);
    }

    [Fact]
    public async Task A_blob_whose_bytes_do_not_match_its_hash_is_deleted_reported_failed_and_never_loaded()
    {
        await using var worker = await WorkerHarness.StartAsync();
        var claimed = RandomNumberGenerator.GetBytes(50_000);
        var served = (byte[])claimed.Clone();
        served[^1] ^= 0xFF;
        var sha = worker.Server.AddDamagedBlob(claimed, served);

        worker.Server.Assignments = new WorkerAssignments([new AdapterAssignment(sha, WorkerHarness.Pool, claimed.Length)], []);
        await Eventually.TrueAsync(() => worker.Reported(sha)?.State == AdapterStates.Failed, "the damaged adapter is reported failed");

        Assert.Contains("hash", worker.Reported(sha)!.Reason);
        Assert.Empty(worker.Engine.Loads);
        Assert.False(File.Exists(Path.Combine(worker.Cache.Location, sha)));
        Assert.Empty(Directory.GetFiles(Path.Combine(worker.Cache.Location, "partial")));

        // A request for it is refused with the same reason rather than served.
        using var client = worker.CreateClient();
        using var response = await client.SendAsync(WorkerHarness.Infer(adapters: $"{sha}:1"));
        Assert.Equal(422, (int)response.StatusCode);
        Assert.Contains("hash", await response.Content.ReadAsStringAsync());
        Assert.Empty(worker.Engine.Loads);
    }

    [Fact]
    public async Task An_adapter_the_engine_refuses_is_reported_failed_with_the_engines_reason()
    {
        await using var worker = await WorkerHarness.StartAsync();
        var sha = worker.Server.AddBlob(RandomNumberGenerator.GetBytes(10_000));
        worker.Engine.Refuse[sha] = "lora rank 4096 is larger than the model's hidden size 64";

        worker.Server.Assignments = new WorkerAssignments([new AdapterAssignment(sha, WorkerHarness.Pool, 10_000)], []);
        await Eventually.TrueAsync(() => worker.Reported(sha)?.State == AdapterStates.Failed, "the refused adapter is reported failed");
        Assert.Equal("lora rank 4096 is larger than the model's hidden size 64", worker.Reported(sha)!.Reason);
    }

    [Fact]
    public async Task A_held_adapter_for_a_pool_the_worker_does_not_serve_is_reported_failed()
    {
        await using var worker = await WorkerHarness.StartAsync();
        var sha = worker.Server.AddBlob(RandomNumberGenerator.GetBytes(1000));
        worker.Server.Assignments = new WorkerAssignments([new AdapterAssignment(sha, "other-pool", 1000)], []);
        await Eventually.TrueAsync(() => worker.Reported(sha)?.State == AdapterStates.Failed, "reported failed");
        Assert.Contains("other-pool", worker.Reported(sha)!.Reason);
        Assert.Empty(worker.Engine.Loads);
    }

    [Fact]
    public async Task A_blob_download_dropped_midway_resumes_with_Range_from_the_partial_file()
    {
        await using var worker = await WorkerHarness.StartAsync();
        var bytes = RandomNumberGenerator.GetBytes(1_000_000);
        var sha = worker.Server.AddBlob(bytes);
        worker.Server.DropNextBlobAfter(300_000);

        worker.Server.Assignments = new WorkerAssignments([new AdapterAssignment(sha, WorkerHarness.Pool, bytes.Length)], []);
        await Eventually.TrueAsync(() => worker.Reported(sha)?.State == AdapterStates.Ready, "the adapter is ready after the resume");

        var ranges = worker.Server.BlobRanges.ToList();
        Assert.Equal(2, ranges.Count);
        Assert.Null(ranges[0]);
        Assert.Matches("^bytes=[1-9][0-9]*-$", ranges[1]);
        Assert.Equal(bytes, Assert.Single(worker.Engine.Loads).Bytes);
    }

    [Fact]
    public async Task A_404_heartbeat_makes_the_worker_register_again_with_the_same_id_and_key()
    {
        await using var worker = await WorkerHarness.StartAsync();
        var first = worker.Registration;

        worker.Server.ForgetWorkerOnce();
        await Eventually.TrueAsync(() => worker.Server.Registrations.Count >= 2, "the worker registers again");

        var again = worker.Server.Registrations.Skip(1).First();
        Assert.Equal(first.Id, again.Id);
        Assert.Equal(first.CallKey, again.CallKey);
        var beats = worker.Server.Heartbeats.Count;
        await Eventually.TrueAsync(() => worker.Server.Heartbeats.Count > beats, "heartbeats resume");
    }

    [Fact]
    public async Task A_wake_with_the_call_key_makes_the_worker_heartbeat_now_and_learn_its_assignments()
    {
        // A period far beyond the test's patience: only the wake can make the worker ask again.
        await using var worker = await WorkerHarness.StartAsync(heartbeatSeconds: 300);
        var sha = worker.Server.AddBlob(RandomNumberGenerator.GetBytes(5000));
        worker.Server.Assignments = new([new AdapterAssignment(sha, WorkerHarness.Pool, 5000)], []);
        var beats = worker.Server.Heartbeats.Count;

        using (var stranger = worker.CreateClient(callKey: "not-the-call-key-of-this-worker-0123456789"))
        using (var anonymous = worker.CreateClient(callKey: null))
        {
            Assert.Equal(HttpStatusCode.Unauthorized, (await stranger.PostAsync(WorkerProtocol.WakePath, null)).StatusCode);
            var refused = await anonymous.PostAsync(WorkerProtocol.WakePath, null);
            Assert.Equal(HttpStatusCode.Unauthorized, refused.StatusCode);
            Assert.Contains("call key", await refused.Content.ReadAsStringAsync());
        }
        await Task.Delay(300);
        Assert.Equal(beats, worker.Server.Heartbeats.Count); // a refused wake wakes nothing

        using var server = worker.CreateClient();
        Assert.Equal(HttpStatusCode.NoContent, (await server.PostAsync(WorkerProtocol.WakePath, null)).StatusCode);
        // The heartbeat's answer holds the adapter: loaded, and reported ready by the heartbeat the load itself wakes.
        await Eventually.TrueAsync(() => worker.Reported(sha)?.State == AdapterStates.Ready, "the woken worker loads its assignment and reports it ready");
        Assert.Single(worker.Engine.Loads);
    }

    [Fact]
    public async Task Heartbeats_report_queue_depth_busy_slots_and_resident_adapters()
    {
        await using var worker = await WorkerHarness.StartAsync(new Dictionary<string, string> { ["Worker:Slots"] = "1" });
        var sha = worker.Server.AddBlob(RandomNumberGenerator.GetBytes(5000));
        worker.Engine.HoldRequests = true;
        using var client = worker.CreateClient();
        var first = client.SendAsync(WorkerHarness.Infer(adapters: $"{sha}:0.5"));
        await Eventually.TrueAsync(() => worker.Engine.Running == 1, "the first request holds the slot");
        var second = client.SendAsync(WorkerHarness.Infer());

        await Eventually.TrueAsync(() => worker.Server.LastHeartbeat is { BusySlots: 1, QueueDepth: 1 } beat
            && beat.Adapters.Any(a => a.Sha256 == sha && a.State == AdapterStates.Ready), "a heartbeat shows one busy slot, one queued request and the adapter");

        worker.Engine.ReleaseRequests();
        using var a = await first;
        using var b = await second;
        Assert.True(a.IsSuccessStatusCode && b.IsSuccessStatusCode);
        await Eventually.TrueAsync(() => worker.Server.LastHeartbeat is { BusySlots: 0, QueueDepth: 0 }, "idle again");
    }

    [Fact]
    public async Task While_the_server_is_unreachable_the_worker_keeps_serving_retries_and_logs_the_outage_once()
    {
        await using var worker = await WorkerHarness.StartAsync();
        worker.Server.Unavailable = true;

        // Several failed heartbeats (retries and backoff rounds) while requests are still served.
        await Eventually.TrueAsync(() => worker.Server.RefusedHeartbeats >= 9, "the worker keeps retrying");
        using var client = worker.CreateClient();
        using (var response = await client.SendAsync(WorkerHarness.Infer()))
        {
            Assert.Equal(System.Net.HttpStatusCode.OK, response.StatusCode);
        }
        var outage = worker.Log.Entries.Where(e => e.Message.Contains("cannot be reached or refused", StringComparison.Ordinal)).ToList();
        Assert.Single(outage);
        Assert.Equal(LogLevel.Warning, outage[0].Level);
        Assert.Contains("503", outage[0].Message);

        worker.Server.Unavailable = false;
        var beats = worker.Server.Heartbeats.Count;
        await Eventually.TrueAsync(() => worker.Server.Heartbeats.Count > beats, "heartbeats succeed again");
        // The fake server counts a heartbeat before it answers; the worker logs once the answer is in.
        await Eventually.TrueAsync(() => worker.Log.Entries.Any(e => e.Message.Contains("answers again", StringComparison.Ordinal)), "the recovery is logged");
        Assert.Single(worker.Log.Entries, e => e.Message.Contains("answers again", StringComparison.Ordinal));
        Assert.Single(worker.Log.Entries, e => e.Message.Contains("cannot be reached or refused", StringComparison.Ordinal));
    }

    [Fact]
    public async Task A_worker_with_two_engines_registers_each_with_its_own_pools_and_routes_requests_by_pool()
    {
        var comfy = new TestEchoEngine(LoraDeploy.BaseModels.Engines.ComfyUi);
        await using var worker = await WorkerHarness.StartAsync(new Dictionary<string, string>
        {
            ["BaseModels:sdxl-pool:Family"] = "sdxl",
            ["BaseModels:sdxl-pool:Engine"] = "comfyui",
            ["BaseModels:sdxl-pool:ComfyUi:Url"] = "http://127.0.0.1:8188",
            ["BaseModels:sdxl-pool:ComfyUi:Checkpoint"] = "sd_xl_base_1.0.safetensors",
            ["Worker:Id"] = "box-1",
        }, moreEngines: [comfy]);
        await Eventually.TrueAsync(() => worker.Server.Registrations.Count == 2, "both engines register");

        var registrations = worker.Server.Registrations.OrderBy(r => r.Engine).ToList();
        Assert.Equal(("comfyui", "box-1-comfyui", "sdxl-pool"), (registrations[0].Engine, registrations[0].Id, registrations[0].Pools.Single()));
        Assert.Equal(("llamacpp", "box-1-llamacpp", WorkerHarness.Pool), (registrations[1].Engine, registrations[1].Id, registrations[1].Pools.Single()));
        Assert.Equal(registrations[0].CallKey, registrations[1].CallKey);

        using var client = worker.CreateClient();
        using var response = await client.SendAsync(WorkerHarness.Infer(pool: "sdxl-pool", operation: Operations.ImagesGenerations));
        Assert.Equal(System.Net.HttpStatusCode.OK, response.StatusCode);
        Assert.Equal(1, comfy.MaxRunning);
        Assert.Equal(0, worker.Engine.MaxRunning);
    }

    [Fact]
    public async Task An_engine_that_cannot_start_stops_the_worker_with_its_reason_and_it_never_registers()
    {
        await using var server = await FakeWorkerServer.StartAsync();
        var dataDir = Path.Combine(Path.GetTempPath(), "loradeploy-tests", Guid.NewGuid().ToString("N"));
        var engine = new TestEchoEngine { StartFailure = "/models/tiny.gguf: no such file" };
        await using var app = WorkerHost.Build(
        [
            "--urls", "http://127.0.0.1:0", $"--DataDir={dataDir}", $"--Worker:Server={server.Url}", $"--Worker:Token={FakeWorkerServer.Token}",
            $"--BaseModels:{WorkerHarness.Pool}:Family=llama", $"--BaseModels:{WorkerHarness.Pool}:Engine=llamacpp", $"--BaseModels:{WorkerHarness.Pool}:Gguf=/models/tiny.gguf",
        ], [engine], builder => builder.Logging.ClearProviders());

        var stopped = await Assert.ThrowsAsync<WorkerStoppedException>(() => WorkerHost.RunAsync(app, TestContext.Current.CancellationToken));

        Assert.Contains("/models/tiny.gguf: no such file", stopped.Message);
        Assert.Empty(server.Registrations);
        Directory.Delete(dataDir, recursive: true);
    }

    [Fact]
    public async Task A_Drop_that_arrives_while_a_request_uses_the_adapter_unloads_it_when_the_request_ends()
    {
        await using var worker = await WorkerHarness.StartAsync();
        var sha = worker.Server.AddBlob(RandomNumberGenerator.GetBytes(1000));
        worker.Server.Assignments = new WorkerAssignments([new AdapterAssignment(sha, WorkerHarness.Pool, 1000)], []);
        await Eventually.TrueAsync(() => worker.Reported(sha)?.State == AdapterStates.Ready, "the adapter is ready");
        worker.Engine.HoldRequests = true;
        using var client = worker.CreateClient();
        var request = client.SendAsync(WorkerHarness.Infer(adapters: $"{sha}:1"));
        await Eventually.TrueAsync(() => worker.Engine.Running == 1, "the request runs");

        var drop = new WorkerAssignments([], [sha]);
        worker.Server.Assignments = drop;
        await Eventually.TrueAsync(() => worker.Server.Applied(drop), "the drop reaches the worker");
        Assert.Empty(worker.Engine.Unloads);
        Assert.Null(worker.Reported(sha));

        worker.Engine.ReleaseRequests();
        using var response = await request;
        Assert.True(response.IsSuccessStatusCode);
        await Eventually.TrueAsync(() => worker.Engine.Unloads.Contains((WorkerHarness.Pool, sha)), "unloaded after the request");
    }

    [Fact]
    public async Task Until_the_engine_has_loaded_its_base_models_the_worker_is_not_ready_and_does_not_register()
    {
        await using var server = await FakeWorkerServer.StartAsync();
        var dataDir = Path.Combine(Path.GetTempPath(), "loradeploy-tests", Guid.NewGuid().ToString("N"));
        var engine = new TestEchoEngine { StartGate = new(TaskCreationOptions.RunContinuationsAsynchronously) };
        await using var app = WorkerHost.Build(
        [
            "--urls", "http://127.0.0.1:0", $"--DataDir={dataDir}", $"--Worker:Server={server.Url}", $"--Worker:Token={FakeWorkerServer.Token}",
            $"--BaseModels:{WorkerHarness.Pool}:Family=llama", $"--BaseModels:{WorkerHarness.Pool}:Engine=llamacpp", $"--BaseModels:{WorkerHarness.Pool}:Gguf=/models/tiny.gguf",
            "--Worker:AdvertiseUrl=http://worker-7.pool.svc:8090",
        ], [engine], builder => builder.Logging.ClearProviders());
        await app.StartAsync(TestContext.Current.CancellationToken);
        using var client = new HttpClient { BaseAddress = new Uri(app.Urls.First()) };

        using (var notReady = await client.GetAsync(WorkerProtocol.ReadyPath, TestContext.Current.CancellationToken))
        {
            Assert.Equal(System.Net.HttpStatusCode.ServiceUnavailable, notReady.StatusCode);
        }
        Assert.Empty(server.Registrations);

        engine.StartGate.SetResult();
        await Eventually.TrueAsync(() => !server.Registrations.IsEmpty, "the worker registers once its engine started");
        Assert.Equal("ready", await client.GetStringAsync(WorkerProtocol.ReadyPath, TestContext.Current.CancellationToken));
        // Behind NAT or in a container the configured address is what the server is told to call.
        Assert.Equal("http://worker-7.pool.svc:8090", server.Registrations.Single().Url);
        await app.StopAsync(TestContext.Current.CancellationToken);
        Directory.Delete(dataDir, recursive: true);
    }
}
