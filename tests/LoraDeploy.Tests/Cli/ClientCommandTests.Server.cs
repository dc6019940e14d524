using System.Text.Json;
using System.Text.RegularExpressions;
using LoraDeploy.Tests.Dashboard;

namespace LoraDeploy.Tests.Cli;

/// <summary>
/// The real <c>loradeploy</c> client against a real server on loopback (its own process) that resolves and
/// downloads from the CivitAI simulator (<see cref="E2eEnvironment"/>). Output is redirected here, so the plain (non-ANSI) rendering is checked.
/// </summary>
public sealed class ClientCommandServerTests(E2eEnvironment env) : IClassFixture<E2eEnvironment>, IAsyncLifetime
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

        var stop = await env.CliAsync("stop", id, "--json");
        Assert.True(stop.ExitCode == 0, stop.ToString());
        Assert.Equal(id, ParseOnly(stop).GetProperty("deploy_id").GetString());
        Assert.Equal("stopped", ParseOnly(await env.CliAsync("status", id, "--json")).GetProperty("status").GetString());

        var stopAgain = await env.CliAsync("stop", id);
        Assert.Equal(1, stopAgain.ExitCode);
        Assert.Contains("stopped", Assert.Single(ErrorLines(stopAgain)));

        var start = await env.CliAsync("start", id);
        Assert.True(start.ExitCode == 0, start.ToString());
        Assert.Equal($"starting deploy {id}", start.StdOut.Trim());
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
        Assert.Contains("body.lora_name: ", line);
        Assert.Contains("body.source.civit_url: ", line);
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
    public async Task A_bad_token_is_reported_with_a_hint()
    {
        var result = await LoraDeployExe.RunAsync(["list", "--token", "not-a-token", "--server", env.BaseUrl.ToString()]);

        Assert.Equal(1, result.ExitCode);
        var line = Assert.Single(ErrorLines(result));
        Assert.StartsWith("error: not authenticated: ", line);
        Assert.Contains("--token", line);
    }

    [Fact]
    public async Task Unknown_names_and_ids_are_not_found()
    {
        var result = await env.CliAsync("status", "nosuchlora1");

        Assert.Equal(1, result.ExitCode);
        Assert.Equal("error: not found: no deploy or LoRA named 'nosuchlora1'", Assert.Single(ErrorLines(result)));
    }
}
