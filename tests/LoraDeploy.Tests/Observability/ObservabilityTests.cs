using System.Net;
using LoraDeploy.Tests.Pipeline;

namespace LoraDeploy.Tests.Observability;

public sealed class ObservabilityTests
{
    [Fact]
    public async Task Metrics_are_exported_for_prometheus()
    {
        await using var h = await PipelineHarness.StartAsync();
        var version = h.Simulator.AddLora(AdapterFiles.Flux1(), baseModel: "Flux.1 D");
        (await h.CreateAndWaitAsync("metered", PipelineHarness.ModelUrl(version))).AssertDeploying();
        (await h.CreateAndWaitAsync("metered-again", PipelineHarness.ModelUrl(version))).AssertDeploying();
        (await h.CreateAndWaitAsync("metered-missing", "https://civitai.com/models/999999")).AssertFailed();
        await h.User.Client.GetAsync("/deploy/list");

        using var anonymous = h.Server.CreateClient();
        string text = "";
        await ImportPipelineTests.WaitUntilAsync(async () =>
        {
            var response = await anonymous.GetAsync("/metrics");
            Assert.Equal(HttpStatusCode.OK, response.StatusCode);
            text = await response.Content.ReadAsStringAsync();
            return text.Contains("loradeploy_deploys{", StringComparison.Ordinal) && text.Contains("status=\"deploying\"", StringComparison.Ordinal);
        });

        Assert.Contains("http_server_request_duration_seconds", text);
        Assert.Contains("http_route=\"/deploy/list\"", text);
        Assert.Contains("loradeploy_imports_started", text);
        Assert.Contains("loradeploy_imports_succeeded", text);
        Assert.Contains("loradeploy_imports_failed", text);
        Assert.Contains("reason=\"not_found\"", text);
        Assert.Contains("loradeploy_download_bytes", text);
        Assert.Contains("loradeploy_download_duration_seconds", text);
        Assert.Contains("loradeploy_imports_dedup_hits", text);
        Assert.Contains("loradeploy_pipeline_queue_depth", text);
    }

    [Fact]
    public async Task Logs_carry_deploy_ids_and_never_a_token()
    {
        await using var simulator = await Simulator.CivitaiSimulator.StartAsync();
        var version = simulator.AddLora(AdapterFiles.Flux1(), baseModel: "Flux.1 D");
        var dataDir = Path.Combine(Path.GetTempPath(), "loradeploy-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dataDir);
        var settings = PipelineHarness.ServerSettings(simulator, withToken: true);

        await using var server = await ServerProcess.StartAsync(dataDir, settings);
        var adminToken = server.Output.Split('\n').Select(l => l.Trim()).Last(l => l.Contains("ld_", StringComparison.Ordinal)).Split(' ')[^1];
        using var client = server.CreateClient(adminToken);
        var created = await (await client.PostJsonAsync("/v1/lora/create",
            PipelineHarness.CreateBody("logged", $"https://civitai.com/api/download/models/{version.Id}?token=pasted-secret-token")))
            .ExpectAsync(HttpStatusCode.OK);
        var deployId = created.GetProperty("deploy_id").GetString()!;
        using var bad = server.CreateClient("ld_aaaaaaaaaaaa_" + new string('b', 43));
        await bad.GetAsync("/deploy/list");

        await ImportPipelineTests.WaitUntilAsync(async () =>
            (await (await client.GetAsync($"/deploy/{deployId}")).ExpectAsync(HttpStatusCode.OK)).GetProperty("status").GetString() == "deploying");
        // The status flips before the pipeline logs it; wait for its last line rather than for a while.
        await ImportPipelineTests.WaitUntilAsync(() => Task.FromResult(server.Output.Contains("now deploying", StringComparison.Ordinal)));

        var log = server.Output;
        var secretPart = TokenParts.Secret(adminToken);
        Assert.Equal(43, secretPart.Length);
        Assert.Equal(1, CountOccurrences(log, secretPart)); // printed once, at first start, by design
        Assert.DoesNotContain("pasted-secret-token", log);
        Assert.DoesNotContain(simulator.ValidToken, log);
        Assert.DoesNotContain(new string('b', 43), log);
        Assert.Contains(deployId, log);
        var pipelineLines = log.Split('\n').Where(l => l.Contains("LoraDeploy.Pipeline", StringComparison.Ordinal)).ToList();
        Assert.NotEmpty(pipelineLines);
        Assert.All(pipelineLines, l => Assert.Contains(deployId, l));
    }

    private static int CountOccurrences(string text, string value)
    {
        var count = 0;
        for (var i = text.IndexOf(value, StringComparison.Ordinal); i >= 0; i = text.IndexOf(value, i + 1, StringComparison.Ordinal))
        {
            count++;
        }
        return count;
    }
    [Fact]
    public async Task Metrics_need_the_configured_token()
    {
        const string token = "metrics-secret-0123456789";
        await using var server = await LoraDeployServer.StartAsync(TestDatabase.Sqlite,
            new Dictionary<string, string?>(ServerFixture.ControlPlaneOnly) { ["Metrics:Token"] = token });

        using var anonymous = server.CreateClient();
        var refused = await anonymous.GetAsync("/metrics");
        Assert.Equal("Bearer", refused.Headers.WwwAuthenticate.ToString());
        Assert.Contains("Metrics:Token", await refused.ExpectErrorAsync(HttpStatusCode.Unauthorized));
        using var wrong = server.CreateClient(token + "x");
        await (await wrong.GetAsync("/metrics")).ExpectErrorAsync(HttpStatusCode.Unauthorized);
        // An API token is not the metrics token.
        using var user = server.CreateClient(await server.CreateTokenAsync("alice"));
        await (await user.GetAsync("/metrics")).ExpectErrorAsync(HttpStatusCode.Unauthorized);

        using var scraper = server.CreateClient(token);
        var scraped = await scraper.GetAsync("/metrics");
        Assert.Equal(HttpStatusCode.OK, scraped.StatusCode);
        Assert.Contains("# TYPE", await scraped.Content.ReadAsStringAsync());
    }

    [Fact]
    public async Task Without_a_token_metrics_answer_loopback_clients_only()
    {
        // An empty value (Metrics__Token= in an environment) means no token, not a start-up failure.
        await using var server = await LoraDeployServer.StartAsync(TestDatabase.Sqlite,
            new Dictionary<string, string?>(ServerFixture.ControlPlaneOnly) { ["Metrics:Token"] = "" });
        using var local = server.CreateClient();
        Assert.Equal(HttpStatusCode.OK, (await local.GetAsync("/metrics")).StatusCode);

        // Through a reverse proxy on this machine the connection is loopback too; the forwarding header tells.
        foreach (var (header, value) in new[] { ("X-Forwarded-For", "203.0.113.7"), ("Forwarded", "for=203.0.113.7") })
        {
            using var request = new HttpRequestMessage(HttpMethod.Get, "/metrics");
            request.Headers.Add(header, value);
            var message = await (await local.SendAsync(request)).ExpectErrorAsync(HttpStatusCode.Forbidden);
            Assert.Contains("Metrics:Token", message);
        }
    }
}
