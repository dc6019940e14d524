using System.Diagnostics;
using System.Net.Http.Json;
using System.Text.Json;
using LoraDeploy.Lora.Tests.Support;
using LoraDeploy.Workers;
using Microsoft.Extensions.Options;

namespace LoraDeploy.ServingBench;

/// <summary>
/// Affinity routing (issue 13): two llama.cpp workers on one pool, N adapters deployed from the (simulated) Hub, a
/// Zipf-distributed stream of completions; adapter loads (counted by each worker's engine) and latency with
/// <c>Workers:Routing=affinity</c> and <c>random</c>, in interleaved rounds on the same server and workers.
/// </summary>
public static class AffinityBench
{
    public static async Task RunAsync(int rounds, int requests, int concurrency, int adapters, int maxAdaptersPerWorker, bool retryWhileUnloading)
    {
        var model = new TinyLlama().Generate();
        Directory.CreateDirectory(BenchPaths.Scratch);
        var gguf = model.WriteGguf(Path.Combine(BenchPaths.Scratch, $"affinity-tiny-{Environment.ProcessId}.gguf"));
        try
        {
            await using var h = await Harness.StartAsync(Harness.LlamaPool(gguf, maxAdaptersPerWorker), new Dictionary<string, string?>
            {
                ["Workers:HeartbeatSeconds"] = "1",
                ["Pipeline:PollInterval"] = "00:00:00.200",
            }, withHub: true);
            var workers = new[] { await h.StartWorkerAsync("worker-a", retryWhileUnloading: retryWhileUnloading), await h.StartWorkerAsync("worker-b", retryWhileUnloading: retryWhileUnloading) };
            var (owner, user) = await h.CreateUserAsync("bench", concurrency);

            var clock = Stopwatch.StartNew();
            var ids = new List<string>();
            for (var k = 1; k <= adapters; k++)
            {
                var fixture = new PeftAdapterFixture { Seed = 100 + k, Std = 1.5f };
                h.Hub!.AddAdapter($"alice/a{k}", fixture.Generate(model).Safetensors().ToBytes(), config: fixture.ConfigJson());
                ids.Add(await Harness.CreateLoraModelAsync(user, $"alice/a{k}", $"a{k}"));
            }
            foreach (var id in ids)
            {
                await Harness.WaitRunningAsync(user, id, TimeSpan.FromMilliseconds(100), TimeSpan.FromSeconds(180));
            }
            var placed = await h.QueryAsync(db => Microsoft.EntityFrameworkCore.EntityFrameworkQueryableExtensions.ToListAsync(
                db.Instances.GroupBy(i => i.WorkerId).Select(g => new { g.Key, Count = g.Count() })));
            Stats.Note($"{adapters} deploys running in {clock.Elapsed.TotalSeconds:F1} s; pinned instances: {string.Join(", ", placed.Select(p => $"{p.Key} {p.Count}"))}; " +
                $"MaxAdaptersPerWorker {maxAdaptersPerWorker}; loads so far: {string.Join(", ", workers.Select(w => $"{w.Id} {w.Engine.Loads}"))}");

            // Zipf(s = 1.1) over the adapters, rank 1 the most requested.
            var weights = Enumerable.Range(1, adapters).Select(k => 1 / Math.Pow(k, 1.1)).ToArray();
            var total = weights.Sum();
            Stats.Note($"Zipf s=1.1 over {adapters}: the top adapter gets {weights[0] / total:P0} of requests, the top 5 {weights.Take(5).Sum() / total:P0}");
            List<int> Stream(int seed)
            {
                var random = new Random(seed);
                return Enumerable.Range(0, requests).Select(_ =>
                {
                    var x = random.NextDouble() * total;
                    var k = 0;
                    while (k < adapters - 1 && (x -= weights[k]) > 0)
                    {
                        k++;
                    }
                    return k + 1;
                }).ToList();
            }
            var options = h.Server.Services.GetRequiredService<IOptions<WorkersOptions>>().Value;
            Task<HttpResponseMessage> Send(int k) => user.PostAsJsonAsync("/v1/completions",
                new { model = $"{owner}/a{k}", prompt = "hello world", max_tokens = 4, temperature = 0 });

            // Warm-up (JIT, connections) with affinity, not counted.
            options.Routing = "affinity";
            await Load.SequenceAsync("warm", concurrency, Stream(1).Take(100).ToList(), Send);

            var results = new List<(string Routing, int Round, RunResult Run, int Loads)>();
            for (var round = 1; round <= rounds; round++)
            {
                var stream = Stream(1000 + round); // both policies get the same stream in a round
                foreach (var routing in round % 2 == 1 ? new[] { "affinity", "random" } : ["random", "affinity"])
                {
                    // The router reads Workers:Routing per request; flipped on the running server between runs.
                    options.Routing = routing;
                    var before = workers.Sum(w => w.Engine.Loads);
                    var run = await Load.SequenceAsync(routing, concurrency, stream, Send);
                    var loads = workers.Sum(w => w.Engine.Loads) - before;
                    results.Add((routing, round, run, loads));
                    Console.WriteLine($"round {round} {routing}: {loads} loads, p50 {Stats.F(run.P50)} p99 {Stats.F(run.P99)} ms, {Stats.F(run.Throughput, 0)} req/s, {run.Errors} errors {run.FirstError}");
                }
            }
            options.Routing = "affinity";

            Stats.Table($"Affinity vs random routing: 2 workers, {adapters} adapters (MaxAdaptersPerWorker {maxAdaptersPerWorker}), Zipf s=1.1, {requests} requests per run, {concurrency} in flight" +
                (retryWhileUnloading ? $", loads refused while unloading retried by the bench ({workers.Sum(w => w.Engine.Retried)} retries)" : ""),
                ["round", "routing", "adapter loads", "loads per 100 requests", "p50 ms", "p99 ms", "req/s", "errors"],
                results.Select(r => (IReadOnlyList<string>)
                [
                    r.Round.ToString(System.Globalization.CultureInfo.InvariantCulture), r.Routing, r.Loads.ToString(System.Globalization.CultureInfo.InvariantCulture),
                    Stats.F(100.0 * r.Loads / requests, 1), Stats.F(r.Run.P50), Stats.F(r.Run.P99), Stats.F(r.Run.Throughput, 0),
                    r.Run.Errors.ToString(System.Globalization.CultureInfo.InvariantCulture),
                ]));
            var byRound = results.GroupBy(r => r.Round).Select(g => (Affinity: g.Single(r => r.Routing == "affinity"), Random: g.Single(r => r.Routing == "random"))).ToList();
            var affinityLoads = byRound.Sum(r => r.Affinity.Loads);
            var randomLoads = byRound.Sum(r => r.Random.Loads);
            Stats.Note($"loads over all rounds: affinity {affinityLoads}, random {randomLoads} → random ÷ affinity = " +
                (affinityLoads == 0 ? "∞ (affinity loaded nothing)" : Stats.F((double)randomLoads / affinityLoads, 1)) + " (target ≥ 5)");
            Stats.Note($"p99 random ÷ affinity per round: {string.Join(", ", byRound.Select(r => Stats.F(r.Random.Run.P99 / r.Affinity.Run.P99)))}");
        }
        finally
        {
            File.Delete(gguf);
        }
    }
}

