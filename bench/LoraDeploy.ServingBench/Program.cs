using System.Globalization;
using LoraDeploy.ServingBench;

// Serving benchmarks (issues 13, 14 and 15); method and numbers in docs/benchmarks.md § Serving.
// dotnet run -c Release --project bench/LoraDeploy.ServingBench -- <gateway|affinity|placement|llamacpp|comfyui> [options]
var command = args.FirstOrDefault();
int Arg(string name, int fallback)
{
    var i = Array.IndexOf(args, "--" + name);
    return i >= 0 && i + 1 < args.Length ? int.Parse(args[i + 1], CultureInfo.InvariantCulture) : fallback;
}

Console.WriteLine($"# {DateTime.UtcNow:yyyy-MM-dd HH:mm:ss} UTC, {Environment.ProcessorCount} CPUs, load average {LoadAverage()}");
switch (command)
{
    case "gateway":
        await GatewayBench.RunAsync(rounds: Arg("rounds", 5), duration: TimeSpan.FromSeconds(Arg("seconds", 6)), connections: Arg("connections", 64), workerSlots: Arg("slots", 4),
            snapshotMs: Arg("snapshot-ms", 250), workerCpu: Arg("worker-cpu", -1), profileSeconds: Arg("profile-seconds", 0), slices: Math.Max(1, Arg("slices", 5)), plain: Arg("plain", 0) == 1);
        break;
    case "affinity":
        await AffinityBench.RunAsync(rounds: Arg("rounds", 3), requests: Arg("requests", 600), concurrency: Arg("concurrency", 8),
            adapters: Arg("adapters", 20), maxAdaptersPerWorker: Arg("max-adapters", 12), retryWhileUnloading: Arg("retry-unloading", 0) == 1);
        break;
    case "placement":
        await PlacementBench.RunAsync(runs: Arg("runs", 20), heartbeatSeconds: Arg("heartbeat", 2));
        break;
    case "llamacpp":
        await LlamaCppBench.RunAsync(rounds: Arg("rounds", 5), tokens: Arg("tokens", 64), bigAdapterMiB: Arg("adapter-mib", 200), threads: Arg("threads", 1));
        break;
    case "comfyui":
        await ComfyUiBench.RunAsync(rounds: Arg("rounds", 5), requests: Arg("requests", 200), adapterMiB: Arg("adapter-mib", 200));
        break;
    default:
        Console.Error.WriteLine("usage: LoraDeploy.ServingBench <gateway|affinity|placement|llamacpp|comfyui> [--rounds N] [--seconds S] ...");
        return 2;
}
Console.WriteLine($"# done {DateTime.UtcNow:HH:mm:ss} UTC, load average {LoadAverage()}");
return 0;

static string LoadAverage() => File.Exists("/proc/loadavg") ? string.Join(' ', File.ReadAllText("/proc/loadavg").Split(' ').Take(3)) : "?";
