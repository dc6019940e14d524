using System.Diagnostics;
using System.Net;
using System.Net.Http.Headers;
using System.Net.Sockets;
using System.Text.RegularExpressions;

namespace LoraDeploy.Tests;

/// <summary>
/// The real <c>loradeploy serve</c> as a child process (the build output next to the tests), for tests that
/// kill a server mid-work or run several replicas. Output is captured for failure messages.
/// </summary>
public sealed partial class ServerProcess : IAsyncDisposable
{
    private readonly Process _process;
    private readonly ProcessOutput _output;

    private ServerProcess(Process process)
    {
        _process = process;
        // "LoraDeploy is listening on http://127.0.0.1:PORT (…)" from serve, "LoraDeploy worker is listening on …" from worker.
        _output = new ProcessOutput(process, ListeningLine(), match => new Uri(match.Groups[1].Value));
    }

    /// <summary>Where it listens: the port it was given by the system, as it printed it.</summary>
    public Uri BaseUrl { get; private set; } = null!;

    public string Output => _output.Text;

    public bool HasExited => _process.HasExited;

    /// <summary>The server's own process id (the pipeline's lease owners name it).</summary>
    public int ProcessId => _process.Id;

    public static string ExecutablePath => Path.Combine(AppContext.BaseDirectory, "loradeploy.dll");

    /// <summary>
    /// Starts <c>serve</c> in <paramref name="dataDir"/> on a loopback port the system picks, with <paramref name="settings"/> as
    /// <c>--Key=value</c>; waits until ready. Without <paramref name="dataDirArgument"/> no <c>--data-dir</c> is given,
    /// so the server picks its data folder by the default rule (./data of its working directory).
    /// </summary>
    public static async Task<ServerProcess> StartAsync(string dataDir, IReadOnlyDictionary<string, string?> settings, TimeSpan? readyTimeout = null,
        bool dataDirArgument = true) => await StartAsync(["serve"], dataDir, settings, readyTimeout, dataDirArgument);

    /// <summary><c>loradeploy worker</c> against <paramref name="server"/>, ready once its engines have loaded their base models.</summary>
    public static Task<ServerProcess> StartWorkerAsync(string dataDir, Uri server, string workerToken, IReadOnlyDictionary<string, string?> settings) =>
        StartAsync(["worker", "--server", server.ToString().TrimEnd('/'), "--token", workerToken], dataDir, settings, null, dataDirArgument: true);

    private static async Task<ServerProcess> StartAsync(string[] command, string dataDir, IReadOnlyDictionary<string, string?> settings, TimeSpan? readyTimeout,
        bool dataDirArgument)
    {
        var start = new ProcessStartInfo("dotnet")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
            WorkingDirectory = dataDir,
        };
        string[] dataDirArgs = dataDirArgument ? ["--data-dir", dataDir] : [];
        // Port 0: the server binds a port the system picks and prints it. A port found free beforehand can be taken by
        // another test's server before this one binds it, and that server would then answer this one's readiness check.
        string[] serveArgs = [ExecutablePath, .. command, "--urls", "http://127.0.0.1:0", .. dataDirArgs];
        foreach (var arg in serveArgs)
        {
            start.ArgumentList.Add(arg);
        }
        if (command[0] == "serve" && !settings.ContainsKey("RateLimits:RequestsPerMinute"))
        {
            // As in LoraDeployServer: polling tests would trip the default 600 a minute; the rate-limit tests set their own.
            start.ArgumentList.Add("--RateLimits:RequestsPerMinute=1000000");
        }
        foreach (var (key, value) in settings)
        {
            if (value is not null)
            {
                start.ArgumentList.Add($"--{key}={value}");
            }
        }
        start.Environment["DOTNET_NOLOGO"] = "1";
        var process = Process.Start(start) ?? throw new InvalidOperationException("dotnet did not start");
        var server = new ServerProcess(process);
        await server.WaitReadyAsync(readyTimeout ?? TimeSpan.FromSeconds(60));
        return server;
    }

    public HttpClient CreateClient(string? token = null)
    {
        var client = new HttpClient { BaseAddress = BaseUrl };
        if (token is not null)
        {
            client.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", token);
        }
        return client;
    }

    /// <summary>SIGKILL: no shutdown hooks, no flushing — what a crash looks like.</summary>
    public async Task KillAsync()
    {
        if (!_process.HasExited)
        {
            _process.Kill(entireProcessTree: true);
        }
        await _process.WaitForExitAsync();
    }

    private async Task WaitReadyAsync(TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        BaseUrl = await _output.ListeningAsync("loradeploy", timeout);
        using var client = new HttpClient { BaseAddress = BaseUrl, Timeout = TimeSpan.FromSeconds(2) };
        while (DateTime.UtcNow < deadline)
        {
            ThrowIfExited();
            try
            {
                if ((await client.GetAsync("/ready")).StatusCode == HttpStatusCode.OK)
                {
                    return;
                }
            }
            catch (HttpRequestException)
            {
            }
            catch (TaskCanceledException)
            {
            }
            await Task.Delay(100);
        }
        throw new TimeoutException($"loradeploy serve was not ready within {timeout}:\n{Output}");
    }

    private void ThrowIfExited()
    {
        if (_process.HasExited)
        {
            throw new InvalidOperationException($"loradeploy serve exited with {_process.ExitCode}:\n{Output}");
        }
    }

    public static int FreePort()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }

    public async ValueTask DisposeAsync()
    {
        await KillAsync();
        _process.Dispose();
    }

    [GeneratedRegex(@"^LoraDeploy (?:worker )?is listening on (http://127\.0\.0\.1:\d+)")]
    private static partial Regex ListeningLine();
}
