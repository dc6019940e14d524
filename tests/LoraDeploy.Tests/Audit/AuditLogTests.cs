using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using LoraDeploy.Auth;
using LoraDeploy.Tests.Pipeline;
using LoraDeploy.Tests.Simulator;

namespace LoraDeploy.Tests.Audit;

/// <summary>
/// The audit log end to end: the real host on SQLite, the CivitAI simulator, real HTTP over loopback, and
/// <c>GET /v1/admin/audit</c> read as an admin.
/// </summary>
public sealed class AuditLogTests
{
    private const string CivitSecret = "CIVITSECRET0123456789";

    private static async Task<TestUser> AdminAsync(LoraDeployServer server)
    {
        var token = await server.QueryAsync(db => ApiTokens.CreateForUserAsync(db, "ops", isAdmin: true, "admin console", DateTime.UtcNow, CancellationToken.None));
        return new TestUser("ops", token, server.CreateClient(token));
    }

    private static async Task<(string Raw, List<JsonElement> Entries)> AuditAsync(TestUser admin, string query = "")
    {
        var response = await admin.Client.GetAsync("/v1/admin/audit" + query);
        var raw = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == HttpStatusCode.OK, $"{response.StatusCode}: {raw}");
        return (raw, JsonDocument.Parse(raw).RootElement.EnumerateArray().Select(e => e.Clone()).ToList());
    }

    private static string? Text(JsonElement entry, string name) => entry.GetProperty(name).GetString();

    private static SimVersion Lora(CivitaiSimulator sim, int seed) => sim.AddLora(AdapterFiles.Flux1(seed: seed), baseModel: "Flux.1 D");

    [Fact]
    public async Task Each_action_is_recorded_once_with_its_user_token_label_ip_and_object_and_no_secret()
    {
        await using var h = await PipelineHarness.StartAsync();
        var admin = await AdminAsync(h.Server);

        // A labelled token does the work, so every line must name that label.
        var created = await (await h.User.Client.PostJsonAsync("/v1/me/tokens", new { label = "ci runner" })).ExpectAsync(HttpStatusCode.OK);
        var ciToken = created.GetProperty("token").GetString()!;
        var ciTokenId = created.GetProperty("id").GetString()!;
        using var ci = h.Server.CreateClient(ciToken);

        var first = Lora(h.Simulator, seed: 1);
        var url = PipelineHarness.ModelUrl(first) + "&token=" + CivitSecret;
        var deploy = await (await ci.PostJsonAsync("/v1/lora/create", PipelineHarness.CreateBody("audited", url))).ExpectAsync(HttpStatusCode.OK);
        var deployId = deploy.GetProperty("deploy_id").GetString()!;
        (await h.WaitAsync(deployId)).AssertDeploying();
        await (await ci.PatchAsync("/v1/lora/audited", HttpAssertions.Json(new { description = "pixels" }))).ExpectAsync(HttpStatusCode.OK);
        (await ci.PutAsJsonAsync($"/deploy/{deployId}", new { settings = new { min_instances = 0, max_instances = 2 } })).EnsureSuccessStatusCode();
        (await ci.PostAsync($"/deploy/{deployId}/stop", null)).EnsureSuccessStatusCode();
        (await ci.PostAsync($"/deploy/{deployId}/start", null)).EnsureSuccessStatusCode();
        (await ci.DeleteAsync($"/deploy/{deployId}")).EnsureSuccessStatusCode();
        var second = await (await ci.PostJsonAsync("/v1/lora/create", PipelineHarness.CreateBody("doomed", PipelineHarness.ModelUrl(Lora(h.Simulator, seed: 2)))))
            .ExpectAsync(HttpStatusCode.OK);
        await h.WaitAsync(second.GetProperty("deploy_id").GetString()!);
        (await ci.DeleteAsync("/v1/lora/doomed")).EnsureSuccessStatusCode();
        var newUser = await (await admin.Client.PostJsonAsync("/v1/admin/users", new { name = "carol" })).ExpectAsync(HttpStatusCode.OK);
        var carolToken = newUser.GetProperty("token").GetProperty("token").GetString()!;
        // Revoking the token the request came with: the line still names it.
        (await ci.DeleteAsync($"/v1/me/tokens/{ciTokenId}")).EnsureSuccessStatusCode();

        var (raw, entries) = await AuditAsync(admin);
        Assert.Equal(
            ["token.create", "create", "settings", "settings", "stop", "start", "delete", "create", "delete", "user.create", "token.revoke"],
            entries.Select(e => Text(e, "action")!).Reverse());
        Assert.True(entries.Select(e => e.GetProperty("id").GetInt64()).SequenceEqual(entries.Select(e => e.GetProperty("id").GetInt64()).OrderDescending()));

        var byCi = entries.Where(e => Text(e, "action") is not ("token.create" or "user.create")).ToList();
        Assert.All(byCi, e =>
        {
            Assert.Equal(h.User.Name, Text(e, "user"));
            Assert.Equal(ciTokenId, Text(e, "token_id"));
            Assert.Equal("ci runner", Text(e, "token_label"));
            Assert.Equal("127.0.0.1", Text(e, "ip"));
        });
        var tokenCreate = entries.Single(e => Text(e, "action") == "token.create");
        Assert.Equal(("token", ciTokenId, "test", h.User.Name),
            (Text(tokenCreate, "object_type"), Text(tokenCreate, "object_id"), Text(tokenCreate, "token_label"), Text(tokenCreate, "user")));
        var userCreate = entries.Single(e => Text(e, "action") == "user.create");
        Assert.Equal(("user", "carol", "ops", "admin console"),
            (Text(userCreate, "object_type"), Text(userCreate, "object_id"), Text(userCreate, "user"), Text(userCreate, "token_label")));
        Assert.Equal([("lora", "audited"), ("lora", "doomed")],
            entries.Where(e => Text(e, "action") == "create").Select(e => (Text(e, "object_type"), Text(e, "object_id"))).Reverse());
        Assert.Equal([("deploy", deployId), ("lora", "doomed")],
            entries.Where(e => Text(e, "action") == "delete").Select(e => (Text(e, "object_type"), Text(e, "object_id"))).Reverse());
        Assert.All(entries.Where(e => Text(e, "action") is "stop" or "start"), e => Assert.Equal(deployId, Text(e, "object_id")));
        var settings = entries.Where(e => Text(e, "action") == "settings").Reverse().ToList();
        Assert.Equal(("lora", "audited", "fields: description"),
            (Text(settings[0], "object_type"), Text(settings[0], "object_id"), Text(settings[0], "detail")));
        Assert.Equal(("deploy", deployId, "fields: settings.min_instances, settings.max_instances"),
            (Text(settings[1], "object_type"), Text(settings[1], "object_id"), Text(settings[1], "detail")));

        // No secret anywhere in what the admin sees: not the civitai token, not any API token's secret.
        Assert.DoesNotContain(CivitSecret, raw, StringComparison.Ordinal);
        foreach (var token in new[] { ciToken, h.User.Token, admin.Token, carolToken })
        {
            Assert.DoesNotContain(TokenParts.Secret(token), raw, StringComparison.Ordinal);
        }
    }

    [Fact]
    public async Task A_failed_request_records_nothing()
    {
        await using var server = await LoraDeployServer.StartAsync(settings: new Dictionary<string, string?> { ["Pipeline:Enabled"] = "false" });
        var admin = await AdminAsync(server);
        var alice = await server.CreateUserAsync("alice");

        await (await alice.Client.PatchAsync("/v1/lora/missing", HttpAssertions.Json(new { description = "x" }))).ExpectErrorAsync(HttpStatusCode.NotFound);
        await (await alice.Client.PostAsync("/deploy/nosuchdeploy/stop", null)).ExpectErrorAsync(HttpStatusCode.NotFound);
        await (await alice.Client.DeleteAsync("/v1/lora/missing")).ExpectErrorAsync(HttpStatusCode.NotFound);
        await (await alice.Client.DeleteAsync("/v1/me/tokens/nosuchtoken0")).ExpectErrorAsync(HttpStatusCode.NotFound);
        await (await alice.Client.PostJsonAsync("/v1/me/tokens", new { label = new string('x', 101) })).ExpectValidationErrorAsync("body", "label");
        await (await alice.Client.PostJsonAsync("/v1/lora/create", new { lora_name = "bad name!" })).ExpectAsync(HttpStatusCode.UnprocessableEntity);
        await (await admin.Client.PostJsonAsync("/v1/admin/users", new { name = "alice" + "!" })).ExpectValidationErrorAsync("body", "name");
        // A bad token is refused before any handler: not logged either.
        using var stranger = server.CreateClient("ld_aaaaaaaaaaaa_notarealsecret");
        Assert.Equal(HttpStatusCode.Unauthorized, (await stranger.DeleteAsync("/v1/lora/missing")).StatusCode);

        Assert.Empty((await AuditAsync(admin)).Entries);
    }

    [Fact]
    public async Task Filters_and_keyset_pages_newest_first_and_bad_parameters_are_named()
    {
        await using var server = await LoraDeployServer.StartAsync(settings: new Dictionary<string, string?> { ["Pipeline:Enabled"] = "false" });
        var admin = await AdminAsync(server);
        var alice = await server.CreateUserAsync("alice");
        var bob = await server.CreateUserAsync("bob");
        for (var i = 0; i < 3; i++)
        {
            (await alice.Client.PostJsonAsync("/v1/me/tokens", new { label = $"a{i}" })).EnsureSuccessStatusCode();
        }
        var bobs = await (await bob.Client.PostJsonAsync("/v1/me/tokens", new { label = "b" })).ExpectAsync(HttpStatusCode.OK);
        var bobTokenId = bobs.GetProperty("id").GetString()!;
        (await bob.Client.DeleteAsync($"/v1/me/tokens/{bobTokenId}")).EnsureSuccessStatusCode();

        var all = (await AuditAsync(admin)).Entries;
        Assert.Equal(5, all.Count);
        Assert.All((await AuditAsync(admin, $"?user={alice.Name}")).Entries, e => Assert.Equal(alice.Name, Text(e, "user")));
        Assert.Equal(3, (await AuditAsync(admin, $"?user={alice.Name}")).Entries.Count);
        var revokes = (await AuditAsync(admin, "?action=token.revoke")).Entries;
        Assert.Equal(bobTokenId, Assert.Single(revokes).GetProperty("object_id").GetString());
        Assert.Equal(2, (await AuditAsync(admin, $"?object={bobTokenId}")).Entries.Count);
        Assert.Empty((await AuditAsync(admin, "?since=2999-01-01T00:00:00Z")).Entries);
        Assert.Empty((await AuditAsync(admin, "?until=2000-01-01T00:00:00Z")).Entries);
        Assert.Equal(5, (await AuditAsync(admin, "?since=2000-01-01T00:00:00Z&until=2999-01-01T00:00:00Z")).Entries.Count);

        // Pages of two, newest first, following before_id, cover every line exactly once.
        var paged = new List<long>();
        string? before = null;
        // Bounded, so a cursor that fails to move fails the test instead of looping.
        for (var pages = 0; pages < 10; pages++)
        {
            var page = (await AuditAsync(admin, "?limit=2" + (before is null ? "" : $"&before_id={before}"))).Entries;
            if (page.Count == 0)
            {
                break;
            }
            Assert.True(page.Count <= 2);
            paged.AddRange(page.Select(e => e.GetProperty("id").GetInt64()));
            before = page[^1].GetProperty("id").GetInt64().ToString(System.Globalization.CultureInfo.InvariantCulture);
        }
        Assert.Equal(all.Select(e => e.GetProperty("id").GetInt64()), paged);

        await (await admin.Client.GetAsync("/v1/admin/audit?limit=0")).ExpectValidationErrorAsync("query", "limit");
        await (await admin.Client.GetAsync("/v1/admin/audit?limit=1001")).ExpectValidationErrorAsync("query", "limit");
        await (await admin.Client.GetAsync("/v1/admin/audit?before_id=abc")).ExpectValidationErrorAsync("query", "before_id");
        await (await admin.Client.GetAsync("/v1/admin/audit?since=yesterday")).ExpectValidationErrorAsync("query", "since");
        await (await admin.Client.GetAsync("/v1/admin/audit?until=soon")).ExpectValidationErrorAsync("query", "until");
        Assert.Equal(HttpStatusCode.Forbidden, (await alice.Client.GetAsync("/v1/admin/audit")).StatusCode);
        // Append-only: no route changes or removes a line.
        Assert.Equal(HttpStatusCode.MethodNotAllowed, (await admin.Client.DeleteAsync("/v1/admin/audit")).StatusCode);
    }

    [Fact]
    public async Task A_policy_refusal_is_recorded_for_the_deploys_owner_without_token_or_ip()
    {
        await using var h = await PipelineHarness.StartAsync(settings: new Dictionary<string, string?> { ["Policy:MaxNsfwLevel"] = "R" });
        var admin = await AdminAsync(h.Server);
        var spicy = Lora(h.Simulator, seed: 1);
        spicy.NsfwLevel = 8;
        var created = await h.CreateAsync("spicy", PipelineHarness.ModelUrl(spicy));
        var deployId = created.GetProperty("deploy_id").GetString()!;
        (await h.WaitAsync(deployId)).AssertFailed();

        // The pipeline fails the deploy first and records the refusal right after (only when it did fail it): wait for it.
        var deadline = DateTime.UtcNow.AddSeconds(10);
        var entries = (await AuditAsync(admin, "?action=policy.refused")).Entries;
        while (entries.Count == 0 && DateTime.UtcNow < deadline)
        {
            await Task.Delay(50);
            entries = (await AuditAsync(admin, "?action=policy.refused")).Entries;
        }
        var refused = Assert.Single(entries);
        Assert.Equal(h.User.Name, Text(refused, "user"));
        Assert.Equal(("deploy", deployId), (Text(refused, "object_type"), Text(refused, "object_id")));
        Assert.Equal("refused by policy: Policy:MaxNsfwLevel is R, this model is rated X", Text(refused, "detail"));
        Assert.Equal(JsonValueKind.Null, refused.GetProperty("ip").ValueKind);
        Assert.Equal(JsonValueKind.Null, refused.GetProperty("token_id").ValueKind);
    }
}

/// <summary>The scrub every audit detail goes through before it is stored.</summary>
public sealed class AuditScrubTests
{
    [Theory]
    [InlineData("source https://civitai.com/api/download/models/12?token=SECRET&type=Model done", "source https://civitai.com/api/download/models/12 done")]
    [InlineData("civitai.com/models/1?modelVersionId=2&token=SECRET", "civitai.com/models/1")]
    [InlineData("used ld_abcdefabcdef_SECRETsecret-123 here", "used ld_*** here")]
    [InlineData("fields: settings.min_instances", "fields: settings.min_instances")]
    public void Drops_query_strings_and_token_shaped_words(string detail, string stored)
    {
        Assert.Equal(stored, LoraDeploy.Audit.AuditLog.Scrub(detail));
    }
}
