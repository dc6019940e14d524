using System.Diagnostics;
using System.Net;
using LoraDeploy.Tests.Dashboard;

namespace LoraDeploy.Tests.Cli;

/// <summary>One data-folder rule for every command: ./data of the directory the command was run from.</summary>
public sealed class DataDirectoryTests : IDisposable
{
    private readonly string _workDir = Path.Combine(Path.GetTempPath(), "loradeploy-tests", Guid.NewGuid().ToString("N"));

    public DataDirectoryTests() => Directory.CreateDirectory(_workDir);

    public void Dispose() => Directory.Delete(_workDir, recursive: true);

    [Fact]
    public async Task Token_create_and_serve_run_from_one_directory_share_its_data_folder()
    {
        var expected = Path.Combine(_workDir, "data");
        var start = LoraDeployExe.StartInfo(["token", "create", "--user", "alice"]);
        start.WorkingDirectory = _workDir;
        var created = await RunAsync(start);

        Assert.True(created.ExitCode == 0, created.ToString());
        Assert.Contains($"LoraDeploy data in {expected}", created.StdOut);
        var token = created.StdOut.TrimEnd().Split('\n')[^1].Trim();
        Assert.StartsWith("ld_", token);

        await using var server = await ServerProcess.StartAsync(_workDir, new Dictionary<string, string?> { ["Pipeline:Enabled"] = "false" },
            dataDirArgument: false);
        Assert.Contains($"LoraDeploy data in {expected}", server.Output);
        using var client = server.CreateClient(token);
        Assert.Equal(HttpStatusCode.OK, (await client.GetAsync("/v1/user/loras")).StatusCode);
        Assert.True(File.Exists(Path.Combine(expected, "loradeploy.db")));
    }

    [Fact]
    public async Task Dotnet_run_starts_the_program_in_the_directory_it_was_run_from()
    {
        // The Web SDK's default is the project folder, which put `dotnet run -- serve`'s data in src/LoraDeploy/data.
        var project = Path.Combine(RepositoryRoot(), "src", "LoraDeploy", "LoraDeploy.csproj");
        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = _workDir };
        foreach (var arg in new[] { "msbuild", project, "-getProperty:RunWorkingDirectory", "-nologo" })
        {
            start.ArgumentList.Add(arg);
        }
        start.Environment["DOTNET_NOLOGO"] = "1";
        start.Environment["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1";

        var result = await RunAsync(start);

        Assert.True(result.ExitCode == 0, result.ToString());
        Assert.Equal(Path.TrimEndingDirectorySeparator(_workDir), Path.TrimEndingDirectorySeparator(result.StdOut.Trim()));
    }

    private static async Task<CliResult> RunAsync(ProcessStartInfo start)
    {
        using var process = Process.Start(start) ?? throw new InvalidOperationException("dotnet did not start");
        if (start.RedirectStandardInput)
        {
            process.StandardInput.Close();
        }
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(120));
        await process.WaitForExitAsync(timeout.Token);
        return new CliResult(process.ExitCode, await stdout, await stderr);
    }

    private static string RepositoryRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "LoraDeploy.slnx")))
            {
                return dir.FullName;
            }
        }
        throw new DirectoryNotFoundException("LoraDeploy.slnx not found above the test output");
    }
}
