using System.Net.Http.Headers;
using System.Text;
using LoraDeploy.Lora.Tests.Support;
using LoraDeploy.Workers;

namespace LoraDeploy.ServingBench;

/// <summary>
/// Gateway overhead (issue 13): the same minimal completion (the tiny model's base, max_tokens 1, temperature 0) sent
/// straight to the worker (<c>POST {worker}/internal/v1/infer</c> with its call key and protocol headers) and through
/// the server (<c>POST /v1/completions</c>), 64 connections each, in interleaved rounds.
/// </summary>
public static class GatewayBench
{
    public static async Task RunAsync(int rounds, TimeSpan duration, int connections, int workerSlots)
    {
        var model = new TinyLlama().Generate();
        Directory.CreateDirectory(BenchPaths.Scratch);
        var gguf = model.WriteGguf(Path.Combine(BenchPaths.Scratch, $"gateway-tiny-{Environment.ProcessId}.gguf"));
        try
        {
            await using var h = await Harness.StartAsync(Harness.LlamaPool(gguf), new Dictionary<string, string?>
            {
                // 64 connections must not be refused by the per-pool limit.
                ["Workers:MaxOutstandingPerPool"] = "1000",
            }, withHub: false);
            var worker = await h.StartWorkerAsync("bench-worker", slots: workerSlots);
            var (_, user) = await h.CreateUserAsync("bench", connections);
            using var direct = new HttpClient(Harness.LoadHandler(connections)) { BaseAddress = new Uri(worker.Url), Timeout = TimeSpan.FromSeconds(120) };
            direct.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", worker.CallKey);

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
            await Load.ClosedLoopAsync("warm-direct", connections, TimeSpan.FromSeconds(5), Direct);
            await Load.ClosedLoopAsync("warm-gateway", connections, TimeSpan.FromSeconds(5), Gateway);

            var results = new List<(RunResult Direct, RunResult Gateway)>();
            var lookups = new List<(int Answers, RunResult Run)>();
            var single = new List<(RunResult Direct, RunResult Gateway)>();
            for (var round = 1; round <= rounds; round++)
            {
                RunResult d, g;
                // Alternate which goes first, so a slow minute does not always hit the same side.
                if (round % 2 == 1)
                {
                    d = await Load.ClosedLoopAsync("direct", connections, duration, Direct);
                    g = await Load.ClosedLoopAsync("gateway", connections, duration, Gateway);
                }
                else
                {
                    g = await Load.ClosedLoopAsync("gateway", connections, duration, Gateway);
                    d = await Load.ClosedLoopAsync("direct", connections, duration, Direct);
                }
                results.Add((d, g));
                // Counted as errors by the loop (404 is the point): its rate is answers ÷ time.
                var l = await Load.ClosedLoopAsync("lookup-404", connections, duration, Lookup);
                lookups.Add((l.Errors, l));
                // One connection: no queue anywhere, so the difference of latencies is what the gateway adds per request.
                var d1 = await Load.ClosedLoopAsync("direct-1", 1, duration / 2, Direct);
                var g1 = await Load.ClosedLoopAsync("gateway-1", 1, duration / 2, Gateway);
                single.Add((d1, g1));
                Console.WriteLine($"round {round}: direct {Stats.F(d.Throughput, 0)} req/s p50 {Stats.F(d.P50)} p99 {Stats.F(d.P99)} ms ({d.Errors} errors) | " +
                    $"gateway {Stats.F(g.Throughput, 0)} req/s p50 {Stats.F(g.P50)} p99 {Stats.F(g.P99)} ms ({g.Errors} errors){FirstError(d, g)}");
            }

            Stats.Table($"Gateway overhead, {connections} connections, Worker:Slots={workerSlots}, {rounds} rounds of {duration.TotalSeconds:F0} s each",
                ["round", "direct req/s", "direct p50 / p99 ms", "gateway req/s", "gateway p50 / p99 ms", "gateway adds at p50 (ms)", "throughput × direct"],
                results.Select((r, i) => (IReadOnlyList<string>)
                [
                    (i + 1).ToString(System.Globalization.CultureInfo.InvariantCulture),
                    Stats.F(r.Direct.Throughput, 0), $"{Stats.F(r.Direct.P50)} / {Stats.F(r.Direct.P99)}",
                    Stats.F(r.Gateway.Throughput, 0), $"{Stats.F(r.Gateway.P50)} / {Stats.F(r.Gateway.P99)}",
                    Stats.F(r.Gateway.P50 - r.Direct.P50), Stats.F(r.Gateway.Throughput / r.Direct.Throughput),
                ]));
            var added = results.Select(r => r.Gateway.P50 - r.Direct.P50).ToList();
            var ratio = results.Select(r => r.Gateway.Throughput / r.Direct.Throughput).ToList();
            Stats.Note($"gateway adds at p50: median {Stats.Spread(added)} ms (target ≤ 1 ms: {Verdict(Stats.Median(added))})");
            Stats.Note($"gateway throughput ÷ direct: median {Stats.Spread(ratio)} (target ≥ 0.8: {(Stats.Median(ratio) >= 0.8 ? "met" : "NOT met")})");
            Stats.Table($"One connection, {rounds} rounds of {duration.TotalSeconds / 2:F0} s each (what the gateway adds to one request)",
                ["round", "direct req/s", "direct p50 / p99 ms", "gateway req/s", "gateway p50 / p99 ms", "gateway adds at p50 (ms)"],
                single.Select((r, i) => (IReadOnlyList<string>)
                [
                    (i + 1).ToString(System.Globalization.CultureInfo.InvariantCulture),
                    Stats.F(r.Direct.Throughput, 0), $"{Stats.F(r.Direct.P50, 3)} / {Stats.F(r.Direct.P99, 3)}",
                    Stats.F(r.Gateway.Throughput, 0), $"{Stats.F(r.Gateway.P50, 3)} / {Stats.F(r.Gateway.P99, 3)}",
                    Stats.F(r.Gateway.P50 - r.Direct.P50, 3),
                ]));
            var addedSingle = single.Select(r => r.Gateway.P50 - r.Direct.P50).ToList();
            Stats.Note($"one connection: gateway adds at p50 median {Stats.Spread(addedSingle, 3)} ms (target ≤ 1 ms: {Verdict(Stats.Median(addedSingle))})");
            Stats.Note($"unknown model → 404 through the gateway (auth, body, model lookup; no routing, no worker): " +
                $"{Stats.Spread(lookups.Select(l => l.Answers / (duration.TotalSeconds)).ToList(), 0)} answers/s per round");
            Stats.Note($"errors: direct {results.Sum(r => r.Direct.Errors)}, gateway {results.Sum(r => r.Gateway.Errors)}");
        }
        finally
        {
            File.Delete(gguf);
        }
    }

    /// <summary>
    /// A gateway p50 below the direct one is not a fast gateway: the router holds requests beyond the worker's slots
    /// back (Workers:HolderWaitMilliseconds), so the ones it lets through meet a short queue and the rest wait (see p99).
    /// </summary>
    private static string Verdict(double addedMs) => addedMs < 0 ? "not comparable: the gateway queues in front of the worker, see p99" : addedMs <= 1 ? "met" : "NOT met";

    private static string FirstError(RunResult d, RunResult g) => (g.FirstError ?? d.FirstError) is { } e ? " first error: " + e : "";

    private static ByteArrayContent Json(byte[] body) => new(body) { Headers = { ContentType = new MediaTypeHeaderValue("application/json") } };
}
