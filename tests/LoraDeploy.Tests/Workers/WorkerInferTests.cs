using System.Net;
using System.Security.Cryptography;
using System.Text.Json;
using LoraDeploy.Workers;

namespace LoraDeploy.Tests.Workers;

/// <summary><c>POST /internal/v1/infer</c>: the call key, headers, loading on demand, per-pool LRU, slots, cancellation.</summary>
public sealed class WorkerInferTests
{
    [Fact]
    public async Task Infer_without_or_with_a_wrong_call_key_is_401_and_with_the_registered_key_runs()
    {
        await using var worker = await WorkerHarness.StartAsync();

        using (var anonymous = worker.CreateClient(callKey: null))
        using (var response = await anonymous.SendAsync(WorkerHarness.Infer()))
        {
            Assert.Equal(HttpStatusCode.Unauthorized, response.StatusCode);
        }
        using (var wrong = worker.CreateClient(callKey: worker.Registration.CallKey[..^1] + "x"))
        using (var response = await wrong.SendAsync(WorkerHarness.Infer()))
        {
            Assert.Equal(HttpStatusCode.Unauthorized, response.StatusCode);
        }
        using (var token = worker.CreateClient(callKey: FakeWorkerServer.Token))
        using (var response = await token.SendAsync(WorkerHarness.Infer()))
        {
            Assert.Equal(HttpStatusCode.Unauthorized, response.StatusCode);
        }
        Assert.Equal(0, worker.Engine.MaxRunning);

        using var client = worker.CreateClient();
        using var ok = await client.SendAsync(WorkerHarness.Infer("""{"prompt":"hello"}"""));
        Assert.Equal(HttpStatusCode.OK, ok.StatusCode);
        using var answer = JsonDocument.Parse(await ok.Content.ReadAsStringAsync());
        Assert.Equal(WorkerHarness.Pool, answer.RootElement.GetProperty("pool").GetString());
        Assert.Equal(Operations.Completions, answer.RootElement.GetProperty("operation").GetString());
        Assert.Equal("hello", answer.RootElement.GetProperty("body").GetProperty("prompt").GetString());
        Assert.False(ok.Headers.Contains(WorkerProtocol.LoadedHeader));
    }

    [Fact]
    public async Task Bad_headers_and_bodies_are_400_naming_the_problem_and_an_unknown_pool_404()
    {
        await using var worker = await WorkerHarness.StartAsync();
        using var client = worker.CreateClient();
        var sha = new string('a', 64);
        foreach (var (request, expected, mention) in new[]
                 {
                     (WorkerHarness.Infer(pool: "nope"), HttpStatusCode.NotFound, "nope"),
                     (WorkerHarness.Infer(operation: "delete.everything"), HttpStatusCode.BadRequest, "delete.everything"),
                     (WorkerHarness.Infer(adapters: "not-a-hash:1"), HttpStatusCode.BadRequest, "not-a-hash"),
                     (WorkerHarness.Infer(adapters: $"{sha}:NaN"), HttpStatusCode.BadRequest, "scale"),
                     (WorkerHarness.Infer(adapters: sha), HttpStatusCode.BadRequest, "scale"),
                     (WorkerHarness.Infer(body: "{not json"), HttpStatusCode.BadRequest, "JSON"),
                 })
        {
            using (request)
            using (var response = await client.SendAsync(request))
            {
                Assert.Equal(expected, response.StatusCode);
                Assert.Contains(mention, JsonDocument.Parse(await response.Content.ReadAsStringAsync()).RootElement.GetProperty("error").GetString());
            }
        }
        Assert.Equal(0, worker.Engine.MaxRunning);
    }

    [Fact]
    public async Task A_request_loads_a_missing_adapter_first_and_says_so_and_the_next_one_finds_it_resident()
    {
        await using var worker = await WorkerHarness.StartAsync();
        var bytes = RandomNumberGenerator.GetBytes(20_000);
        var sha = worker.Server.AddBlob(bytes);
        using var client = worker.CreateClient();

        using (var first = await client.SendAsync(WorkerHarness.Infer(adapters: $"{sha}:0.75")))
        {
            Assert.Equal(HttpStatusCode.OK, first.StatusCode);
            Assert.Equal(sha, first.Headers.GetValues(WorkerProtocol.LoadedHeader).Single());
            var adapter = JsonDocument.Parse(await first.Content.ReadAsStringAsync()).RootElement.GetProperty("adapters")[0];
            Assert.Equal(sha, adapter.GetProperty("sha256").GetString());
            Assert.Equal(0.75, adapter.GetProperty("scale").GetDouble(), 5);
        }
        using (var second = await client.SendAsync(WorkerHarness.Infer(adapters: $"{sha}:1")))
        {
            Assert.Equal(HttpStatusCode.OK, second.StatusCode);
            Assert.False(second.Headers.Contains(WorkerProtocol.LoadedHeader));
        }
        Assert.Equal(bytes, Assert.Single(worker.Engine.Loads).Bytes);
    }

