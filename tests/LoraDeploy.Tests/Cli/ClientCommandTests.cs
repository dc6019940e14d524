using LoraDeploy.Tests.Dashboard;

namespace LoraDeploy.Tests.Cli;

/// <summary>The real <c>loradeploy</c> client commands, where no server is needed.</summary>
public class ClientCommandTests
{
    [Fact]
    public async Task Help_lists_the_client_commands()
    {
        var result = await LoraDeployExe.RunAsync(["--help"]);

        Assert.Equal(0, result.ExitCode);
        foreach (var command in new[] { "create", "status", "list", "delete", "stop", "start", "scale" })
        {
            Assert.Contains(command, result.StdOut);
        }
    }

    [Fact]
    public async Task Unreachable_server_is_one_readable_line_and_exit_1()
    {
        var port = ServerProcess.FreePort();

        var result = await LoraDeployExe.RunAsync(["list", "--server", $"http://127.0.0.1:{port}", "--token", "t"]);

        Assert.Equal(1, result.ExitCode);
        Assert.Equal("", result.StdOut);
        var line = Assert.Single(result.StdErr.Split('\n', StringSplitOptions.RemoveEmptyEntries));
        Assert.StartsWith($"error: cannot reach server at http://127.0.0.1:{port}/", line);
        Assert.DoesNotContain("Exception", result.StdErr);
    }

    [Fact]
    public async Task Unreachable_server_from_the_environment_is_reported_with_its_url()
    {
        var port = ServerProcess.FreePort();

        var result = await LoraDeployExe.RunAsync(["status", "pixel", "--json"],
            new Dictionary<string, string?> { ["LORADEPLOY_SERVER"] = $"http://127.0.0.1:{port}", ["LORADEPLOY_TOKEN"] = "t" });

        Assert.Equal(1, result.ExitCode);
        Assert.Equal("", result.StdOut);
        Assert.Contains($"cannot reach server at http://127.0.0.1:{port}/", result.StdErr);
    }

    [Theory]
    [InlineData("give exactly one of --civitai URL, --file PATH or --hf REPO", "create", "--name", "x", "--base", "b")]
    [InlineData("give exactly one of --civitai URL, --file PATH or --hf REPO", "create", "--name", "x", "--hf", "a/b", "--civitai", "https://civitai.com/models/1")]
    [InlineData("--public is for CivitAI LoRAs", "create", "--name", "x", "--hf", "a/b", "--public")]
    [InlineData("missing --base MODEL", "create", "--name", "x", "--civitai", "https://civitai.com/models/1")]
    [InlineData("missing --name NAME", "create", "--base", "b", "--civitai", "https://civitai.com/models/1")]
    [InlineData("give both --min N and --max N", "scale", "abc123def456", "--min", "1")]
    [InlineData("need 0 <= --min <= --max", "scale", "abc123def456", "--min", "3", "--max", "1")]
    [InlineData("--server must be an http(s) URL", "list", "--server", "ftp://example")]
    [InlineData("--max must be a whole number", "scale", "abc123def456", "--min", "0", "--max", "many")]
    [InlineData("give a LoRA name or a deploy id", "status")]
    [InlineData("give a LoRA name or a deploy id", "delete")]
    [InlineData("give a LoRA name or a deploy id", "stop")]
    [InlineData("--timeout must be a duration such as 90s, 10m or 1h", "status", "x", "--watch", "--timeout", "soon")]
    public async Task Usage_errors_exit_2_with_one_line(string message, params string[] args)
    {
        // Nothing listens here: a usage error must be caught before any request.
        var port = ServerProcess.FreePort();

        var result = await LoraDeployExe.RunAsync([.. args],
            new Dictionary<string, string?> { ["LORADEPLOY_SERVER"] = $"http://127.0.0.1:{port}" });

        Assert.Equal(2, result.ExitCode);
        Assert.Equal("", result.StdOut);
        var line = Assert.Single(result.StdErr.Split('\n', StringSplitOptions.RemoveEmptyEntries));
        Assert.Contains(message, line);
    }
}
