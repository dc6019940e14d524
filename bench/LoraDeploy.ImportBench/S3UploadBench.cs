using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using System.Text.RegularExpressions;
using LoraDeploy.Lora.Tests.Support;
using LoraDeploy.Tests;

namespace LoraDeploy.ImportBench;

/// <summary>
/// <c>s3-upload [sizeMiB=256] [runs=2]</c>: an upload-import of a LoRA into <c>Storage:Provider=s3</c> (s3rver on
/// loopback), timed until the request answers (the blob is stored in the bucket), against <c>curl -T</c> of the same
/// bytes to the same s3rver. Both go through curl, so the client side is the same program. <c>S3BENCH_FILESYSTEM=1</c>
/// uploads into the filesystem store instead (the part of the time that is not the bucket's).
/// </summary>
internal static class S3UploadBench
{
    public static async Task<int> RunAsync(string[] args)
    {
        var sizeMiB = args.Length > 0 ? int.Parse(args[0], CultureInfo.InvariantCulture) : 256;
        var runs = args.Length > 1 ? int.Parse(args[1], CultureInfo.InvariantCulture) : 2;
        var s3rver = Environment.GetEnvironmentVariable("LORADEPLOY_S3RVER") is { Length: > 0 } configured ? configured : "s3rver";
        var work = Directory.CreateTempSubdirectory("loradeploy-s3bench-").FullName;
        try
        {
            // The same real-shaped FLUX.1 kohya LoRA as the CivitAI import bench, one file per run (no dedup hit).
            const long bytesPerRank = 2L * ((3072 + 9216) + (3072 + 12288) + (3072 + 21504));
            var rank = (int)(sizeMiB * 1024L * 1024 / bytesPerRank);
            var files = Enumerable.Range(0, runs + 1).Select(run =>
            {
                var content = new SafetensorsWriter()
                    .Metadata("ss_network_module", "networks.lora_flux")
                    .Metadata("bench_run", run.ToString("000", CultureInfo.InvariantCulture))
                    .Lora("lora_unet_double_blocks_0_img_attn_qkv", run == 0 ? 4 : rank, 3072, 9216, alpha: 16, dtype: "BF16")
                    .Lora("lora_unet_double_blocks_0_img_mlp_0", run == 0 ? 4 : rank, 3072, 12288, alpha: 16, dtype: "BF16")
                    .Lora("lora_unet_single_blocks_37_linear1", run == 0 ? 4 : rank, 3072, 21504, alpha: 16, dtype: "BF16")
                    .ToBytes();
                var path = Path.Combine(work, $"run-{run}.safetensors");
                File.WriteAllBytes(path, content);
                return path;
            }).ToList();
            Console.WriteLine($"file: {new FileInfo(files[1]).Length / 1048576.0:F1} MiB (rank {rank}), {runs} runs");

            var port = ServerProcess.FreePort();
            var s3Dir = Directory.CreateDirectory(Path.Combine(work, "s3")).FullName;
            using var s3 = Start(s3rver, "--directory", s3Dir, "--port", port.ToString(CultureInfo.InvariantCulture), "--address", "127.0.0.1", "--silent");
            try
            {
                var endpoint = $"http://127.0.0.1:{port}";
                await WaitListeningAsync(port);
                await CurlAsync("-sf", "-X", "PUT", $"{endpoint}/bench"); // s3rver takes unsigned requests

                var dataDir = Directory.CreateDirectory(Path.Combine(work, "server")).FullName;
                var settings = new Dictionary<string, string?>
                {
                    ["Logging:LogLevel:Default"] = "Warning",
                    ["Storage:Provider"] = "s3",
                    ["Storage:S3:Bucket"] = "bench",
                    ["Storage:S3:Endpoint"] = endpoint,
                    ["Storage:S3:ForcePathStyle"] = "true",
                    ["Storage:S3:AccessKey"] = "S3RVER",
                    ["Storage:S3:SecretKey"] = "S3RVER",
                };
                if (Environment.GetEnvironmentVariable("S3BENCH_PARTS_IN_FLIGHT") is { Length: > 0 } inFlight)
                {
                    settings["Storage:S3:PartsInFlight"] = inFlight; // 1 = the parts one at a time
                }
                if (Environment.GetEnvironmentVariable("S3BENCH_FILESYSTEM") == "1")
                {
                    // For the breakdown: the same upload into the filesystem store (receive + checks + local commit only).
                    settings = new Dictionary<string, string?> { ["Logging:LogLevel:Default"] = "Warning" };
                }
                await using var server = await ServerProcess.StartAsync(dataDir, settings);
                var token = Regex.Match(server.Output, @"shown once\): (ld_\S+)").Groups[1].Value;
                await UploadAsync(server.BaseUrl, token, "warmup", files[0]); // start-up and JIT are not timed

                var curlTimes = new List<double>();
                var uploadTimes = new List<double>();
                for (var run = 1; run <= runs; run++)
                {
                    var clock = Stopwatch.StartNew();
                    await CurlAsync("-sf", "-T", files[run], $"{endpoint}/bench/curl-{run}.safetensors");
                    curlTimes.Add(clock.Elapsed.TotalSeconds);
                    uploadTimes.Add(await UploadAsync(server.BaseUrl, token, $"big-{run}", files[run]));
                    Console.WriteLine($"run {run}: curl -T {curlTimes[^1]:F3} s, upload-import {uploadTimes[^1]:F3} s, ratio {curlTimes[^1] / uploadTimes[^1]:F2}");
                }
                var ratios = curlTimes.Zip(uploadTimes, (curl, upload) => curl / upload).Order().ToList();
                var mib = new FileInfo(files[1]).Length / 1048576.0;
                Console.WriteLine($"median: curl -T {Median(curlTimes):F3} s ({mib / Median(curlTimes):F0} MiB/s), upload-import {Median(uploadTimes):F3} s ({mib / Median(uploadTimes):F0} MiB/s), ratio {Median(ratios):F2} (runs {ratios[0]:F2}-{ratios[^1]:F2})");
            }
            finally
            {
                s3.Kill(entireProcessTree: true);
                await s3.WaitForExitAsync();
            }
        }
        finally
        {
            Directory.Delete(work, recursive: true);
        }
        return 0;
    }

