using System.Diagnostics;
using System.Globalization;
using System.Net.Http.Json;
using System.Text.Json;
using System.Text.RegularExpressions;
using LoraDeploy.Lora.Tests.Support;
using LoraDeploy.Tests;
using LoraDeploy.Tests.Simulator;

// Import throughput: create → deploying for one large file from the loopback CivitAI simulator, against
// `curl -sL URL -o FILE; sync FILE` fetching the same bytes through the same redirect in the same run.
// Usage: dotnet run -c Release --project bench/LoraDeploy.ImportBench -- [sizeMiB=256] [runs=3]
// Or: … -- s3-upload [sizeMiB=256] [runs=2]: an upload-import into the S3 store against curl -T to the same s3rver (S3UploadBench.cs).
if (args is ["s3-upload", .. var s3Args])
{
    return await LoraDeploy.ImportBench.S3UploadBench.RunAsync(s3Args);
}
var sizeMiB = args.Length > 0 ? int.Parse(args[0], CultureInfo.InvariantCulture) : 256;
var runs = args.Length > 1 ? int.Parse(args[1], CultureInfo.InvariantCulture) : 3;
var work = Path.Combine(Path.GetTempPath(), $"loradeploy-importbench-{Environment.ProcessId}");
Directory.CreateDirectory(work);

// A real-shaped FLUX.1 kohya LoRA of about sizeMiB: three modules, rank chosen to reach the size.
const long bytesPerRank = 2L * ((3072 + 9216) + (3072 + 12288) + (3072 + 21504));
var rank = (int)(sizeMiB * 1024L * 1024 / bytesPerRank);
var content = new SafetensorsWriter()
    .Metadata("ss_network_module", "networks.lora_flux")
    .Metadata("bench_run", "000")
    .Lora("lora_unet_double_blocks_0_img_attn_qkv", rank, 3072, 9216, alpha: 16, dtype: "BF16")
    .Lora("lora_unet_double_blocks_0_img_mlp_0", rank, 3072, 12288, alpha: 16, dtype: "BF16")
    .Lora("lora_unet_single_blocks_37_linear1", rank, 3072, 21504, alpha: 16, dtype: "BF16")
    .ToBytes();
Console.WriteLine($"file: {content.Length / 1048576.0:F1} MiB (rank {rank})");

await using var simulator = await CivitaiSimulator.StartAsync();
var warmup = simulator.AddLora(new SafetensorsWriter()
    .Lora("lora_unet_double_blocks_0_img_attn_qkv", 4, 3072, 9216, alpha: 4, dtype: "BF16").ToBytes(), baseModel: "Flux.1 D");
// One version per run, each with different bytes (the run number is in the header), so no run is a dedup hit.
var marker = System.Text.Encoding.ASCII.GetBytes("\"bench_run\":\"000\"");
var markerAt = content.AsSpan(0, 4096).IndexOf(marker);
var versions = Enumerable.Range(1, runs).Select(run =>
{
    var copy = (byte[])content.Clone();
    System.Text.Encoding.ASCII.GetBytes($"\"bench_run\":\"{run:000}\"").CopyTo(copy, markerAt);
    return simulator.AddLora(copy, baseModel: "Flux.1 D");
}).ToList();
var downloadUrl = $"{simulator.ApiBaseUrl}/api/download/models/{versions[0].Id}";

// These VMs hand freed memory back to the host and charge ~3 ms/MiB to touch fresh pages: warm the page cache and
// the allocator with a few hundred MiB first (DESIGN.md), so neither contender pays that in its timed run.
var warm = Path.Combine(work, "warm.bin");
await File.WriteAllBytesAsync(warm, new byte[512 * 1024 * 1024]);
File.Delete(warm);

// One running server (as in production): start it and import a small file first, so start-up and JIT are not timed.
var dataDir = Path.Combine(work, "server");
Directory.CreateDirectory(dataDir);
var verbose = Environment.GetEnvironmentVariable("IMPORTBENCH_VERBOSE") == "1";
var settings = new Dictionary<string, string?>(simulator.Configuration()) { ["Logging:LogLevel:Default"] = verbose ? "Information" : "Warning" };
await using var server = await ServerProcess.StartAsync(dataDir, settings);
var token = Regex.Match(server.Output, @"shown once\): (ld_\S+)").Groups[1].Value;
using var client = server.CreateClient(token);
await ImportAsync("warmup", warmup);

