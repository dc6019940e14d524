using System.Diagnostics;
using BenchmarkDotNet.Running;
using LoraDeploy.Benchmarks;

// dotnet run -c Release --project bench/LoraDeploy.Benchmarks -- --filter '*' --job short
// "profile" prints best-of-1000 timings without BenchmarkDotNet (quick check on a busy machine), for both tensor orders.
if (args is ["profile"])
{
    var files = new FileSizeBenchmarks();
    files.Setup();
    foreach (var order in new[] { TensorOrder.Sorted, TensorOrder.ModuleOrder })
    {
        var bench = new ProberBenchmarks { Order = order };
        bench.Setup();
        var header = LoraDeploy.Lora.Safetensors.SafetensorsReader.Read(bench.File);
        Console.WriteLine($"-- {order}");
        (string Name, Func<int> Action)[] actions =
        [
            ("json", bench.JsonDocumentParse), ("read", bench.Read), ("read+probe", bench.ReadAndProbe),
            ("probe only", () => LoraDeploy.Lora.LoraProber.Probe(header, bench.File).ModuleCount),
            ("raw Utf8JsonReader pass", () =>
            {
                var reader = new System.Text.Json.Utf8JsonReader(bench.HeaderJson);
                var n = 0;
                while (reader.Read())
                {
                    n++;
                }
                return n;
            }),
            ("Utf8JsonReader + GetString names", () =>
            {
                var reader = new System.Text.Json.Utf8JsonReader(bench.HeaderJson);
                var n = 0;
                while (reader.Read())
                {
                    if (reader.TokenType == System.Text.Json.JsonTokenType.PropertyName && reader.CurrentDepth == 1)
                    {
                        n += reader.GetString()!.Length;
                    }
                }
                return n;
            }),
        ];
        // 10 rounds of 100 runs of each, interleaved, so that a burst of load on the shared machine hits every
        // operation alike rather than one of them; the first round is warm-up.
        var best = new double[actions.Length];
        Array.Fill(best, double.MaxValue);
        for (var round = 0; round <= 10; round++)
        {
            for (var a = 0; a < actions.Length; a++)
            {
                for (var i = 0; i < 100; i++)
                {
                    var watch = Stopwatch.StartNew();
                    actions[a].Action();
                    var elapsed = watch.Elapsed.TotalMilliseconds;
                    if (round > 0)
                    {
                        best[a] = Math.Min(best[a], elapsed);
                    }
                }
            }
        }
        for (var a = 0; a < actions.Length; a++)
        {
            var before = GC.GetAllocatedBytesForCurrentThread();
            actions[a].Action();
            var allocated = GC.GetAllocatedBytesForCurrentThread() - before;
            Console.WriteLine($"{actions[a].Name}: best {best[a]:0.000} ms, {allocated:N0} B allocated");
        }
        Console.WriteLine($"read / json: {best[1] / best[0]:0.00}x; read+probe / json: {best[2] / best[0]:0.00}x");
    }
    Console.WriteLine("-- files (sorted)");
    foreach (var (name, action) in new (string, Func<int>)[] { ("ProbeFile(1 MB)", files.Small), ("ProbeFile(1 GB sparse)", files.Large) })
    {
        var min = double.MaxValue;
        for (var i = 0; i < 1000; i++)
        {
            var watch = Stopwatch.StartNew();
            action();
            min = Math.Min(min, watch.Elapsed.TotalMilliseconds);
        }
        Console.WriteLine($"{name}: best {min:0.000} ms");
    }
    files.Cleanup();
    return;
}
// "loop <seconds> [read|probe] [module-order]" runs Read + Probe (or one of them) repeatedly on the sorted
// header (or the module-ordered one), for a sampling profiler (perf with DOTNET_PerfMapEnabled=1).
if (args is ["loop", var seconds, .. var rest])
{
    var which = rest.Where(a => a != "module-order").ToArray();
    var bench = new ProberBenchmarks { Order = rest.Contains("module-order") ? TensorOrder.ModuleOrder : TensorOrder.Sorted };
    bench.Setup();
    var header = LoraDeploy.Lora.Safetensors.SafetensorsReader.Read(bench.File);
    Func<int> action = which switch
    {
        ["read"] => bench.Read,
        ["probe"] => () => LoraDeploy.Lora.LoraProber.Probe(header, bench.File).ModuleCount,
        _ => bench.ReadAndProbe,
    };
    var until = Stopwatch.StartNew();
    var runs = 0;
    while (until.Elapsed.TotalSeconds < double.Parse(seconds, System.Globalization.CultureInfo.InvariantCulture))
    {
        action();
        runs++;
    }
    Console.WriteLine($"{runs} runs");
    return;
}
BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args);