    /// <summary>The multipart create with curl; it answers once the blob is in the bucket and the rows are written.</summary>
    private static async Task<double> UploadAsync(Uri server, string token, string name, string file)
    {
        var json = $$"""{"lora_name":"{{name}}","base_model":"black-forest-labs/FLUX-1-dev","source":{"type":"upload"},"private":true}""";
        var clock = Stopwatch.StartNew();
        var answer = await CurlAsync("-sf", "-H", $"Authorization: Bearer {token}", "-F", $"json={json};type=application/json",
            "-F", $"file=@{file}", new Uri(server, "/v1/lora/create").ToString());
        var seconds = clock.Elapsed.TotalSeconds;
        if (!answer.Contains("deploy_id", StringComparison.Ordinal))
        {
            throw new InvalidOperationException($"upload of {name} answered: {answer}");
        }
        return seconds;
    }

    private static async Task<string> CurlAsync(params string[] arguments)
    {
        using var curl = Start("curl", arguments);
        var output = await curl.StandardOutput.ReadToEndAsync();
        await curl.WaitForExitAsync();
        if (curl.ExitCode != 0)
        {
            throw new InvalidOperationException($"curl {string.Join(' ', arguments)} exited with {curl.ExitCode}: {output}{await curl.StandardError.ReadToEndAsync()}");
        }
        return output;
    }

    private static Process Start(string file, params string[] arguments)
    {
        var start = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var argument in arguments)
        {
            start.ArgumentList.Add(argument);
        }
        return Process.Start(start) ?? throw new InvalidOperationException($"{file} did not start");
    }

    private static async Task WaitListeningAsync(int port)
    {
        for (var attempt = 0; attempt < 300; attempt++)
        {
            try
            {
                using var socket = new TcpClient();
                await socket.ConnectAsync("127.0.0.1", port);
                return;
            }
            catch (SocketException)
            {
                await Task.Delay(100);
            }
        }
        throw new TimeoutException($"s3rver did not listen on {port} within 30 s");
    }

    private static double Median(List<double> values)
    {
        var sorted = values.Order().ToList();
        return sorted[sorted.Count / 2];
    }
}