var curlTimes = new List<double>();
var importTimes = new List<double>();
var rssGrowth = new List<long>();
for (var run = 1; run <= runs; run++)
{
    curlTimes.Add(await CurlAsync(downloadUrl, Path.Combine(work, "curl.bin")));
    var (seconds, growth) = await ImportAsync($"big-{run}", versions[run - 1]);
    importTimes.Add(seconds);
    rssGrowth.Add(growth);
    Console.WriteLine($"run {run}: curl+sync {curlTimes[^1]:F3} s, import {seconds:F3} s, ratio {curlTimes[^1] / seconds:F2}, server RSS growth {growth / 1048576.0:F1} MiB");
}
var curlMedian = Median(curlTimes);
var importMedian = Median(importTimes);
var mib = content.Length / 1048576.0;
if (verbose)
{
    Console.WriteLine(server.Output);
}
// Each run's ratio compares contenders timed back to back; their spread says how far one run can be trusted here.
var ratios = curlTimes.Zip(importTimes, (curl, import) => curl / import).Order().ToList();
Console.WriteLine($"median: curl+sync {curlMedian:F3} s ({mib / curlMedian:F0} MiB/s), import {importMedian:F3} s ({mib / importMedian:F0} MiB/s), throughput ratio {Median(ratios):F2} (runs {ratios[0]:F2}-{ratios[^1]:F2}), max RSS growth {rssGrowth.Max() / 1048576.0:F1} MiB");
Directory.Delete(work, recursive: true);
return 0;

async Task<double> CurlAsync(string url, string file)
{
    var clock = Stopwatch.StartNew();
    await RunAsync("bash", "-c", $"curl -sfL '{url}' -o '{file}' && sync '{file}'");
    var seconds = clock.Elapsed.TotalSeconds;
    File.Delete(file);
    return seconds;
}

async Task<(double Seconds, long RssGrowth)> ImportAsync(string name, SimVersion version)
{
    var baseline = Rss(server.ProcessId);
    var peak = baseline;

    var clock = Stopwatch.StartNew();
    var created = await client.PostAsJsonAsync("/v1/lora/create", new Dictionary<string, object>
    {
        ["lora_name"] = name,
        ["base_model"] = "black-forest-labs/FLUX-1-dev",
        ["source"] = new Dictionary<string, string> { ["type"] = "civitai", ["civit_url"] = $"https://civitai.com/models/{version.Model.Id}?modelVersionId={version.Id}" },
        ["private"] = true,
    });
    var deployId = JsonDocument.Parse(await created.Content.ReadAsStringAsync()).RootElement.GetProperty("deploy_id").GetString();
    while (true)
    {
        var deploy = JsonDocument.Parse(await client.GetStringAsync($"/deploy/{deployId}")).RootElement;
        var status = deploy.GetProperty("status").GetString();
        peak = Math.Max(peak, Rss(server.ProcessId));
        if (status == "deploying")
        {
            break;
        }
        if (status == "failed")
        {
            throw new InvalidOperationException(deploy.GetProperty("fail_reason").GetString());
        }
        await Task.Delay(10);
    }
    return (clock.Elapsed.TotalSeconds, peak - baseline);
}

static long Rss(int pid)
{
    foreach (var line in File.ReadLines($"/proc/{pid}/status"))
    {
        if (line.StartsWith("VmRSS:", StringComparison.Ordinal))
        {
            return long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1], CultureInfo.InvariantCulture) * 1024;
        }
    }
    return 0;
}

static double Median(List<double> values)
{
    var sorted = values.Order().ToList();
    return sorted[sorted.Count / 2];
}

static async Task RunAsync(string file, params string[] arguments)
{
    var start = new ProcessStartInfo(file);
    foreach (var argument in arguments)
    {
        start.ArgumentList.Add(argument);
    }
    using var process = Process.Start(start)!;
    await process.WaitForExitAsync();
    if (process.ExitCode != 0)
    {
        throw new InvalidOperationException($"{file} exited with {process.ExitCode}");
    }
}
