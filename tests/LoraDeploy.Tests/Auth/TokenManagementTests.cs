using System.Globalization;
using System.Net;
using System.Text.Json;
using LoraDeploy.Auth;
using LoraDeploy.Data;
using LoraDeploy.Tests.Dashboard;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Auth;

/// <summary>
/// <c>/v1/me/tokens</c>, <c>/v1/admin/users</c> and <c>loradeploy token list|revoke</c> against the real host on
/// SQLite (one process: its verified-token cache is what a revoke and an expiry must get past).
/// </summary>
public sealed class TokenManagementTests
{
    private static readonly Dictionary<string, string?> PipelineOff = new() { ["Pipeline:Enabled"] = "false" };

    private static async Task<string> AdminTokenAsync(LoraDeployServer server) =>
        await server.QueryAsync(db => ApiTokens.CreateForUserAsync(db, "ops", isAdmin: true, "test", DateTime.UtcNow, CancellationToken.None));

    private static DateTime ParseTime(string iso) =>
        DateTime.Parse(iso, CultureInfo.InvariantCulture, DateTimeStyles.AdjustToUniversal | DateTimeStyles.AssumeUniversal);

    [Fact]
    public async Task Create_list_and_revoke_a_token_the_secret_only_in_the_create_answer_and_refused_on_the_next_request()
    {
        await using var server = await LoraDeployServer.StartAsync(settings: PipelineOff);
        var alice = await server.CreateUserAsync("alice");
        var adminToken = await AdminTokenAsync(server);

        var before = DateTime.UtcNow.AddSeconds(-1);
        var created = await (await alice.Client.PostJsonAsync("/v1/me/tokens", new { label = "ci runner", expires_in_days = 30 }))
            .ExpectAsync(HttpStatusCode.OK);
        var token = created.GetProperty("token").GetString()!;
        var id = created.GetProperty("id").GetString()!;
        Assert.StartsWith($"ld_{id}_", token, StringComparison.Ordinal);
        Assert.Equal("ci runner", created.GetProperty("label").GetString());
        var expires = ParseTime(created.GetProperty("expires_at").GetString()!);
        Assert.InRange(expires, before.AddDays(30), DateTime.UtcNow.AddDays(30).AddSeconds(1));
        Assert.EndsWith("+00:00", created.GetProperty("created_at").GetString());

        // The new token works, and is cached after its first use: the revoke below must get past that cache.
        using var withNew = server.CreateClient(token);
        for (var i = 0; i < 3; i++)
        {
            (await withNew.GetAsync("/deploy/list")).EnsureSuccessStatusCode();
        }
        var listed = await (await withNew.GetAsync("/v1/me/tokens")).ExpectAsync(HttpStatusCode.OK);
        var items = listed.EnumerateArray().ToList();
        Assert.Equal(2, items.Count);
        var mine = items.Single(t => t.GetProperty("id").GetString() == id);
        Assert.True(mine.GetProperty("current").GetBoolean());
        Assert.Equal("ci runner", mine.GetProperty("label").GetString());
        Assert.Equal(created.GetProperty("expires_at").GetString(), mine.GetProperty("expires_at").GetString());
        var other = items.Single(t => t.GetProperty("id").GetString() == ApiTokens.IdOf(alice.Token));
        Assert.False(other.GetProperty("current").GetBoolean());
        Assert.Equal(JsonValueKind.Null, other.GetProperty("expires_at").ValueKind);
        Assert.Equal(["created_at", "current", "expires_at", "id", "label"], mine.EnumerateObject().Select(p => p.Name).Order());

        // No answer but the create shows a secret again: the lists, the admin's user list, the other routes.
        using var admin = server.CreateClient(adminToken);
        var bodies = new List<string>
        {
            await withNew.GetStringAsync("/v1/me/tokens"),
            await alice.Client.GetStringAsync("/v1/me/tokens"),
            await admin.GetStringAsync("/v1/admin/users"),
            await withNew.GetStringAsync("/deploy/list"),
            await withNew.GetStringAsync("/v1/user/loras"),
            await withNew.GetStringAsync("/openapi/v1.json"),
        };
        foreach (var body in bodies)
        {
            Assert.DoesNotContain(TokenParts.Secret(token), body, StringComparison.Ordinal);
            Assert.DoesNotContain(TokenParts.Secret(alice.Token), body, StringComparison.Ordinal);
        }
        var storedHash = await server.QueryAsync(db => db.ApiTokens.Where(t => t.Id == id).Select(t => t.SecretHash).SingleAsync());
        Assert.DoesNotContain(Convert.ToBase64String(storedHash), string.Join("\n", bodies), StringComparison.Ordinal);
        Assert.DoesNotContain(Convert.ToHexString(storedHash), string.Join("\n", bodies), StringComparison.OrdinalIgnoreCase);

        // Revoked with the other token: the very next request with it is refused, although it was cached a moment ago.
        var revoked = await alice.Client.DeleteAsync($"/v1/me/tokens/{id}");
        Assert.Equal(HttpStatusCode.NoContent, revoked.StatusCode);
        await (await withNew.GetAsync("/deploy/list")).ExpectErrorAsync(HttpStatusCode.Unauthorized);
        Assert.Equal(0, await server.QueryAsync(db => db.ApiTokens.CountAsync(t => t.Id == id)));
        var after = await (await alice.Client.GetAsync("/v1/me/tokens")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal([ApiTokens.IdOf(alice.Token)], after.EnumerateArray().Select(t => t.GetProperty("id").GetString()));
        await (await alice.Client.DeleteAsync($"/v1/me/tokens/{id}")).ExpectErrorAsync(HttpStatusCode.NotFound);

        // A token can revoke itself; its own next request is refused.
        var revokedSelf = await alice.Client.DeleteAsync($"/v1/me/tokens/{ApiTokens.IdOf(alice.Token)}");
        Assert.Equal(HttpStatusCode.NoContent, revokedSelf.StatusCode);
        await (await alice.Client.GetAsync("/v1/me/tokens")).ExpectErrorAsync(HttpStatusCode.Unauthorized);
    }

    [Fact]
    public async Task An_expired_token_is_refused_even_while_cached_and_says_it_expired()
    {
        await using var server = await LoraDeployServer.StartAsync(settings: PipelineOff);
        var alice = await server.CreateUserAsync("alice");

        var at = DateTime.UtcNow.AddSeconds(3);
        var created = await (await alice.Client.PostJsonAsync("/v1/me/tokens", new { expires_at = at.ToString("yyyy-MM-ddTHH:mm:ssZ", CultureInfo.InvariantCulture) }))
            .ExpectAsync(HttpStatusCode.OK);
        var expiresAt = ParseTime(created.GetProperty("expires_at").GetString()!);
        Assert.Equal(JsonValueKind.Null, created.GetProperty("label").ValueKind);
        using var shortLived = server.CreateClient(created.GetProperty("token").GetString()!);
        (await shortLived.GetAsync("/deploy/list")).EnsureSuccessStatusCode(); // cached from here on

        while (DateTime.UtcNow < expiresAt.AddMilliseconds(200))
        {
            await Task.Delay(200);
        }
        var response = await shortLived.GetAsync("/deploy/list");
        Assert.Equal("Token expired", await response.ExpectErrorAsync(HttpStatusCode.Unauthorized));
        Assert.Equal("Bearer", response.Headers.WwwAuthenticate.ToString());

        // One whose expiry passed before it was ever used (never cached) is refused too; a wrong secret for it is told
        // nothing about the expiry.
        var old = await server.CreateTokenAsync("bob");
        await server.QueryAsync(db => db.ApiTokens.Where(t => t.Id == ApiTokens.IdOf(old))
            .ExecuteUpdateAsync(set => set.SetProperty(t => t.ExpiresAt, DateTime.UtcNow.AddMinutes(-1))));
        using var expired = server.CreateClient(old);
        Assert.Equal("Token expired", await (await expired.GetAsync("/v1/me/tokens")).ExpectErrorAsync(HttpStatusCode.Unauthorized));
        using var wrong = server.CreateClient(old[..^1] + (old[^1] == 'A' ? 'B' : 'A'));
        Assert.Equal("Not authenticated", await (await wrong.GetAsync("/v1/me/tokens")).ExpectErrorAsync(HttpStatusCode.Unauthorized));
    }

    [Fact]
    public async Task Bad_create_input_is_a_422_naming_the_field()
    {
        await using var server = await LoraDeployServer.StartAsync(settings: PipelineOff);
        var alice = await server.CreateUserAsync("alice");
        var client = alice.Client;
        var past = DateTime.UtcNow.AddMinutes(-5).ToString("yyyy-MM-ddTHH:mm:ss+00:00", CultureInfo.InvariantCulture);

        await (await client.PostJsonAsync("/v1/me/tokens", new { label = new string('x', 101) })).ExpectValidationErrorAsync("body", "label");
        await (await client.PostJsonAsync("/v1/me/tokens", new { label = 5 })).ExpectValidationErrorAsync("body", "label");
        await (await client.PostJsonAsync("/v1/me/tokens", new { expires_in_days = 0 })).ExpectValidationErrorAsync("body", "expires_in_days");
        await (await client.PostJsonAsync("/v1/me/tokens", new { expires_in_days = 3651 })).ExpectValidationErrorAsync("body", "expires_in_days");
        await (await client.PostJsonAsync("/v1/me/tokens", new { expires_in_days = "7" })).ExpectValidationErrorAsync("body", "expires_in_days");
        await (await client.PostJsonAsync("/v1/me/tokens", new { expires_at = past })).ExpectValidationErrorAsync("body", "expires_at");
        await (await client.PostJsonAsync("/v1/me/tokens", new { expires_at = "next tuesday" })).ExpectValidationErrorAsync("body", "expires_at");
        await (await client.PostJsonAsync("/v1/me/tokens", new { expires_at = "2099-01-01T00:00:00" })).ExpectValidationErrorAsync("body", "expires_at");
        await (await client.PostJsonAsync("/v1/me/tokens", new { expires_in_days = 1, expires_at = "2099-01-01T00:00:00Z" }))
            .ExpectValidationErrorAsync("body", "expires_at");
        await (await client.PostAsync("/v1/me/tokens", HttpAssertions.Json("[1]"))).ExpectValidationErrorAsync("body");
        Assert.Equal(1, await server.QueryAsync(db => db.ApiTokens.CountAsync())); // nothing was created

        // The edges are accepted: 1 and 3650 days, a 100-character label.
        await (await client.PostJsonAsync("/v1/me/tokens", new { expires_in_days = 1, label = new string('x', 100) })).ExpectAsync(HttpStatusCode.OK);
        await (await client.PostJsonAsync("/v1/me/tokens", new { expires_in_days = 3650 })).ExpectAsync(HttpStatusCode.OK);
        await (await client.PostAsync("/v1/me/tokens", HttpAssertions.Json("{}"))).ExpectAsync(HttpStatusCode.OK);
    }

    [Fact]
    public async Task Another_users_token_id_is_a_404_like_one_that_does_not_exist_and_keeps_working()
    {
        await using var server = await LoraDeployServer.StartAsync(settings: PipelineOff);
        var alice = await server.CreateUserAsync("alice");
        var bob = await server.CreateUserAsync("bob");
        var bobsId = ApiTokens.IdOf(bob.Token);

        var theirs = await (await alice.Client.DeleteAsync($"/v1/me/tokens/{bobsId}")).ExpectErrorAsync(HttpStatusCode.NotFound);
        var unknownId = ApiTokens.RandomId(12);
        var unknown = await (await alice.Client.DeleteAsync($"/v1/me/tokens/{unknownId}")).ExpectErrorAsync(HttpStatusCode.NotFound);
        Assert.Equal(unknown.Replace(unknownId, "ID", StringComparison.Ordinal), theirs.Replace(bobsId, "ID", StringComparison.Ordinal));

        (await bob.Client.GetAsync("/v1/me/tokens")).EnsureSuccessStatusCode();
        var bobsList = await (await bob.Client.GetAsync("/v1/me/tokens")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal([bobsId], bobsList.EnumerateArray().Select(t => t.GetProperty("id").GetString()));
        var alicesList = await (await alice.Client.GetAsync("/v1/me/tokens")).ExpectAsync(HttpStatusCode.OK);
        Assert.DoesNotContain(alicesList.EnumerateArray(), t => t.GetProperty("id").GetString() == bobsId);

        using var anonymous = server.CreateClient();
        await (await anonymous.GetAsync("/v1/me/tokens")).ExpectErrorAsync(HttpStatusCode.Unauthorized);
        await (await anonymous.DeleteAsync($"/v1/me/tokens/{bobsId}")).ExpectErrorAsync(HttpStatusCode.Unauthorized);
    }

    [Fact]
    public async Task Admins_create_users_with_a_first_token_and_list_them_others_get_403()
    {
        await using var server = await LoraDeployServer.StartAsync(settings: PipelineOff);
        var alice = await server.CreateUserAsync("alice");
        using var admin = server.CreateClient(await AdminTokenAsync(server));

        Assert.Equal("Forbidden", await (await alice.Client.PostJsonAsync("/v1/admin/users", new { name = "mallory" })).ExpectErrorAsync(HttpStatusCode.Forbidden));
        await (await alice.Client.GetAsync("/v1/admin/users")).ExpectErrorAsync(HttpStatusCode.Forbidden);
        Assert.Equal(0, await server.QueryAsync(db => db.Users.CountAsync(u => u.Name == "mallory")));

        var created = await (await admin.PostJsonAsync("/v1/admin/users", new { name = "carol" })).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal("carol", created.GetProperty("name").GetString());
        Assert.False(created.GetProperty("admin").GetBoolean());
        var first = created.GetProperty("token");
        var carolsToken = first.GetProperty("token").GetString()!;
        Assert.Equal("first token", first.GetProperty("label").GetString());

        using var carol = server.CreateClient(carolsToken);
        var carols = await (await carol.GetAsync("/v1/me/tokens")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(first.GetProperty("id").GetString(), carols.EnumerateArray().Single().GetProperty("id").GetString());
        await (await carol.GetAsync("/v1/admin/users")).ExpectErrorAsync(HttpStatusCode.Forbidden);

        var dave = await (await admin.PostJsonAsync("/v1/admin/users", new { name = "dave", admin = true })).ExpectAsync(HttpStatusCode.OK);
        using var daveClient = server.CreateClient(dave.GetProperty("token").GetProperty("token").GetString()!);
        (await daveClient.GetAsync("/v1/admin/users")).EnsureSuccessStatusCode();

        Assert.Contains("carol", await (await admin.PostJsonAsync("/v1/admin/users", new { name = "carol" })).ExpectErrorAsync(HttpStatusCode.Conflict));
        await (await admin.PostJsonAsync("/v1/admin/users", new { name = "-carol" })).ExpectValidationErrorAsync("body", "name");
        await (await admin.PostJsonAsync("/v1/admin/users", new { name = new string('c', 65) })).ExpectValidationErrorAsync("body", "name");
        await (await admin.PostJsonAsync("/v1/admin/users", new { admin = true })).ExpectValidationErrorAsync("body", "name");
        await (await admin.PostJsonAsync("/v1/admin/users", new { name = "erin", admin = "yes" })).ExpectValidationErrorAsync("body", "admin");
        Assert.Equal(1, await server.QueryAsync(db => db.ApiTokens.CountAsync(t => t.User!.Name == "carol"))); // the 409 made none

        var users = (await (await admin.GetAsync("/v1/admin/users")).ExpectAsync(HttpStatusCode.OK)).EnumerateArray().ToList();
        var carolRow = users.Single(u => u.GetProperty("name").GetString() == "carol");
        Assert.Equal(1, carolRow.GetProperty("tokens").GetInt32());
        Assert.False(carolRow.GetProperty("admin").GetBoolean());
        Assert.True(users.Single(u => u.GetProperty("name").GetString() == "dave").GetProperty("admin").GetBoolean());
        Assert.Contains(users, u => u.GetProperty("name").GetString() == alice.Name);
    }

    [Fact]
    public async Task Cli_token_list_and_revoke_go_through_the_api_with_the_callers_token()
    {
        await using var server = await LoraDeployServer.StartAsync(settings: PipelineOff);
        var alice = await server.CreateUserAsync("alice");
        var created = await (await alice.Client.PostJsonAsync("/v1/me/tokens", new { label = "laptop" })).ExpectAsync(HttpStatusCode.OK);
        var laptopId = created.GetProperty("id").GetString()!;
        var env = new Dictionary<string, string?>
        {
            ["LORADEPLOY_SERVER"] = server.BaseUrl.ToString().TrimEnd('/'),
            ["LORADEPLOY_TOKEN"] = alice.Token,
        };

        var list = await LoraDeployExe.RunAsync(["token", "list"], env);
        Assert.True(list.ExitCode == 0, list.ToString());
        var lines = list.StdOut.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.StartsWith("ID", lines[0], StringComparison.Ordinal);
        Assert.Contains(lines, l => l.StartsWith(laptopId, StringComparison.Ordinal) && l.Contains("laptop", StringComparison.Ordinal) && l.Contains("never", StringComparison.Ordinal));
        Assert.Contains(lines, l => l.StartsWith(ApiTokens.IdOf(alice.Token), StringComparison.Ordinal) && l.EndsWith("(this token)", StringComparison.Ordinal));
        Assert.DoesNotContain(TokenParts.Secret(created.GetProperty("token").GetString()!), list.StdOut, StringComparison.Ordinal);

        var json = await LoraDeployExe.RunAsync(["token", "list", "--json"], env);
        Assert.True(json.ExitCode == 0, json.ToString());
        using (var doc = JsonDocument.Parse(json.StdOut))
        {
            Assert.Equal(2, doc.RootElement.GetArrayLength());
        }

        var revoke = await LoraDeployExe.RunAsync(["token", "revoke", laptopId], env);
        Assert.True(revoke.ExitCode == 0, revoke.ToString());
        Assert.Contains($"revoked token {laptopId}", revoke.StdOut, StringComparison.Ordinal);
        using var laptop = server.CreateClient(created.GetProperty("token").GetString()!);
        await (await laptop.GetAsync("/v1/me/tokens")).ExpectErrorAsync(HttpStatusCode.Unauthorized);

        var again = await LoraDeployExe.RunAsync(["token", "revoke", laptopId], env);
        Assert.True(again.ExitCode == 1, again.ToString());
        Assert.Contains("not found", again.StdErr, StringComparison.Ordinal);
        var missing = await LoraDeployExe.RunAsync(["token", "revoke"], env);
        Assert.True(missing.ExitCode == 2, missing.ToString());
        var noToken = await LoraDeployExe.RunAsync(["token", "list", "--server", server.BaseUrl.ToString()]);
        Assert.True(noToken.ExitCode == 1, noToken.ToString());
        Assert.Contains("no token given", noToken.StdErr, StringComparison.Ordinal);
    }
}
