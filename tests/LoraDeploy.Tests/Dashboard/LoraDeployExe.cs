using System.Diagnostics;
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

}
