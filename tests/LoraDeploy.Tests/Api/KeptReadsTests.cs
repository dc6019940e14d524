using System.Net;
using System.Text.Json;
using LoraDeploy.Deploys;
using Microsoft.Data.Sqlite;

namespace LoraDeploy.Tests.Api;

/// <summary>
/// On SQLite, polls are answered with bodies kept since the last commit (<see cref="SqliteDeployReads"/>). Whatever
/// commits — this server, or another connection as another process on the same file would — the next read sees it.
/// </summary>
public sealed class KeptReadsTests
{
    [Fact]
    public async Task Polls_are_answered_from_kept_bodies_until_another_connection_commits()
    {
        await using var server = await LoraDeployServer.StartAsync(TestDatabase.Sqlite, ServerFixture.ControlPlaneOnly);
        using var answers = new HostMeasurements(server.Services);
        var alice = await server.CreateUserAsync("alice");
        var id = await CreateAsync(alice, "kept");

        for (var i = 0; i < 5; i++)
        {
            Assert.Equal(1, MaxInstances(await GetAsync(alice, $"/deploy/{id}")));
            Assert.Equal(1, MaxInstances((await GetAsync(alice, "/deploy/list")).EnumerateArray().Single()));
        }
        var kept = Answers(answers, "kept");
        Assert.True(kept >= 8, $"{kept} of {kept + Answers(answers, "database")} polls were answered from kept bodies");

        // Another connection, outside the server's own: SQLite tells the reads about its commit as it would about
        // another process's. Each change must show in the very next read of both routes.
        await using var outside = new SqliteConnection($"Data Source={Path.Combine(server.DataDir, "loradeploy.db")};Pooling=False");
        await outside.OpenAsync();
        for (var max = 2; max <= 6; max++)
        {
            await using (var update = outside.CreateCommand())
            {
                update.CommandText = "UPDATE deploys SET \"MaxInstances\" = $max WHERE \"Id\" = $id";
                update.Parameters.AddWithValue("$max", max);
                update.Parameters.AddWithValue("$id", id);
                Assert.Equal(1, await update.ExecuteNonQueryAsync());
            }
            Assert.Equal(max, MaxInstances(await GetAsync(alice, $"/deploy/{id}")));
            Assert.Equal(max, MaxInstances((await GetAsync(alice, "/deploy/list")).EnumerateArray().Single()));
        }
    }

    [Fact]
    public async Task A_write_from_outside_is_seen_by_the_next_read_while_pollers_keep_bodies_warm()
    {
        await using var server = await LoraDeployServer.StartAsync(TestDatabase.Sqlite, ServerFixture.ControlPlaneOnly);
        var alice = await server.CreateUserAsync("alice");
        var id = await CreateAsync(alice, "busy");
        await using var outside = new SqliteConnection($"Data Source={Path.Combine(server.DataDir, "loradeploy.db")};Pooling=False");
        await outside.OpenAsync();
        // Pollers read (and keep) bodies while each commit happens, so some are read from before a commit and kept
        // after it: those must never be served again.
        await using var pollers = new DeployPollers(alice.Client, id);
        for (var i = 0; i < 60; i++)
        {
            var max = i % 4 + 1;
            await using (var update = outside.CreateCommand())
            {
                update.CommandText = "UPDATE deploys SET \"MaxInstances\" = $max WHERE \"Id\" = $id";
                update.Parameters.AddWithValue("$max", max);
                update.Parameters.AddWithValue("$id", id);
                await update.ExecuteNonQueryAsync();
            }
            Assert.Equal(max, MaxInstances(await GetAsync(alice, $"/deploy/{id}")));
            Assert.Equal(max, MaxInstances((await GetAsync(alice, "/deploy/list")).EnumerateArray().Single()));
        }
    }

    [Fact]
    public async Task A_kept_body_is_still_only_its_owners()
    {
        await using var server = await LoraDeployServer.StartAsync(TestDatabase.Sqlite, ServerFixture.ControlPlaneOnly);
        using var answers = new HostMeasurements(server.Services);
        var alice = await server.CreateUserAsync("alice");
        var bob = await server.CreateUserAsync("bob");
        var id = await CreateAsync(alice, "private");
        await GetAsync(alice, $"/deploy/{id}");
        await GetAsync(alice, "/deploy/list");

        for (var i = 0; i < 3; i++)
        {
            await (await bob.Client.GetAsync($"/deploy/{id}")).ExpectErrorAsync(HttpStatusCode.NotFound);
            Assert.Equal("[]", await (await bob.Client.GetAsync("/deploy/list")).Content.ReadAsStringAsync());
        }
        Assert.True(Answers(answers, "kept") >= 3, "bob's lookups of alice's deploy were answered from her kept body");
        Assert.Equal(id, (await GetAsync(alice, $"/deploy/{id}")).GetProperty("deploy_id").GetString());
    }

    [Fact]
    public async Task With_no_cache_every_poll_reads_the_database()
    {
        var settings = new Dictionary<string, string?>(ServerFixture.ControlPlaneOnly) { ["Deploy:ReadCacheBytes"] = "0" };
        await using var server = await LoraDeployServer.StartAsync(TestDatabase.Sqlite, settings);
        using var answers = new HostMeasurements(server.Services);
        var alice = await server.CreateUserAsync("alice");
        var id = await CreateAsync(alice, "uncached");
        for (var i = 0; i < 3; i++)
        {
            await GetAsync(alice, $"/deploy/{id}");
            await GetAsync(alice, "/deploy/list");
        }
        Assert.Equal(0, Answers(answers, "kept"));
        var read = Answers(answers, "database");
        Assert.True(read >= 6, $"{read} answers read from the database");
    }

    private static async Task<string> CreateAsync(TestUser user, string name)
    {
        var created = await (await user.Client.PostJsonAsync("/v1/lora/create", new
        {
            lora_name = name,
            base_model = "black-forest-labs/FLUX-1-dev",
            source = new { type = "civitai", civit_url = "https://civitai.com/models/5?modelVersionId=6" },
            @private = true,
        })).ExpectAsync(HttpStatusCode.OK);
        return created.GetProperty("deploy_id").GetString()!;
    }

    private static async Task<JsonElement> GetAsync(TestUser user, string path) =>
        await (await user.Client.GetAsync(path)).ExpectAsync(HttpStatusCode.OK);

    private static int MaxInstances(JsonElement deploy) => deploy.GetProperty("settings").GetProperty("max_instances").GetInt32();

    private static double Answers(HostMeasurements measured, string source) =>
        measured.Sum("loradeploy.deploy_reads", m => m.Tag("source") == source);
}
