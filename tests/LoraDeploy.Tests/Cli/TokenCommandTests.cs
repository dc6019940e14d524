using System.Diagnostics;
using System.Net;

namespace LoraDeploy.Tests.Cli;

/// <summary><c>loradeploy token create</c> beside a running server on the same data, on SQLite and PostgreSQL.</summary>
public sealed class TokenCommandTests
{
    [Theory]
    [InlineData(TestDatabase.Sqlite)]
    [InlineData(TestDatabase.Postgres)]
    public async Task Token_create_works_while_a_server_runs_on_the_same_data(TestDatabase database)
    {
        var dataDir = Path.Combine(Path.GetTempPath(), "loradeploy-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dataDir);
        var settings = new Dictionary<string, string?> { ["Pipeline:Enabled"] = "false" };
        if (database == TestDatabase.Postgres)
        {
            settings["Database:Provider"] = "postgres";
            settings["ConnectionStrings:Postgres"] = await TestBackend.CreatePostgresDatabaseAsync();
        }
        try
        {
            await using var server = await ServerProcess.StartAsync(dataDir, settings);
            await CreateTokenBesideAsync(server, dataDir, settings);
        }
        finally
        {
            if (settings.TryGetValue("ConnectionStrings:Postgres", out var connection) && connection is not null)
            {
                await TestBackend.DropPostgresDatabaseAsync(connection);
            }
        }
    }

    private static async Task CreateTokenBesideAsync(ServerProcess server, string dataDir, Dictionary<string, string?> settings)
    {

        var args = new List<string> { "token", "create", "--user", "carol", "--data-dir", dataDir };
        args.AddRange(settings.Select(s => $"--{s.Key}={s.Value}"));
        var (exitCode, stdout, stderr) = await RunAsync(args);

        Assert.True(exitCode == 0, stderr);
        var token = stdout.TrimEnd().Split('\n')[^1].Trim();
        Assert.StartsWith("ld_", token);
        using var client = server.CreateClient(token);
        Assert.Equal(HttpStatusCode.OK, (await client.GetAsync("/deploy/list")).StatusCode);
        Assert.Equal("[]", await client.GetStringAsync("/v1/user/loras"));

        var (badExit, _, badError) = await RunAsync(["token", "create", "--user", "not a name", "--data-dir", dataDir]);
        Assert.Equal(2, badExit);
        Assert.Single(badError.Trim().Split('\n'));
    }

    private static async Task<(int ExitCode, string Stdout, string Stderr)> RunAsync(IEnumerable<string> args)
    {
        var start = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true };
        start.ArgumentList.Add(ServerProcess.ExecutablePath);
        foreach (var arg in args)
        {
            start.ArgumentList.Add(arg);
        }
        using var process = Process.Start(start)!;
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        await process.WaitForExitAsync(new CancellationTokenSource(TimeSpan.FromSeconds(60)).Token);
        return (process.ExitCode, await stdout, await stderr);
    }
}
