using System.Diagnostics;
using System.Text.RegularExpressions;
using LoraDeploy.Tests.Pipeline;
using LoraDeploy.Tests.Simulator;

namespace LoraDeploy.Tests.Docs;

/// <summary>
/// Runs the README's curl walk-through as written against a live server (a real <c>loradeploy serve</c>) whose
/// <c>Civitai:BaseUrl</c> points at the simulator holding the model and version the README names. Only the port
/// and the token placeholder are substituted.
/// </summary>
public sealed partial class ReadmeWalkthroughTests
{
    [GeneratedRegex(@"```bash\n(.*?)```", RegexOptions.Singleline)]
    private static partial Regex BashBlock();

    [Fact]
    public async Task The_readme_curl_walkthrough_works_as_written()
    {
        var readme = await File.ReadAllTextAsync(FindReadme());
        var start = readme.IndexOf("## Walk-through with curl", StringComparison.Ordinal);
        var end = readme.IndexOf("\n## ", start + 1, StringComparison.Ordinal);
        Assert.True(start >= 0, "README has no walk-through section");
        var blocks = BashBlock().Matches(readme[start..end]).Select(m => m.Groups[1].Value).ToList();
        Assert.Equal(3, blocks.Count);
        var url = Regex.Match(blocks[0], @"https://civitai\.com/models/(\d+)\?modelVersionId=(\d+)");
        Assert.True(url.Success, "the walk-through should use a CivitAI model URL");

        await using var simulator = await CivitaiSimulator.StartAsync();
        simulator.AddModel("Pixel Art", id: int.Parse(url.Groups[1].Value))
            .AddVersion("Flux.1 D", trainedWords: ["pixel art"], id: int.Parse(url.Groups[2].Value))
            .AddFile(AdapterFiles.Flux1(seed: 42, rank: 16), "pixel-art.safetensors", primary: true);
        var dataDir = Path.Combine(Path.GetTempPath(), "loradeploy-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dataDir);
        var settings = new Dictionary<string, string?>(simulator.Configuration());
        await using var server = await ServerProcess.StartAsync(dataDir, settings);
        var token = Regex.Match(server.Output, @"shown once\): (ld_\S+)").Groups[1].Value;
        Assert.False(string.IsNullOrEmpty(token), server.Output);

        var script = string.Join("\n", blocks)
            .Replace("http://127.0.0.1:8080", server.BaseUrl.ToString().TrimEnd('/'), StringComparison.Ordinal)
            .Replace("ld_put_your_token_here", token, StringComparison.Ordinal);
        var (exitCode, output) = await RunBashAsync("set -euo pipefail\n" + script);
        await File.WriteAllTextAsync(Path.Combine(AppContext.BaseDirectory, "readme-walkthrough.out"), output); // to refresh the README's sample output

        Assert.True(exitCode == 0, $"walk-through failed ({exitCode}):\n{output}\n--- server ---\n{server.Output}");
        Assert.Contains("\"status\":\"initializing\"", output);
        Assert.Contains("\"status\":\"deploying\"", output);
        Assert.Contains("\"model_name\":\"admin/pixel-art\"", output);
        Assert.Contains("{\"lora_name\":\"pixel-art\",\"deploy_id\":", output);
    }

    private static async Task<(int ExitCode, string Output)> RunBashAsync(string script)
    {
        var start = new ProcessStartInfo("bash") { RedirectStandardInput = true, RedirectStandardOutput = true, RedirectStandardError = true };
        using var process = Process.Start(start)!;
        await process.StandardInput.WriteAsync(script);
        process.StandardInput.Close();
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(90));
        await process.WaitForExitAsync(timeout.Token);
        return (process.ExitCode, await stdout + await stderr);
    }

    private static string FindReadme()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            var candidate = Path.Combine(dir.FullName, "README.md");
            if (File.Exists(candidate) && File.Exists(Path.Combine(dir.FullName, "LoraDeploy.slnx")))
            {
                return candidate;
            }
        }
        throw new FileNotFoundException("README.md not found above the test output");
    }
}