/// <summary>
/// Placement (issue 13): a deploy of an adapter the server already stores (a second LoRA from the same Hub repo: no
/// download, no conversion) on a warm pool of two llama.cpp workers, timed from <c>POST /lora-model</c> to
/// <c>running</c> (polled every 10 ms).
/// </summary>
public static class PlacementBench
{
    public static async Task RunAsync(int runs, int heartbeatSeconds)
    {
        var model = new TinyLlama().Generate();
        Directory.CreateDirectory(BenchPaths.Scratch);
        var gguf = model.WriteGguf(Path.Combine(BenchPaths.Scratch, $"placement-tiny-{Environment.ProcessId}.gguf"));
        try
        {
            await using var h = await Harness.StartAsync(Harness.LlamaPool(gguf), new Dictionary<string, string?>
            {
                ["Workers:HeartbeatSeconds"] = heartbeatSeconds.ToString(System.Globalization.CultureInfo.InvariantCulture),
            }, withHub: true);
            await h.StartWorkerAsync("worker-a");
            await h.StartWorkerAsync("worker-b");
            var (_, user) = await h.CreateUserAsync("bench", 4);
            var fixture = new PeftAdapterFixture { Seed = 9, Std = 1.5f };
            h.Hub!.AddAdapter("alice/placed", fixture.Generate(model).Safetensors().ToBytes(), config: fixture.ConfigJson());

            // The first deploy downloads, converts and stores the adapter; it is not timed.
            var first = Stopwatch.StartNew();
            await Harness.WaitRunningAsync(user, await Harness.CreateLoraModelAsync(user, "alice/placed", "placed-0"), TimeSpan.FromMilliseconds(10), TimeSpan.FromSeconds(60));
            Stats.Note($"first deploy (download + convert + place): {first.Elapsed.TotalMilliseconds:F0} ms (not counted)");

            var times = new List<(double Deploying, double Running)>();
            for (var run = 1; run <= runs; run++)
            {
                var started = Stopwatch.GetTimestamp();
                var id = await Harness.CreateLoraModelAsync(user, "alice/placed", $"placed-{run}");
                double deploying = double.NaN;
                while (true)
                {
                    var status = JsonDocument.Parse(await user.GetStringAsync($"/deploy/{id}")).RootElement.GetProperty("status").GetString();
                    var at = Stopwatch.GetElapsedTime(started).TotalMilliseconds;
                    if (status is "deploying" or "running" && double.IsNaN(deploying))
                    {
                        deploying = at;
                    }
                    if (status == "running")
                    {
                        times.Add((deploying, at));
                        break;
                    }
                    if (status == "failed" || at > 30_000)
                    {
                        throw new InvalidOperationException($"deploy {id} never ran ({status})");
                    }
                    await Task.Delay(10);
                }
                // Deleted again, so pinned copies do not pile up to the pool's MaxAdaptersPerWorker (placed-0 keeps the adapter resident).
                (await user.DeleteAsync($"/deploy/{id}")).EnsureSuccessStatusCode();
                // Not in lock-step with the heartbeat: start the next create at a random phase of it.
                await Task.Delay(Random.Shared.Next(100, 700));
            }
            var running = times.Select(t => t.Running).ToList();
            var toDeploying = times.Select(t => t.Deploying).ToList();
            Stats.Table($"Create of an already-stored adapter → running, warm pool of 2 llama.cpp workers, Workers:HeartbeatSeconds={heartbeatSeconds}, {runs} runs",
                ["", "min", "p50", "p90", "max", "under 1 s"],
                [
                    ["POST → `deploying` (ms)", Stats.F(toDeploying.Min(), 0), Stats.F(Stats.Percentile(toDeploying, 0.5), 0), Stats.F(Stats.Percentile(toDeploying, 0.9), 0), Stats.F(toDeploying.Max(), 0), $"{toDeploying.Count(t => t < 1000)}/{runs}"],
                    ["POST → `running` (ms)", Stats.F(running.Min(), 0), Stats.F(Stats.Percentile(running, 0.5), 0), Stats.F(Stats.Percentile(running, 0.9), 0), Stats.F(running.Max(), 0), $"{running.Count(t => t < 1000)}/{runs}"],
                ]);
            Stats.Note($"every run (ms to running): {string.Join(", ", running.Select(t => Stats.F(t, 0)))}");
        }
        finally
        {
            File.Delete(gguf);
        }
    }
}
