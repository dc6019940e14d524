using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;

namespace LoraDeploy.Tests.Dashboard;

/// <summary>The result of running the real <c>loradeploy</c> executable.</summary>
public sealed record CliResult(int ExitCode, string StdOut, string StdErr)
{
    public override string ToString() => $"exit {ExitCode}\n--- stdout ---\n{StdOut}\n--- stderr ---\n{StdErr}";
}

/// <summary>Runs the built <c>loradeploy.dll</c> (copied next to the tests by the project reference) as a child process.</summary>
public static class LoraDeployExe
{
    public static string DllPath
    {
        get
        {
            var path = Path.Combine(AppContext.BaseDirectory, "loradeploy.dll");
            return File.Exists(path) ? path : throw new FileNotFoundException("loradeploy.dll is not next to the tests", path);
        }
    }

    public static ProcessStartInfo StartInfo(IEnumerable<string> args, IReadOnlyDictionary<string, string?>? env = null)
    {
        var psi = new ProcessStartInfo("dotnet")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
            WorkingDirectory = AppContext.BaseDirectory,
            StandardOutputEncoding = Encoding.UTF8,
            StandardErrorEncoding = Encoding.UTF8,
        };
        psi.ArgumentList.Add(DllPath);
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }
        // A clean slate: the caller's own server/token must not leak into a test.
        psi.Environment.Remove("LORADEPLOY_SERVER");
        psi.Environment.Remove("LORADEPLOY_TOKEN");
        psi.Environment["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1";
        psi.Environment["DOTNET_NOLOGO"] = "1";
        foreach (var (k, v) in env ?? new Dictionary<string, string?>())
        {
            psi.Environment[k] = v;
        }
        return psi;
    }

    public static async Task<CliResult> RunAsync(IEnumerable<string> args, IReadOnlyDictionary<string, string?>? env = null,
        TimeSpan? timeout = null)
    {
        using var process = Process.Start(StartInfo(args, env)) ?? throw new InvalidOperationException("dotnet did not start");
        process.StandardInput.Close();
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(timeout ?? TimeSpan.FromSeconds(90));
        try
        {
            await process.WaitForExitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            process.Kill(entireProcessTree: true);
            await process.WaitForExitAsync();
            throw new TimeoutException($"loradeploy {string.Join(' ', args)} did not finish:\n{await stdout}\n{await stderr}");
        }
        return new CliResult(process.ExitCode, await stdout, await stderr);
    }

    public static int FreePort()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }
}

/// <summary>
/// The real server, started as <c>loradeploy serve</c> on a loopback port with a throwaway data dir, as a
/// user would run it (DESIGN.md "external interface"). Talks to the given CivitAI base URL.
/// </summary>
public sealed class LoraDeployProcess : IAsyncDisposable
{
    private readonly Process _process;
    private readonly StringBuilder _log = new();

    private LoraDeployProcess(Process process, Uri baseUrl, string dataDir)
    {
        _process = process;
        BaseUrl = baseUrl;
        DataDir = dataDir;
    }

    public Uri BaseUrl { get; }

    public string DataDir { get; }

    public string Log
    {
        get
        {
            lock (_log)
            {
                return _log.ToString();
            }
        }
    }

    public static async Task<LoraDeployProcess> StartAsync(Uri? civitaiBaseUrl, CancellationToken ct = default)
    {
        var dataDir = Path.Combine(Path.GetTempPath(), "loradeploy-e2e-" + Guid.NewGuid().ToString("N")[..12]);
        Directory.CreateDirectory(dataDir);
        var port = LoraDeployExe.FreePort();
        var baseUrl = new Uri($"http://127.0.0.1:{port}/");
        List<string> args = ["serve", "--urls", baseUrl.ToString().TrimEnd('/'), "--data-dir", dataDir];
        if (civitaiBaseUrl is not null)
        {
            args.Add($"--Civitai:BaseUrl={civitaiBaseUrl.ToString().TrimEnd('/')}");
            // Loopback is refused by the SSRF guard unless listed; list it both as a string and as an array item.
            args.Add("--Network:AllowedPrivateRanges=127.0.0.0/8");
            args.Add("--Network:AllowedPrivateRanges:0=127.0.0.0/8");
        }
        var psi = LoraDeployExe.StartInfo(args, new Dictionary<string, string?> { ["ASPNETCORE_ENVIRONMENT"] = "Development" });
        var process = Process.Start(psi) ?? throw new InvalidOperationException("server did not start");
        var server = new LoraDeployProcess(process, baseUrl, dataDir);
        process.OutputDataReceived += (_, e) => server.Append(e.Data);
        process.ErrorDataReceived += (_, e) => server.Append(e.Data);
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();

        using var http = new HttpClient { BaseAddress = baseUrl, Timeout = TimeSpan.FromSeconds(2) };
        var deadline = Stopwatch.StartNew();
        while (deadline.Elapsed < TimeSpan.FromSeconds(60))
        {
            if (process.HasExited)
            {
                var log = server.Log;
                await server.DisposeAsync();
                throw new InvalidOperationException($"loradeploy serve exited with {process.ExitCode}:\n{log}");
            }
            try
            {
                using var response = await http.GetAsync("health", ct);
                if (response.IsSuccessStatusCode)
                {
                    return server;
                }
            }
            catch (HttpRequestException)
            {
            }
            catch (TaskCanceledException) when (!ct.IsCancellationRequested)
            {
            }
            await Task.Delay(200, ct);
        }
        var text = server.Log;
        await server.DisposeAsync();
        throw new TimeoutException($"loradeploy serve did not answer /health within 60 s:\n{text}");
    }

    /// <summary><c>loradeploy token create --user NAME</c>: the token is the last line of stdout.</summary>
    public async Task<string> CreateTokenAsync(string user)
    {
        var result = await LoraDeployExe.RunAsync(["token", "create", "--user", user, "--data-dir", DataDir]);
        Assert.True(result.ExitCode == 0, $"token create failed: {result}");
        var lines = result.StdOut.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        Assert.NotEmpty(lines);
        return lines[^1];
    }

    private void Append(string? line)
    {
        if (line is null)
        {
            return;
        }
        lock (_log)
        {
            _log.AppendLine(line);
        }
    }

    public async ValueTask DisposeAsync()
    {
        try
        {
            if (!_process.HasExited)
            {
                _process.Kill(entireProcessTree: true);
                await _process.WaitForExitAsync();
            }
        }
        catch (InvalidOperationException)
        {
        }
        _process.Dispose();
        try
        {
            Directory.Delete(DataDir, recursive: true);
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
    }
}
