using System.Text.Json;
using System.Text.RegularExpressions;
using LoraDeploy.Tests.Dashboard;

namespace LoraDeploy.Tests.Cli;

/// <summary>
/// The real <c>loradeploy</c> client against a real server on loopback (its own process) that resolves and
/// downloads from the CivitAI simulator (<see cref="E2eEnvironment"/>). Output is redirected here, so the plain (non-ANSI) rendering is checked.
/// </summary>
public sealed partial class ClientCommandServerTests(E2eEnvironment env) : IClassFixture<E2eEnvironment>, IAsyncLifetime
{
    public async ValueTask InitializeAsync() => await env.StartAsync();

    public ValueTask DisposeAsync() => ValueTask.CompletedTask;

    private static JsonElement ParseOnly(CliResult result)
    {
        // --json prints the server's JSON and nothing else on stdout.
        using var doc = JsonDocument.Parse(result.StdOut);
        return doc.RootElement.Clone();
    }

    private static string[] ErrorLines(CliResult result) =>
        result.StdErr.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);

    [Fact]
    public async Task Create_without_waiting_then_status_list_scale_and_delete()
    {
        var created = await env.CliAsync("create", "--civitai", env.GoodUrl, "--base", E2eEnvironment.Flux,
            "--name", "cli-nowait", "--description", "from the CLI", "--no-wait", "--json");
        Assert.True(created.ExitCode == 0, created.ToString());
        var deploy = ParseOnly(created);
        Assert.Equal("lora", deploy.GetProperty("type").GetString());
        Assert.Equal($"{env.User}/cli-nowait", deploy.GetProperty("model_name").GetString());
        var id = deploy.GetProperty("deploy_id").GetString()!;

        // Private unless --public; the description arrives.
        var lora = await env.GetJsonAsync("v1/lora/cli-nowait");
        Assert.True(lora.GetProperty("private").GetBoolean());
        Assert.Equal("from the CLI", lora.GetProperty("description").GetString());

        var byName = await env.CliAsync("status", "cli-nowait", "--json");
        Assert.True(byName.ExitCode == 0, byName.ToString());
        Assert.Equal("cli-nowait", ParseOnly(byName).GetProperty("lora_name").GetString());

        var byId = await env.CliAsync("status", id, "--json");
        Assert.True(byId.ExitCode == 0, byId.ToString());
        Assert.Equal(id, ParseOnly(byId).GetProperty("deploy_id").GetString());
        Assert.False(ParseOnly(byId).TryGetProperty("lora_name", out _), "an id is looked up as a deploy");

        var plain = await env.CliAsync("status", id);
        Assert.True(plain.ExitCode == 0, plain.ToString());
        Assert.Contains($"{env.User}/cli-nowait", plain.StdOut);
        Assert.Contains($"(deploy {id})", plain.StdOut);
        Assert.DoesNotContain("\u001b[", plain.StdOut);

        var list = await env.CliAsync("list", "--json");
        Assert.True(list.ExitCode == 0, list.ToString());
        Assert.Contains(ParseOnly(list).EnumerateArray(), d => d.GetProperty("deploy_id").GetString() == id);

        var table = await env.CliAsync("list");
        Assert.True(table.ExitCode == 0, table.ToString());
        Assert.StartsWith("DEPLOY ID", table.StdOut);
        Assert.Contains(id, table.StdOut);

        var scaled = await env.CliAsync("scale", id, "--min", "0", "--max", "2", "--json");
        Assert.True(scaled.ExitCode == 0, scaled.ToString());
        Assert.Equal(id, ParseOnly(scaled).GetProperty("deploy_id").GetString());
        var settings = (await env.GetJsonAsync($"deploy/{id}")).GetProperty("settings");
        Assert.Equal(0, settings.GetProperty("min_instances").GetInt32());
        Assert.Equal(2, settings.GetProperty("max_instances").GetInt32());

        var deleted = await env.CliAsync("delete", "cli-nowait", "--json");
        Assert.True(deleted.ExitCode == 0, deleted.ToString());
        Assert.Equal(id, ParseOnly(deleted).GetProperty("deploy_id").GetString());
        Assert.Equal("deleted", (await env.GetJsonAsync($"deploy/{id}")).GetProperty("status").GetString());

        var again = await env.CliAsync("delete", id);
        Assert.True(again.ExitCode == 0, $"delete is idempotent: {again}");
        var againByName = await env.CliAsync("delete", "cli-nowait");
        Assert.True(againByName.ExitCode == 0, $"delete NAME is idempotent: {againByName}");
        Assert.Equal($"{env.User}/cli-nowait is already deleted (deploy {id})", againByName.StdOut.Trim());
        var filtered = await env.CliAsync("list", "--status", "deleted", "--json");
        Assert.Contains(ParseOnly(filtered).EnumerateArray(), d => d.GetProperty("deploy_id").GetString() == id);
    }

    [Fact]
    public async Task Create_follows_the_deploy_until_it_deploys_and_prints_the_final_deploy()
    {
        var result = await env.CliAsync("create", "--civitai", env.GoodUrl, "--base", E2eEnvironment.Flux,
            "--name", "cli-json", "--json");

        Assert.True(result.ExitCode == 0, result.ToString());
        var deploy = ParseOnly(result);
        Assert.Contains(deploy.GetProperty("status").GetString(), new[] { "deploying", "running" });
        Assert.Equal(env.Sha256, deploy.GetProperty("version").GetString());
        Assert.Equal("", deploy.GetProperty("fail_reason").GetString());

        var lora = await env.CliAsync("status", "cli-json", "--json");
        var body = ParseOnly(lora);
        Assert.Equal(env.File.Length, body.GetProperty("size_bytes").GetInt64());
        Assert.Equal(env.File.Length, body.GetProperty("downloaded_bytes").GetInt64());
        Assert.Equal("flux1", body.GetProperty("probe").GetProperty("architecture").GetString());
    }

    [Fact]
    public async Task Create_in_plain_output_prints_each_step_and_the_final_status_line()
    {
        var result = await env.CliAsync("create", "--civitai", env.GoodUrl, "--base", E2eEnvironment.Flux,
            "--name", "cli-plain", "--public");

        Assert.True(result.ExitCode == 0, result.ToString());
        Assert.DoesNotContain("\u001b", result.StdOut);
        var lines = result.StdOut.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        Assert.StartsWith($"created {env.User}/cli-plain deploy ", lines[0]);
        // Each step is a line of its own (a fast download may pass between two polls).
        Assert.Contains(lines, l => l is "initializing" or "downloading" or "deploying");
        Assert.Matches($@"^{Regex.Escape(env.User)}/cli-plain (deploying|running) \(deploy [a-z0-9]+\)$", lines[^1]);
        Assert.Contains(lines, l => l.StartsWith("version", StringComparison.Ordinal) && l.EndsWith(env.Sha256, StringComparison.Ordinal));
        Assert.False((await env.GetJsonAsync("v1/lora/cli-plain")).GetProperty("private").GetBoolean());
    }

    [Fact]
    public async Task Status_watch_follows_an_existing_deploy()
    {
        var deploy = await env.CreateViaApiAsync("cli-watch", env.GoodUrl);
        var id = deploy.GetProperty("deploy_id").GetString()!;

        var result = await env.CliAsync("status", id, "--watch", "--json");

        Assert.True(result.ExitCode == 0, result.ToString());
        var final = ParseOnly(result);
        Assert.Equal(id, final.GetProperty("deploy_id").GetString());
        Assert.Contains(final.GetProperty("status").GetString(), new[] { "deploying", "running" });
    }

    [Fact]
    public async Task Stop_and_start_only_where_the_lifecycle_allows()
    {
        var created = await env.CliAsync("create", "--civitai", env.GoodUrl, "--base", E2eEnvironment.Flux,
            "--name", "cli-stop", "--json");
        Assert.True(created.ExitCode == 0, created.ToString());
        var id = ParseOnly(created).GetProperty("deploy_id").GetString()!;

        var stop = await env.CliAsync("stop", "cli-stop", "--json"); // by name, like status and delete
        Assert.True(stop.ExitCode == 0, stop.ToString());
        Assert.Equal(id, ParseOnly(stop).GetProperty("deploy_id").GetString());
        Assert.Equal("stopped", ParseOnly(await env.CliAsync("status", id, "--json")).GetProperty("status").GetString());

        var stopAgain = await env.CliAsync("stop", id);
        Assert.Equal(1, stopAgain.ExitCode);
        var refused = Assert.Single(ErrorLines(stopAgain));
        Assert.Contains("stopped", refused);
        Assert.DoesNotContain("server error", refused); // a user mistake: the server's sentence, not a status code

        var start = await env.CliAsync("start", "cli-stop");
        Assert.True(start.ExitCode == 0, start.ToString());
        Assert.Equal($"starting deploy {id}", start.StdOut.Trim());

        var scaled = await env.CliAsync("scale", "cli-stop", "--min", "0", "--max", "2");
        Assert.True(scaled.ExitCode == 0, scaled.ToString());
        Assert.Equal(2, (await env.GetJsonAsync($"deploy/{id}")).GetProperty("settings").GetProperty("max_instances").GetInt32());
    }

    [Fact]
    public async Task Start_of_a_deploy_that_is_not_stopped_names_its_status()
    {
        var deploy = await env.CreateViaApiAsync("cli-early-stop", env.GoodUrl); // a failed import can be started (retried)
        var id = deploy.GetProperty("deploy_id").GetString()!;

        var start = await env.CliAsync("start", id);

        Assert.Equal(1, start.ExitCode);
        var line = Assert.Single(ErrorLines(start));
        Assert.StartsWith("error: ", line);
        Assert.Matches("initializing|downloading|deploying", line);
    }

    [Fact]
    public async Task Failed_create_prints_the_fail_reason_and_exits_1()
    {
        var result = await env.CliAsync("create", "--civitai", env.MissingUrl, "--base", E2eEnvironment.Flux,
            "--name", "cli-missing");

        Assert.Equal(1, result.ExitCode);
        Assert.Contains($"{env.User}/cli-missing failed", result.StdOut);
        var line = Assert.Single(ErrorLines(result));
        Assert.StartsWith("error: deploy failed: ", line);
        Assert.True(line.Length > "error: deploy failed: ".Length + 10, line);
        Assert.DoesNotContain("no reason given", line);

        var json = await env.CliAsync("status", "cli-missing", "--json");
        Assert.Equal(1, json.ExitCode);
        var body = ParseOnly(json);
        Assert.Equal("failed", body.GetProperty("status").GetString());
        Assert.EndsWith(body.GetProperty("fail_reason").GetString()!, line);
    }

    [Fact]
    public async Task Validation_errors_name_the_field_and_exit_1()
    {
        var result = await env.CliAsync("create", "--civitai", "https://example.com/not-civitai", "--base", E2eEnvironment.Flux,
            "--name", "-starts-with-dash", "--no-wait");

        Assert.Equal(1, result.ExitCode);
        Assert.Equal("", result.StdOut);
        var line = Assert.Single(ErrorLines(result));
        Assert.StartsWith("error: invalid request: ", line);
        Assert.Contains("body.lora_name: lora_name must be", line);
        Assert.Contains("body.source.civit_url: ", line);
        Assert.DoesNotContain("Value error", line);
    }

    [Fact]
    public async Task A_second_create_with_the_same_name_is_a_conflict()
    {
        await env.CreateViaApiAsync("cli-dup", env.MissingUrl);

        var result = await env.CliAsync("create", "--civitai", env.GoodUrl, "--base", E2eEnvironment.Flux,
            "--name", "cli-dup", "--no-wait", "--json");

        Assert.Equal(1, result.ExitCode);
        Assert.Equal("", result.StdOut);
        Assert.StartsWith("error: conflict: ", Assert.Single(ErrorLines(result)));
    }

    [Fact]
    public async Task A_refused_token_is_told_apart_from_a_missing_one()
    {
        var refused = await LoraDeployExe.RunAsync(["list", "--token", "ld_aaaaaaaaaaaa_wrong", "--server", env.BaseUrl.ToString()]);
        var fromEnv = await LoraDeployExe.RunAsync(["list", "--server", env.BaseUrl.ToString()],
            new Dictionary<string, string?> { ["LORADEPLOY_TOKEN"] = "ld_aaaaaaaaaaaa_wrong" });
        var missing = await LoraDeployExe.RunAsync(["list", "--server", env.BaseUrl.ToString()]);

        Assert.Equal(1, refused.ExitCode);
        Assert.Equal("error: not authenticated: the server refused the token from --token; check it, or create one with 'loradeploy token create --user NAME'",
            Assert.Single(ErrorLines(refused)));
        Assert.Equal(1, fromEnv.ExitCode);
        Assert.Contains("the server refused the token from LORADEPLOY_TOKEN", Assert.Single(ErrorLines(fromEnv)));
        Assert.Equal(1, missing.ExitCode);
        Assert.Equal("error: not authenticated: no token given; use --token TOKEN or set LORADEPLOY_TOKEN", Assert.Single(ErrorLines(missing)));
    }

    /// <summary>A LoRA whose download never ends: the storage host pauses an hour before each chunk.</summary>
    private string StalledUrl(int seed)
    {
        var version = env.Civitai.AddLora(AdapterFiles.Flux1(seed: seed, rank: 4), baseModel: "Flux.1 D", modelName: $"Stalled {seed}");
        version.File.Faults.ChunkDelay = TimeSpan.FromHours(1);
        return $"https://civitai.com/models/{version.Model.Id}?modelVersionId={version.Id}";
    }

    [Fact]
    public async Task Create_and_status_watch_give_up_after_timeout_and_exit_3()
    {
        var create = await env.CliAsync("create", "--civitai", StalledUrl(seed: 301), "--base", E2eEnvironment.Flux,
            "--name", "cli-timeout", "--timeout", "2s");

        Assert.Equal(3, create.ExitCode);
        var line = Assert.Single(ErrorLines(create));
        Assert.Matches(@"^error: gave up after 2 s \(--timeout\): cli-timeout is still (initializing|downloading); it goes on on the server \(follow it with 'loradeploy status cli-timeout --watch'\)$", line);

        var watch = await env.CliAsync("status", "cli-timeout", "--watch", "--json", "--timeout", "1500ms");
        Assert.Equal(3, watch.ExitCode);
        Assert.Equal("", watch.StdOut);
        Assert.StartsWith("error: gave up after 1.5 s (--timeout): cli-timeout is still ", Assert.Single(ErrorLines(watch)));

        Assert.Equal(0, (await env.CliAsync("delete", "cli-timeout")).ExitCode);
    }

    [Fact]
    public async Task List_cuts_long_fail_reasons_to_the_width_and_json_keeps_them_whole()
    {
        var version = env.Civitai.AddLora(AdapterFiles.Flux1(seed: 302, rank: 4), baseModel: "Flux.1 D", modelName: "Mismatch");
        version.File.ListedSha256 = new string('a', 64); // the bytes cannot match: the reason names both hashes
        var url = $"https://civitai.com/models/{version.Model.Id}?modelVersionId={version.Id}";
        Assert.Equal(1, (await env.CliAsync("create", "--civitai", url, "--base", E2eEnvironment.Flux, "--name", "cli-long-reason", "--json")).ExitCode);
        var reason = (await env.GetJsonAsync("v1/lora/cli-long-reason")).GetProperty("fail_reason").GetString()!;
        Assert.True(reason.Length > 120, reason);

        var table = await LoraDeployExe.RunAsync(["list"], new Dictionary<string, string?>(env.ClientEnv) { ["COLUMNS"] = "140" });

        Assert.True(table.ExitCode == 0, table.ToString());
        var lines = table.StdOut.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.All(lines, l => Assert.True(l.Length <= 140, $"{l.Length} columns: {l}"));
        var row = Assert.Single(lines, l => l.Contains("/cli-long-reason", StringComparison.Ordinal));
        Assert.EndsWith("…", row);
        Assert.Contains(reason[..20], row);
        var (exitCode, screen) = await TerminalAsync("list");
        Assert.True(exitCode == 0, screen);
        var screenLines = AnsiEscape().Replace(screen, "").Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.All(screenLines, l => Assert.True(l.TrimEnd('\r').Length <= 160, $"{l.Length} columns on a 160-column terminal: {l}"));
        Assert.Single(screenLines, l => l.Contains("/cli-long-reason", StringComparison.Ordinal) && l.Contains('…'));

        var json = ParseOnly(await env.CliAsync("list", "--json"));
        Assert.Contains(json.EnumerateArray(), d => d.GetProperty("fail_reason").GetString() == reason);
    }

    /// <summary>
    /// Runs the client in a pseudo-terminal 160 columns wide (<c>script</c>): the live view and table a user sees, not
    /// the plain lines of a pipe. Returns what the terminal received (stdout and stderr).
    /// </summary>
    private async Task<(int ExitCode, string Screen)> TerminalAsync(params string[] args)
    {
        var quoted = string.Join(' ', args.Select(a => "'" + a.Replace("'", "'\\''", StringComparison.Ordinal) + "'"));
        var start = LoraDeployExe.StartInfo([], env.ClientEnv);
        start.FileName = "script";
        start.ArgumentList.Clear();
        foreach (var arg in new[] { "-qec", $"stty cols 160 2>/dev/null; dotnet '{LoraDeployExe.DllPath}' {quoted}", "/dev/null" })
        {
            start.ArgumentList.Add(arg);
        }
        start.Environment["TERM"] = "xterm-256color";
        using var process = System.Diagnostics.Process.Start(start)!;
        process.StandardInput.Close();
        var stdout = process.StandardOutput.ReadToEndAsync();
        await process.WaitForExitAsync(new CancellationTokenSource(TimeSpan.FromSeconds(120)).Token);
        return (process.ExitCode, await stdout);
    }

    [GeneratedRegex(@"\x1b(\[[0-9;?]*[A-Za-z]|[=>])")]
    private static partial Regex AnsiEscape();

    [Fact]
    public async Task On_a_terminal_a_failed_create_shows_no_empty_bar_and_the_reason_once()
    {
        var name = "cli-tty-fail";
        var (exitCode, screen) = await TerminalAsync("create", "--civitai", env.MissingUrl, "--base", E2eEnvironment.Flux, "--name", name);

        Assert.True(exitCode == 1, screen);
        var reason = (await env.GetJsonAsync("deploy/list?status=failed")).EnumerateArray()
            .Single(d => d.GetProperty("model_name").GetString() == $"{env.User}/{name}").GetProperty("fail_reason").GetString()!;
        Assert.Single(Regex.Matches(screen, Regex.Escape(reason[..30])));
        Assert.DoesNotContain("?/s", screen);
        Assert.DoesNotContain("1 byte", screen);
        Assert.DoesNotContain("**:**", screen);
    }

    [Fact]
    public async Task Unknown_names_and_ids_are_not_found()
    {
        var result = await env.CliAsync("status", "nosuchlora1");

        Assert.Equal(1, result.ExitCode);
        Assert.Equal("error: not found: no deploy or LoRA named 'nosuchlora1'", Assert.Single(ErrorLines(result)));
    }
}
