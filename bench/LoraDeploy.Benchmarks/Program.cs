using System.Diagnostics;
using BenchmarkDotNet.Running;
using LoraDeploy.Benchmarks;

// dotnet run -c Release --project bench/LoraDeploy.Benchmarks -- --filter '*' --job short
// "profile" prints best-of-N timings without BenchmarkDotNet (quick check on a busy machine).
if (args is ["profile"])
{
    var bench = new ProberBenchmarks();
    bench.Setup();
    var header = LoraDeploy.Lora.Safetensors.SafetensorsReader.Read(bench.File);
    var files = new FileSizeBenchmarks();
    files.Setup();
    foreach (var (name, action) in new (string, Func<int>)[]
    {
        ("probe only", () => LoraDeploy.Lora.LoraProber.Probe(header, bench.File).ModuleCount),
        ("json", bench.JsonDocumentParse), ("read", bench.Read), ("read+probe", bench.ReadAndProbe),
        ("probe only", () => LoraDeploy.Lora.LoraProber.Probe(header, bench.File).ModuleCount),
        ("read+probe", bench.ReadAndProbe),
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
        ("ProbeFile(1 MB)", files.Small), ("ProbeFile(1 GB sparse)", files.Large),
    })
    {
        var best = double.MaxValue;
        for (var i = 0; i < 1000; i++)
        {
            var watch = Stopwatch.StartNew();
            action();
            best = Math.Min(best, watch.Elapsed.TotalMilliseconds);
        }
        Console.WriteLine($"{name}: best {best:0.000} ms");
    }
    files.Cleanup();
    return;
}
// "loop <seconds> [read|probe]" runs Read + Probe (or one of them) repeatedly, for a sampling profiler
// (perf with DOTNET_PerfMapEnabled=1).
if (args is ["loop", var seconds, .. var which])
{
    var bench = new ProberBenchmarks();
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
