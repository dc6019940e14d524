using System.Net;

namespace LoraDeploy.Tests.Api;

public abstract class RestartTests(TestDatabase database)
{
    [Fact]
    public async Task A_restarted_host_keeps_users_tokens_loras_and_deploys()
    {
        await using var server = await LoraDeployServer.StartAsync(database, ServerFixture.ControlPlaneOnly);
        var alice = await server.CreateUserAsync("alice");
        var created = await (await alice.Client.PostJsonAsync("/v1/lora/create", new
        {
            lora_name = "durable",
            base_model = "black-forest-labs/FLUX-1-dev",
            source = new { type = "civitai", civit_url = "https://civitai.com/models/5?modelVersionId=6" },
            @private = false,
            description = "kept",
        })).ExpectAsync(HttpStatusCode.OK);
        var id = created.GetProperty("deploy_id").GetString();

        await server.RestartAsync();

        using var client = server.CreateClient(alice.Token);
        var deploy = await (await client.GetAsync($"/deploy/{id}")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(created.GetProperty("created_at").GetString(), deploy.GetProperty("created_at").GetString());
        var lora = await (await client.GetAsync("/v1/lora/durable")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal("kept", lora.GetProperty("description").GetString());
        Assert.False(lora.GetProperty("private").GetBoolean());
    }
}

public sealed class SqliteRestartTests() : RestartTests(TestDatabase.Sqlite);

public sealed class PostgresRestartTests() : RestartTests(TestDatabase.Postgres);