    [Fact]
    public async Task An_adapter_the_engine_refuses_answers_422_with_the_engines_reason()
    {
        await using var worker = await WorkerHarness.StartAsync();
        var sha = worker.Server.AddBlob(RandomNumberGenerator.GetBytes(1000));
        worker.Engine.Refuse[sha] = "tensor blk.0.attn_q.weight.lora_a has shape [3, 64], the model expects [64, r]";
        using var client = worker.CreateClient();

        using var response = await client.SendAsync(WorkerHarness.Infer(adapters: $"{sha}:1"));

        Assert.Equal(HttpStatusCode.UnprocessableEntity, response.StatusCode);
        Assert.Equal(worker.Engine.Refuse[sha], JsonDocument.Parse(await response.Content.ReadAsStringAsync()).RootElement.GetProperty("error").GetString());
        Assert.Equal(0, worker.Engine.MaxRunning);
    }

    [Fact]
    public async Task Beyond_MaxAdaptersPerWorker_the_least_recently_used_adapter_is_unloaded_but_never_a_pinned_one()
    {
        await using var worker = await WorkerHarness.StartAsync(new Dictionary<string, string> { [$"BaseModels:{WorkerHarness.Pool}:MaxAdaptersPerWorker"] = "2" });
        var (a, b, c, d) = (Blob(worker), Blob(worker), Blob(worker), Blob(worker));
        using var client = worker.CreateClient();

        await InferAsync(client, a);
        await InferAsync(client, b);
        await InferAsync(client, a); // a is now more recent than b
        await InferAsync(client, c);
        Assert.Equal([(WorkerHarness.Pool, b)], worker.Engine.Unloads);

        // Pinned by the server: a stays however old it gets; the others take turns.
        var hold = new WorkerAssignments([new AdapterAssignment(a, WorkerHarness.Pool, 1000)], []);
        worker.Server.Assignments = hold;
        await Eventually.TrueAsync(() => worker.Server.Applied(hold), "the hold reaches the worker");
        await InferAsync(client, c);
        await InferAsync(client, b); // evicts c (a is pinned)
        await InferAsync(client, d); // evicts b
        Assert.DoesNotContain((WorkerHarness.Pool, a), worker.Engine.Unloads);
        Assert.Equal([b, c, b], worker.Engine.Unloads.Select(u => u.Sha256));
    }

    [Fact]
    public async Task A_request_for_an_adapter_being_evicted_waits_for_the_unload_and_loads_it_again()
    {
        await using var worker = await WorkerHarness.StartAsync(new Dictionary<string, string> { [$"BaseModels:{WorkerHarness.Pool}:MaxAdaptersPerWorker"] = "1" });
        var (a, b) = (Blob(worker), Blob(worker));
        using var client = worker.CreateClient();
        await InferAsync(client, a);

        worker.Engine.UnloadGate = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var evicting = InferAsync(client, b); // loads b, evicts a: the unload of a hangs on the gate
        // b loaded and a taken out of the residents (a moment after the engine's load returns), its unload hanging.
        await Eventually.TrueAsync(() => worker.Engine.Loads.Count(l => l.Sha256 == b) == 1
            && worker.Unit.Residency.Snapshot().All(r => r.Sha256 != a), "b loaded, a evicted");
        var again = InferAsync(client, a); // a is gone from the residents but not yet from the engine
        await Task.Delay(200);
        worker.Engine.UnloadGate.SetResult();
        await Task.WhenAll(evicting, again); // both 200: a was loaded again after its unload, not refused meanwhile
        Assert.Equal(2, worker.Engine.Loads.Count(l => l.Sha256 == a));
    }

    [Fact]
    public async Task With_every_slot_busy_requests_queue_and_run_when_a_slot_frees()
    {
        await using var worker = await WorkerHarness.StartAsync(new Dictionary<string, string> { ["Worker:Slots"] = "2" });
        worker.Engine.HoldRequests = true;
        using var client = worker.CreateClient();

        var requests = Enumerable.Range(0, 5).Select(_ => client.SendAsync(WorkerHarness.Infer())).ToList();
        // A slot counts as busy a moment before the engine's own counter sees the request, so wait for both.
        await Eventually.TrueAsync(() => worker.Unit.Slots is { BusySlots: 2, QueueDepth: 3 } && worker.Engine.Running == 2, "two run, three queue");

        worker.Engine.ReleaseRequests();
        foreach (var response in await Task.WhenAll(requests))
        {
            Assert.Equal(HttpStatusCode.OK, response.StatusCode);
            response.Dispose();
        }
        Assert.Equal(2, worker.Engine.MaxRunning);
        Assert.Equal(0, worker.Unit.Slots.QueueDepth);
    }

    [Fact]
    public async Task A_client_that_disconnects_cancels_the_engine_work_and_frees_its_slot()
    {
        await using var worker = await WorkerHarness.StartAsync(new Dictionary<string, string> { ["Worker:Slots"] = "1" });
        worker.Engine.HoldRequests = true;
        using var client = worker.CreateClient();
        using var abandon = new CancellationTokenSource();

        var request = client.SendAsync(WorkerHarness.Infer(), abandon.Token);
        await Eventually.TrueAsync(() => worker.Engine.Running == 1, "the request runs");
        await abandon.CancelAsync();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => request);

        await Eventually.TrueAsync(() => worker.Engine.Cancelled == 1, "the engine's work is cancelled");
        await Eventually.TrueAsync(() => worker.Unit.Slots.BusySlots == 0, "the slot is free");
    }

    private static string Blob(WorkerHarness worker) => worker.Server.AddBlob(RandomNumberGenerator.GetBytes(1000));

    private static async Task InferAsync(HttpClient client, string sha)
    {
        using var response = await client.SendAsync(WorkerHarness.Infer(adapters: $"{sha}:1"));
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
    }
}
