using System.Diagnostics;
using System.Net.Http.Headers;
using System.Text;
using LoraDeploy.Lora.Tests.Support;
using LoraDeploy.Workers;
using Microsoft.Extensions.Options;

namespace LoraDeploy.ServingBench;

/// <summary>
/// Gateway overhead (issue 13): the same minimal completion (the tiny model's base, max_tokens 1, temperature 0) sent
/// straight to the worker (<c>POST {worker}/internal/v1/infer</c> with its call key and protocol headers) and through
/// the server (<c>POST /v1/completions</c>), 64 connections each, in interleaved rounds.
/// </summary>
public static class GatewayBench
{
    /// <param name="snapshotMs"><c>Workers:RouterSnapshotMilliseconds</c> for the gateway side (250, the default setting).</param>
    /// <param name="plain">
    /// Also measure the gateway reading the workers per request (<c>RouterSnapshotMilliseconds</c> 0, flipped on the
    /// running server's options) as a third side.
    /// </param>
    /// <param name="workerCpu">
    /// When 0 or more, the worker is a separate <c>loradeploy worker</c> process pinned to that CPU with <c>taskset</c>,
    /// the way a worker has its own machine; run the bench itself under <c>taskset -c</c> on the other CPU(s).
    /// </param>
    /// <param name="profileSeconds">
    /// When above 0, only the default gateway runs after the warm-up, for this long, and its CPU per request is printed:
    /// a window to attach a profiler to (<c>perf record -p</c>), with nothing else in it.
    /// </param>
    /// <param name="slices">Each side's time per round is taken in this many slices, alternating with the other sides.</param>
    public static async Task RunAsync(int rounds, TimeSpan duration, int connections, int workerSlots, int snapshotMs, int workerCpu, int profileSeconds = 0, int slices = 5, bool plain = false)
    {
        var model = new TinyLlama().Generate();
        Directory.CreateDirectory(BenchPaths.Scratch);
        var gguf = model.WriteGguf(Path.Combine(BenchPaths.Scratch, $"gateway-tiny-{Environment.ProcessId}.gguf"));
        Process? workerProcess = null;
        try
        {
            await using var h = await Harness.StartAsync(Harness.LlamaPool(gguf), new Dictionary<string, string?>
            {
                // 64 connections must not be refused by the per-pool limit.
                ["Workers:MaxOutstandingPerPool"] = "1000",
            }, withHub: false);
            var workersOptions = h.Server.Services.GetRequiredService<IOptions<WorkersOptions>>().Value;
            string workerUrl, callKey;
            if (workerCpu >= 0)
            {
                (workerProcess, workerUrl, callKey) = await h.StartWorkerProcessAsync("bench-worker", workerSlots, workerCpu);
                Stats.Note($"worker: separate process pinned to CPU {workerCpu}; this process (server + load) sees {Environment.ProcessorCount} CPU(s)");
            }
            else
            {
                var worker = await h.StartWorkerAsync("bench-worker", slots: workerSlots);
                (workerUrl, callKey) = (worker.Url, worker.CallKey);
                Stats.Note("worker: in this process (server, worker and load share every CPU)");
            }
            var (_, user) = await h.CreateUserAsync("bench", connections);
            using var direct = new HttpClient(Harness.LoadHandler(connections)) { BaseAddress = new Uri(workerUrl), Timeout = TimeSpan.FromSeconds(120) };
            direct.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", callKey);

            var body = Encoding.UTF8.GetBytes($$"""{"model":"{{Harness.Pool}}","prompt":"hello world","max_tokens":1,"temperature":0}""");
            Task<HttpResponseMessage> Direct(int _)
            {
                var request = new HttpRequestMessage(HttpMethod.Post, WorkerProtocol.InferPath) { Content = Json(body) };
                request.Headers.Add(WorkerProtocol.OperationHeader, Operations.Completions);
                request.Headers.Add(WorkerProtocol.PoolHeader, Harness.Pool);
                request.Headers.Add(WorkerProtocol.AdaptersHeader, "");
                return direct.SendAsync(request);
            }
            Task<HttpResponseMessage> Gateway(int _) => user.PostAsync("/v1/completions", Json(body));
            // What the gateway spends before routing: authentication, body, model lookup (an unknown model: 404).
            var unknown = Encoding.UTF8.GetBytes("""{"model":"nobody/nothing","prompt":"hello world","max_tokens":1,"temperature":0}""");
            Task<HttpResponseMessage> Lookup(int _) => user.PostAsync("/v1/completions", Json(unknown));
            async Task<RunResult> GatewayWith(string name, int snapshot, int conns, TimeSpan time, double? rate = null)
            {
                workersOptions.RouterSnapshotMilliseconds = snapshot;
                return rate is { } r ? await Load.PacedAsync(name, conns, r, time, Gateway) : await Load.ClosedLoopAsync(name, conns, time, Gateway);
            }

            // Both answer the same thing (checked once), then warm up: connections, JIT tiers, the token cache.
            using (var a = await Direct(0))
            using (var b = await Gateway(0))
            {
                var (ta, tb) = (await a.Content.ReadAsStringAsync(), await b.Content.ReadAsStringAsync());
                if (!a.IsSuccessStatusCode || !b.IsSuccessStatusCode)
                {
                    throw new InvalidOperationException($"direct {(int)a.StatusCode} {ta}\ngateway {(int)b.StatusCode} {tb}");
                }
                Stats.Note($"direct answer:  {ta}");
                Stats.Note($"gateway answer: {tb}");
            }
            // Tiered compilation is still busy about 30 s into a run (perf: its thread took 11% of the CPU 25 s in).
            await Load.ClosedLoopAsync("warm-direct", connections, TimeSpan.FromSeconds(12), Direct);
            await GatewayWith("warm-gateway", snapshotMs, connections, TimeSpan.FromSeconds(12));
            if (plain)
            {
                await GatewayWith("warm-plain", 0, connections, TimeSpan.FromSeconds(3));
            }
            if (profileSeconds > 0)
            {
                Stats.Note($"profile window: process {Environment.ProcessId}, {profileSeconds} s from {DateTime.UtcNow:HH:mm:ss}");
                foreach (var side in new[] { "direct", "gateway" })
                {
                    using var sampler = new AllocationSampler();
                    sampler.Start();
                    var p = side == "direct"
                        ? await Load.ClosedLoopAsync("profile-direct", connections, TimeSpan.FromSeconds(profileSeconds), Direct)
                        : await GatewayWith("profile", snapshotMs, connections, TimeSpan.FromSeconds(profileSeconds));
                    var types = sampler.Stop();
                    Stats.Note($"profile window, {side}: {Stats.F(p.Throughput, 0)} req/s, {Stats.F(p.CpuMicrosPerRequest, 0)} µs CPU and {Stats.F(p.AllocatedPerRequest / 1024, 1)} KiB per request; sampled bytes per request by type:");
                    var answered = p.Throughput * profileSeconds;
                    foreach (var (type, bytes) in types.Take(40))
                    {
                        Console.WriteLine($"#   {bytes / answered,8:F0} B  {type}");
                    }
                }
                return;
            }

            var results = new List<(RunResult Direct, RunResult Gateway, RunResult? Plain)>();
            var lookups = new List<(int Answers, RunResult Run)>();
            var single = new List<(RunResult Direct, RunResult Gateway)>();
            var paced = new List<(double Rate, RunResult Direct, RunResult Gateway)>();
            for (var round = 1; round <= rounds; round++)
            {
                // Each side's time is cut into slices taken in turn (the first side rotating by round and by slice),
                // so a slow few seconds of this shared machine fall on every side alike rather than on one.
                var sides = new List<Func<TimeSpan, Task<RunResult>>>
                {
                    time => Load.ClosedLoopAsync("direct", connections, time, Direct),
                    time => GatewayWith("gateway", snapshotMs, connections, time),
                };
                if (plain)
                {
                    sides.Add(time => GatewayWith("gateway-plain", 0, connections, time));
                }
                var parts = sides.Select(_ => new List<RunResult>()).ToArray();
                for (var slice = 0; slice < slices; slice++)
                {
                    for (var k = 0; k < sides.Count; k++)
                    {
                        var side = (k + round - 1 + slice) % sides.Count;
                        parts[side].Add(await sides[side](duration / slices));
                    }
                }
                var measured = parts.Select(RunResult.Combine).ToArray();
                var (d, g, pl) = (measured[0], measured[1], plain ? measured[2] : null);
                results.Add((d, g, pl));
                // Counted as errors by the loop (404 is the point): its rate is answers ÷ time.
                var l = await Load.ClosedLoopAsync("lookup-404", connections, duration, Lookup);
                lookups.Add((l.Errors, l));
                // One connection: no queue anywhere, so the difference of latencies is what the gateway adds per request.
                var d1 = await Load.ClosedLoopAsync("direct-1", 1, duration / 2, Direct);
                var g1 = await GatewayWith("gateway-1", snapshotMs, 1, duration / 2);
                single.Add((d1, g1));
                // 64 connections at half the gateway's closed-loop throughput, open loop: nothing saturates, so the
                // difference of p50s is what the gateway adds per request with 64 connections open, not a queue.
                var rate = 0.5 * g.Throughput;
                var pd = await Load.PacedAsync("direct-paced", connections, rate, duration, Direct);
                var pg = await GatewayWith("gateway-paced", snapshotMs, connections, duration, rate);
                paced.Add((rate, pd, pg));
                Console.WriteLine($"round {round}: direct {Stats.F(d.Throughput, 0)} req/s p50 {Stats.F(d.P50)} p99 {Stats.F(d.P99)} ms ({d.Errors} errors) | " +
                    $"gateway {Stats.F(g.Throughput, 0)} req/s p50 {Stats.F(g.P50)} p99 {Stats.F(g.P99)} ms ({g.Errors} errors)" +
                    (pl is null ? "" : $" | read per request {Stats.F(pl.Throughput, 0)} req/s p50 {Stats.F(pl.P50)} p99 {Stats.F(pl.P99)} ms ({pl.Errors} errors)") +
                    FirstError(d, g, pl));
            }
            workersOptions.RouterSnapshotMilliseconds = snapshotMs;

            var variants = new List<(string Name, Func<(RunResult Direct, RunResult Gateway, RunResult? Plain), RunResult> Pick)>
            {
                ($"gateway (workers read shared for {snapshotMs} ms)", r => r.Gateway),
            };
            if (plain)
            {
                variants.Add(("gateway reading the workers per request", r => r.Plain!));
            }
            foreach (var (name, pick) in variants)
            {
                Stats.Table($"{name} vs direct, {connections} connections, Worker:Slots={workerSlots}, {rounds} rounds of {duration.TotalSeconds:F0} s a side in {slices} alternating slices",
                    ["round", "direct req/s", "direct p50 / p99 ms", "gateway req/s", "gateway p50 / p99 ms", "gateway adds at p50 (ms)", "throughput × direct"],
                    results.Select((r, i) => (IReadOnlyList<string>)
                    [
                        (i + 1).ToString(System.Globalization.CultureInfo.InvariantCulture),
                        Stats.F(r.Direct.Throughput, 0), $"{Stats.F(r.Direct.P50)} / {Stats.F(r.Direct.P99)}",
                        Stats.F(pick(r).Throughput, 0), $"{Stats.F(pick(r).P50)} / {Stats.F(pick(r).P99)}",
                        Stats.F(pick(r).P50 - r.Direct.P50), Stats.F(pick(r).Throughput / r.Direct.Throughput),
                    ]));
                var cpuAdded = results.Select(r => pick(r).CpuMicrosPerRequest - r.Direct.CpuMicrosPerRequest).ToList();
                Stats.Note($"{name}: process CPU per request direct {Stats.Spread(results.Select(r => r.Direct.CpuMicrosPerRequest).ToList(), 0)} µs, " +
                    $"via gateway {Stats.Spread(results.Select(r => pick(r).CpuMicrosPerRequest).ToList(), 0)} µs: the gateway adds {Stats.Spread(cpuAdded, 0)} µs; " +
                    $"allocated per request direct {Stats.Spread(results.Select(r => r.Direct.AllocatedPerRequest / 1024).ToList(), 1)} KiB, " +
                    $"via gateway {Stats.Spread(results.Select(r => pick(r).AllocatedPerRequest / 1024).ToList(), 1)} KiB");
                var added = results.Select(r => pick(r).P50 - r.Direct.P50).ToList();
                var ratio = results.Select(r => pick(r).Throughput / r.Direct.Throughput).ToList();
                // Saturated, a closed loop's p50 is connections ÷ throughput: this difference is the throughput ratio
                // again (queueing), so the ≤ 1 ms target is judged where nothing queues (one connection, open loop).
                Stats.Note($"{name} adds at p50, closed loop: median {Stats.Spread(added)} ms (queueing: p50 ≈ {connections} ÷ throughput; the ≤ 1 ms target is judged on one connection and the open loop)");
                Stats.Note($"{name} throughput ÷ direct: median {Stats.Spread(ratio)} (target ≥ 0.8: {(Stats.Median(ratio) >= 0.8 ? "met" : "NOT met")})");
            }
            var addedSingle = single.Select(r => r.Gateway.P50 - r.Direct.P50).ToList();
            Stats.Note($"one connection: the gateway adds at p50 median {Stats.Spread(addedSingle, 3)} ms (target ≤ 1 ms: {Verdict(Stats.Median(addedSingle))}); " +
                $"req/s direct {Stats.Spread(single.Select(r => r.Direct.Throughput).ToList(), 0)}, via gateway {Stats.Spread(single.Select(r => r.Gateway.Throughput).ToList(), 0)}");
            Stats.Table($"{connections} connections, open loop at half the gateway's closed-loop throughput, {rounds} rounds",
                ["round", "offered req/s", "direct req/s, p50 / p99 ms", "gateway req/s, p50 / p99 ms", "gateway adds at p50 (ms)"],
                paced.Select((r, i) => (IReadOnlyList<string>)
                [
                    (i + 1).ToString(System.Globalization.CultureInfo.InvariantCulture),
                    Stats.F(r.Rate, 0),
                    $"{Stats.F(r.Direct.Throughput, 0)}, {Stats.F(r.Direct.P50)} / {Stats.F(r.Direct.P99)}",
                    $"{Stats.F(r.Gateway.Throughput, 0)}, {Stats.F(r.Gateway.P50)} / {Stats.F(r.Gateway.P99)}",
                    Stats.F(r.Gateway.P50 - r.Direct.P50, 3),
                ]));
            var addedPaced = paced.Select(r => r.Gateway.P50 - r.Direct.P50).ToList();
            Stats.Note($"open loop, {connections} connections at half load: the gateway adds at p50 median {Stats.Spread(addedPaced, 3)} ms (target ≤ 1 ms: {Verdict(Stats.Median(addedPaced))}); " +
                $"errors direct {paced.Sum(r => r.Direct.Errors)}, gateway {paced.Sum(r => r.Gateway.Errors)}");
            if (plain)
            {
                var loss = results.Select(r => r.Plain!.Throughput / r.Gateway.Throughput).ToList();
                Stats.Note($"reading the workers per request ÷ shared read, throughput per round: {Stats.Spread(loss)}");
            }
            Stats.Note($"unknown model → 404 through the gateway (auth, body, model lookup; no routing, no worker): " +
                $"{Stats.Spread(lookups.Select(l => l.Answers / (duration.TotalSeconds)).ToList(), 0)} answers/s per round");
            Stats.Note($"errors: direct {results.Sum(r => r.Direct.Errors)}, gateway {results.Sum(r => r.Gateway.Errors)}, read per request {results.Sum(r => r.Plain?.Errors ?? 0)}");
        }
        finally
        {
            if (workerProcess is { HasExited: false })
            {
                workerProcess.Kill(entireProcessTree: true);
                await workerProcess.WaitForExitAsync();
            }
            File.Delete(gguf);
        }
    }

    /// <summary>
    /// A gateway p50 below the direct one is not a fast gateway: the router holds requests beyond the worker's slots
    /// back (Workers:HolderWaitMilliseconds), so the ones it lets through meet a short queue and the rest wait (see p99).
    /// </summary>
    private static string Verdict(double addedMs) => addedMs < 0 ? "not comparable: the gateway queues in front of the worker, see p99" : addedMs <= 1 ? "met" : "NOT met";

    private static string FirstError(RunResult d, RunResult g, RunResult? pl) => (g.FirstError ?? pl?.FirstError ?? d.FirstError) is { } e ? " first error: " + e : "";

    private static ByteArrayContent Json(byte[] body) => new(body) { Headers = { ContentType = new MediaTypeHeaderValue("application/json") } };
}
