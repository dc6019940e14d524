using LoraDeploy.Tests.Dashboard;

namespace LoraDeploy.Tests.Workers;

/// <summary><c>loradeploy worker</c>'s usage errors: one line on stderr, exit 2.</summary>
public sealed class WorkerCommandTests
{
    [Theory]
    [InlineData("--server", "--token", FakeWorkerServer.Token)]
    [InlineData("--token", "--server", "http://127.0.0.1:8080")]
    public async Task A_missing_required_option_is_one_line_naming_it(string missing, string given, string value)
    {
        var result = await LoraDeployExe.RunAsync(["worker", given, value]);
        Assert.Equal(2, result.ExitCode);
        var line = Assert.Single(result.StdErr.Trim().Split('\n'));
        Assert.Contains(missing, line);
    }

    [Theory]
    [InlineData("ftp://example.com", FakeWorkerServer.Token, "--server")]
    [InlineData("not a url", FakeWorkerServer.Token, "--server")]
    [InlineData("http://127.0.0.1:8080", "ld_abcdefghijkl_0123456789abcdefghijklmnopqrstuvwxyzABCDEFG", "--token")]
    [InlineData("http://127.0.0.1:8080", "ldw_short", "--token")]
    public async Task A_bad_server_url_or_token_form_is_one_line_naming_the_option(string server, string token, string named)
    {
        var result = await LoraDeployExe.RunAsync(["worker", "--server", server, "--token", token]);
        Assert.Equal(2, result.ExitCode);
        var line = Assert.Single(result.StdErr.Trim().Split('\n'));
        Assert.Contains(named, line);
        Assert.Empty(result.StdOut.Trim());
    }

    [Fact]
    public async Task A_worker_without_a_pool_for_its_engines_says_which_setting_is_missing()
    {
        var dataDir = Path.Combine(Path.GetTempPath(), "loradeploy-tests", Guid.NewGuid().ToString("N"));
        var result = await LoraDeployExe.RunAsync(["worker", "--server", "http://127.0.0.1:9", "--token", FakeWorkerServer.Token,
            "--urls", "http://127.0.0.1:0", "--data-dir", dataDir]);
        Assert.Equal(2, result.ExitCode);
        Assert.Contains("BaseModels:{name}:Engine", Assert.Single(result.StdErr.Trim().Split('\n')));
    }
}
