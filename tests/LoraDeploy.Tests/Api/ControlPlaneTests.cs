using System.Net;
using System.Net.Http.Headers;
using System.Text.Json;
using System.Text.RegularExpressions;
using LoraDeploy.Data;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Api;

/// <summary>The DeepInfra contract, end to end over HTTP. Runs on SQLite and on PostgreSQL (see the two subclasses).</summary>
public abstract partial class ControlPlaneTests(ServerFixture fixture)
{
    private const string Flux = "black-forest-labs/FLUX-1-dev";
    private const string Sdxl = "stabilityai/stable-diffusion-xl-base-1.0";
    private const string CivitUrl = "https://civitai.com/models/1102?modelVersionId=1002";

    private LoraDeployServer Server => fixture.Server;

    [GeneratedRegex(@"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\+00:00$")]
    private static partial Regex Timestamp();

    private static object CreateBody(string name, bool isPrivate = true, string baseModel = Flux, string url = CivitUrl, string? description = null) => new
    {
        lora_name = name,
        base_model = baseModel,
        source = new { type = "civitai", civit_url = url },
        @private = isPrivate,
        description,
    };

    private static async Task<JsonElement> CreateAsync(TestUser user, string name, bool isPrivate = true, string baseModel = Flux)
    {
        var response = await user.Client.PostJsonAsync("/v1/lora/create", CreateBody(name, isPrivate, baseModel));
        return await response.ExpectAsync(HttpStatusCode.OK);
    }

    private Task SetStatusAsync(string deployId, string status) =>
        Server.QueryAsync(db => db.Deploys.Where(d => d.Id == deployId)
            .ExecuteUpdateAsync(set => set.SetProperty(d => d.Status, status)));

    // ---- success shapes against the contract ----

    [Fact]
    public async Task Create_answers_a_DeploymentOut_for_a_lora()
    {
        var alice = await Server.CreateUserAsync("alice");
        var deploy = await CreateAsync(alice, "pixel-art");

        ContractSchema.AssertMatches("DeploymentOut", deploy);
        Assert.Equal("DeploymentOut", ContractSchema.ResponseSchemaName("/v1/lora/create", "post"));
        Assert.Equal("lora", deploy.GetProperty("type").GetString());
        Assert.Equal("text-to-image", deploy.GetProperty("task").GetString());
        Assert.Equal("initializing", deploy.GetProperty("status").GetString());
        Assert.Equal($"{alice.Name}/pixel-art", deploy.GetProperty("model_name").GetString());
        Assert.Equal("", deploy.GetProperty("version").GetString());
        Assert.Equal("", deploy.GetProperty("fail_reason").GetString());
        Assert.Matches(Timestamp(), deploy.GetProperty("created_at").GetString()!);
        Assert.Matches(Timestamp(), deploy.GetProperty("updated_at").GetString()!);
        Assert.Equal(JsonValueKind.Null, deploy.GetProperty("config").ValueKind);
        Assert.Equal(1, deploy.GetProperty("settings").GetProperty("min_instances").GetInt32());
        Assert.Equal(1, deploy.GetProperty("settings").GetProperty("max_instances").GetInt32());
        Assert.Equal(0, deploy.GetProperty("instances").GetProperty("running").GetInt32());
    }

    [Fact]
    public async Task Deploy_routes_answer_contract_shapes()
    {
        var alice = await Server.CreateUserAsync("alice");
        var id = (await CreateAsync(alice, "one")).GetProperty("deploy_id").GetString()!;

        var got = await (await alice.Client.GetAsync($"/deploy/{id}")).ExpectAsync(HttpStatusCode.OK);
        ContractSchema.AssertMatches(ContractSchema.ResponseSchemaName("/deploy/{deploy_id}", "get")!, got);
        Assert.Equal(id, got.GetProperty("deploy_id").GetString());

        var list = await (await alice.Client.GetAsync("/deploy/list")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal("DeploymentOut[]", ContractSchema.ResponseSchemaName("/deploy/list", "get"));
        ContractSchema.AssertArrayOf("DeploymentOut", list);
        Assert.Single(list.EnumerateArray());

        var put = await (await alice.Client.PutAsync($"/deploy/{id}", HttpAssertions.Json(new { settings = new { min_instances = 0, max_instances = 2 } })))
            .ExpectAsync(HttpStatusCode.OK);
        ContractSchema.AssertMatches("DeployStatusOut", put);
        var scaled = await (await alice.Client.GetAsync($"/deploy/{id}")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(0, scaled.GetProperty("settings").GetProperty("min_instances").GetInt32());
        Assert.Equal(2, scaled.GetProperty("settings").GetProperty("max_instances").GetInt32());

        await SetStatusAsync(id, DeployStatus.Running);
        ContractSchema.AssertMatches("DeployStatusOut", await (await alice.Client.PostAsync($"/deploy/{id}/stop", null)).ExpectAsync(HttpStatusCode.OK));
        ContractSchema.AssertMatches("DeployStatusOut", await (await alice.Client.PostAsync($"/deploy/{id}/start", null)).ExpectAsync(HttpStatusCode.OK));
        var deleted = await (await alice.Client.DeleteAsync($"/deploy/{id}")).ExpectAsync(HttpStatusCode.OK);
        ContractSchema.AssertMatches("DeployDelete", deleted);
        Assert.Equal(id, deleted.GetProperty("deploy_id").GetString());
    }

    [Fact]
    public async Task Lora_routes_answer_our_documented_shapes()
    {
        var alice = await Server.CreateUserAsync("alice");
        var deploy = await CreateAsync(alice, "shape", isPrivate: false);
        var id = deploy.GetProperty("deploy_id").GetString();

        var lora = await (await alice.Client.GetAsync("/v1/lora/shape")).ExpectAsync(HttpStatusCode.OK);
        AssertLoraOut(lora);
        Assert.Equal("shape", lora.GetProperty("lora_name").GetString());
        Assert.Equal($"{alice.Name}/shape", lora.GetProperty("model_name").GetString());
        Assert.Equal(Flux, lora.GetProperty("base_model").GetString());
        Assert.Equal("civitai", lora.GetProperty("source").GetProperty("type").GetString());
        Assert.Equal(id, lora.GetProperty("deploy_id").GetString());
        Assert.Equal(JsonValueKind.Null, lora.GetProperty("probe").ValueKind);

        var status = await (await alice.Client.GetAsync("/v1/lora/shape/status")).ExpectAsync(HttpStatusCode.OK);
        foreach (var field in new[] { "lora_name", "model_name", "deploy_id", "status", "fail_reason", "version" })
        {
            Assert.Equal(JsonValueKind.String, status.GetProperty(field).ValueKind);
        }
        Assert.Equal(JsonValueKind.Number, status.GetProperty("downloaded_bytes").ValueKind);

        var patched = await (await alice.Client.PatchAsync("/v1/lora/shape", HttpAssertions.Json(new { description = "pixels", @private = true })))
            .ExpectAsync(HttpStatusCode.OK);
        AssertLoraOut(patched);
        Assert.Equal("pixels", patched.GetProperty("description").GetString());
        Assert.True(patched.GetProperty("private").GetBoolean());

        var mine = await (await alice.Client.GetAsync("/v1/user/loras")).ExpectAsync(HttpStatusCode.OK);
        AssertLoraOut(Assert.Single(mine.EnumerateArray()));

        foreach (var url in new[] { $"/v1/model/{Flux}/loras", $"/v1/model/{Uri.EscapeDataString(Flux)}/loras" })
        {
            var onBase = await (await alice.Client.GetAsync(url)).ExpectAsync(HttpStatusCode.OK);
            Assert.Contains(onBase.EnumerateArray(), l => l.GetProperty("deploy_id").GetString() == id);
        }

        var deleted = await (await alice.Client.DeleteAsync("/v1/lora/shape")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(id, deleted.GetProperty("deploy_id").GetString());
        await (await alice.Client.GetAsync("/v1/lora/shape")).ExpectErrorAsync(HttpStatusCode.NotFound);
        var deletedDeploy = await (await alice.Client.GetAsync($"/deploy/{id}")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal("deleted", deletedDeploy.GetProperty("status").GetString());
    }

    private static void AssertLoraOut(JsonElement lora)
    {
        foreach (var field in new[] { "lora_name", "model_name", "base_model", "description", "deploy_id", "status", "fail_reason", "version", "created_at", "updated_at" })
        {
            Assert.True(lora.GetProperty(field).ValueKind == JsonValueKind.String, $"{field} should be a string in {lora}");
        }
        Assert.True(lora.GetProperty("private").ValueKind is JsonValueKind.True or JsonValueKind.False);
        ContractSchema.AssertMatches("SourceModel", lora.GetProperty("source"));
        Assert.Equal(JsonValueKind.Number, lora.GetProperty("downloaded_bytes").ValueKind);
        Assert.Equal(JsonValueKind.Array, lora.GetProperty("warnings").ValueKind);
        Assert.True(lora.TryGetProperty("probe", out _));
        Assert.True(lora.TryGetProperty("size_bytes", out _));
        Assert.True(lora.TryGetProperty("civitai", out _));
    }

    [Fact]
    public async Task Public_lora_list_needs_no_token_and_answers_ModelOut()
    {
        var alice = await Server.CreateUserAsync("alice");
        await CreateAsync(alice, "public-one", isPrivate: false);
        await CreateAsync(alice, "private-one", isPrivate: true);

        using var anonymous = Server.CreateClient();
        var list = await (await anonymous.GetAsync("/models/lora/list")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal("ModelOut[]", ContractSchema.ResponseSchemaName("/models/lora/list", "get"));
        ContractSchema.AssertArrayOf("ModelOut", list);
        var names = list.EnumerateArray().Select(m => m.GetProperty("model_name").GetString()).ToList();
        Assert.Contains($"{alice.Name}/public-one", names);
        Assert.DoesNotContain($"{alice.Name}/private-one", names);
        var item = list.EnumerateArray().First(m => m.GetProperty("model_name").GetString() == $"{alice.Name}/public-one");
        Assert.Equal("text-to-image", item.GetProperty("type").GetString());
        Assert.Equal("text-to-image", item.GetProperty("reported_type").GetString());
        ContractSchema.AssertMatches("ModelPricingImageUnits", item.GetProperty("pricing"));
    }

    [Fact]
    public async Task Deploy_list_filters_by_status_and_hides_deleted_by_default()
    {
        var alice = await Server.CreateUserAsync("alice");
        var keep = (await CreateAsync(alice, "keep")).GetProperty("deploy_id").GetString();
        var gone = (await CreateAsync(alice, "gone")).GetProperty("deploy_id").GetString();
        await (await alice.Client.DeleteAsync($"/deploy/{gone}")).ExpectAsync(HttpStatusCode.OK);

        var all = await (await alice.Client.GetAsync("/deploy/list")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal([keep], all.EnumerateArray().Select(d => d.GetProperty("deploy_id").GetString()));

        var deleted = await (await alice.Client.GetAsync("/deploy/list?status=deleted")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal([gone], deleted.EnumerateArray().Select(d => d.GetProperty("deploy_id").GetString()));

        var both = await (await alice.Client.GetAsync("/deploy/list?status=initializing,deleted")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(2, both.GetArrayLength());
    }

    [Fact]
    public async Task Deploy_reads_render_timestamps_like_the_rest_of_the_api_and_list_newest_first()
    {
        // The hot reads render timestamps in SQL; a fraction just under the next second must be cut, not rounded
        // (rounding would turn 23:59:59.9999999 on 31 December into the next year).
        var alice = await Server.CreateUserAsync("alice");
        var older = (await CreateAsync(alice, "older")).GetProperty("deploy_id").GetString()!;
        var newer = (await CreateAsync(alice, "newer")).GetProperty("deploy_id").GetString()!;
        var stamp = new DateTime(2026, 12, 31, 23, 59, 59, DateTimeKind.Utc).AddTicks(9_999_999);
        await Server.QueryAsync(db => db.Deploys.Where(d => d.Id == older)
            .ExecuteUpdateAsync(set => set.SetProperty(d => d.CreatedAt, stamp).SetProperty(d => d.UpdatedAt, stamp.AddTicks(-9_999_999))));
        await Server.QueryAsync(db => db.Deploys.Where(d => d.Id == newer)
            .ExecuteUpdateAsync(set => set.SetProperty(d => d.CreatedAt, stamp.AddTicks(1)).SetProperty(d => d.UpdatedAt, stamp.AddTicks(1))));

        var one = await (await alice.Client.GetAsync($"/deploy/{older}")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal("2026-12-31T23:59:59+00:00", one.GetProperty("created_at").GetString());
        Assert.Equal("2026-12-31T23:59:59+00:00", one.GetProperty("updated_at").GetString());
        Assert.Equal(Timestamps.Format(stamp), one.GetProperty("created_at").GetString());

        var list = await (await alice.Client.GetAsync("/deploy/list")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal([newer, older], list.EnumerateArray().Select(d => d.GetProperty("deploy_id").GetString()));
        Assert.Equal("2027-01-01T00:00:00+00:00", list[0].GetProperty("created_at").GetString());
        var filtered = await (await alice.Client.GetAsync("/deploy/list?status=initializing")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(list.GetRawText(), filtered.GetRawText());
    }

    [Fact]
    public async Task Deploy_reads_write_what_the_serializer_writes_for_any_text_and_long_lists()
    {
        // The reads write JSON straight from the driver's row; the DeploymentOut record and the API's serializer are
        // the reference. Text that needs escaping (quotes, controls, non-ASCII, HTML characters), and a list long
        // enough to be handed to the connection in several chunks.
        var alice = await Server.CreateUserAsync("alice");
        var ids = new List<string>();
        for (var i = 0; i < 80; i++)
        {
            ids.Add((await CreateAsync(alice, $"escape-{i}")).GetProperty("deploy_id").GetString()!);
        }
        var reason = "He said \"no\" \\ <b>&amp;</b> 'quoted' \u0001\t\n é 漢字 😀 " + new string('x', 1_900);
        for (var i = 0; i < ids.Count; i++)
        {
            var n = i;
            await Server.QueryAsync(db => db.Deploys.Where(d => d.Id == ids[n]).ExecuteUpdateAsync(set => set
                .SetProperty(d => d.Status, DeployStatus.Failed)
                .SetProperty(d => d.FailReason, $"{n}: {reason}")
                .SetProperty(d => d.Version, "ab" + n)
                .SetProperty(d => d.RunningInstances, n)
                .SetProperty(d => d.PendingInstances, n + 1)
                .SetProperty(d => d.MinInstances, n + 2)
                .SetProperty(d => d.MaxInstances, n + 3)
                .SetProperty(d => d.CreatedAt, new DateTime(2026, 3, 1, 12, 0, 0, DateTimeKind.Utc).AddSeconds(n).AddTicks(1234567))));
        }
        var rows = await Server.QueryAsync(db => db.Deploys.Where(d => ids.Contains(d.Id)).OrderByDescending(d => d.CreatedAt).ToListAsync());
        var expected = rows.Select(d => new DeploymentOut(d.Id, d.ModelName, d.Version, d.Task, d.Status, d.FailReason,
            Timestamps.Format(d.CreatedAt), Timestamps.Format(d.UpdatedAt), new DeployInstances(d.RunningInstances, d.PendingInstances),
            null, new ScaleSettings(d.MinInstances, d.MaxInstances), d.Type)).ToList();

        var one = await alice.Client.GetAsync($"/deploy/{ids[2]}");
        Assert.Equal("application/json; charset=utf-8", one.Content.Headers.ContentType?.ToString());
        Assert.Equal(JsonSerializer.Serialize(expected.Single(d => d.DeployId == ids[2]), ApiJson.Context.DeploymentOut),
            await one.Content.ReadAsStringAsync());

        var list = await alice.Client.GetAsync("/deploy/list");
        Assert.Equal(HttpStatusCode.OK, list.StatusCode);
        Assert.Equal("application/json; charset=utf-8", list.Content.Headers.ContentType?.ToString());
        var listText = await list.Content.ReadAsStringAsync();
        Assert.True(listText.Length > 4 * LoraDeploy.Deploys.DeployListOutput.ChunkBytes, "the list should span several chunks");
        Assert.True(list.Headers.TransferEncodingChunked);
        Assert.Equal(JsonSerializer.Serialize(expected, ApiJson.Context.ListDeploymentOut), listText);
        var failed = await alice.Client.GetAsync("/deploy/list?status=failed");
        Assert.Equal(listText, await failed.Content.ReadAsStringAsync());
    }

    [Fact]
    public async Task Concurrent_reads_answer_each_caller_with_its_own_deploys_only()
    {
        // On PostgreSQL concurrent reads share queries (ReadBatcher): one query carries several callers' lookups,
        // so each answer must still be its caller's, and someone else's deploy still a 404.
        var alice = await Server.CreateUserAsync("alice");
        var bob = await Server.CreateUserAsync("bob");
        var carol = await Server.CreateUserAsync("carol");
        var owned = new Dictionary<TestUser, List<string>> { [alice] = [], [bob] = [], [carol] = [] };
        foreach (var (user, count) in new[] { (alice, 3), (bob, 2) })
        {
            for (var i = 0; i < count; i++)
            {
                owned[user].Add((await CreateAsync(user, $"mine-{i}")).GetProperty("deploy_id").GetString()!);
            }
        }
        var lists = new Dictionary<TestUser, string>();
        foreach (var user in owned.Keys)
        {
            lists[user] = await (await user.Client.GetAsync("/deploy/list")).Content.ReadAsStringAsync();
        }
        Assert.Equal("[]", lists[carol]);

        var allIds = owned.Values.SelectMany(ids => ids).ToList();
        var checks = Enumerable.Range(0, 300).Select(async n =>
        {
            var user = owned.Keys.ElementAt(n % 3);
            if (n % 4 == 0)
            {
                Assert.Equal(lists[user], await (await user.Client.GetAsync("/deploy/list")).Content.ReadAsStringAsync());
                return;
            }
            var id = allIds[n % allIds.Count];
            var response = await user.Client.GetAsync($"/deploy/{id}");
            if (owned[user].Contains(id))
            {
                Assert.Equal(id, (await response.ExpectAsync(HttpStatusCode.OK)).GetProperty("deploy_id").GetString());
            }
            else
            {
                await response.ExpectErrorAsync(HttpStatusCode.NotFound);
            }
        });
        await Task.WhenAll(checks);
    }

    [Fact]
    public async Task A_read_after_a_write_sees_it_while_other_reads_keep_queries_busy()
    {
        // A poll that shared a query already on its way to the database could miss the caller's own change.
        var alice = await Server.CreateUserAsync("alice");
        var id = (await CreateAsync(alice, "busy")).GetProperty("deploy_id").GetString()!;
        await using var pollers = new DeployPollers(alice.Client, id);
        for (var i = 0; i < 40; i++)
        {
            var max = i % 4 + 1;
            await (await alice.Client.PutAsync($"/deploy/{id}", HttpAssertions.Json(new { settings = new { min_instances = 0, max_instances = max } })))
                .ExpectAsync(HttpStatusCode.OK);
            var one = await (await alice.Client.GetAsync($"/deploy/{id}")).ExpectAsync(HttpStatusCode.OK);
            Assert.Equal(max, one.GetProperty("settings").GetProperty("max_instances").GetInt32());
            var list = await (await alice.Client.GetAsync("/deploy/list")).ExpectAsync(HttpStatusCode.OK);
            Assert.Equal(max, list.EnumerateArray().Single().GetProperty("settings").GetProperty("max_instances").GetInt32());
        }
    }

    [Fact]
    public async Task Deploy_lists_walk_the_callers_index_range_in_order_without_a_sort()
    {
        // "GET /deploy/list costs the rows it returns": both list statements must read the caller's range of
        // IX_deploys_UserId_CreatedAt_Id in list order. PostgreSQL is asked with the reads' own session settings and
        // a generic plan, which is what those connections run (docs/benchmarks.md: a bitmap scan and a sort took
        // 18 ms for 10,000 rows, walking the index 6 ms).
        var reads = Server.Services.GetRequiredService<LoraDeploy.Deploys.DeployReads>();
        var postgres = reads is LoraDeploy.Deploys.PostgresDeployReads;
        // The planner's choice depends on the statistics, so first a table shaped like docs/benchmarks.md's: 8,000
        // deploys of two callers, interleaved, list order unrelated to where the rows sit (with a handful of rows
        // PostgreSQL walks the index whatever its settings).
        var users = new List<long>();
        var callers = new List<TestUser>();
        foreach (var name in new[] { "plan-a", "plan-b" })
        {
            var user = await Server.CreateUserAsync(name);
            callers.Add(user);
            users.Add(await Server.QueryAsync(db => db.Users.Where(u => u.Name == user.Name).Select(u => u.Id).SingleAsync()));
        }
        const string rows = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 8000) SELECT 900000 + i AS i FROM n";
        var owner = $"CASE WHEN i % 2 = 0 THEN {users[0]} ELSE {users[1]} END";
        var loras =
            $"""INSERT INTO loras ("Id", "UserId", "Name", "BaseModel", "SourceType", "SourceUrl", "Private", "Description", "Deleted", "CreatedAt", "UpdatedAt", "ExpectedSha256", "SizeBytes") {(postgres ? "OVERRIDING SYSTEM VALUE" : "")} """ +
            $"""SELECT i, {owner}, 'plan-' || i, '{Flux}', 'civitai', '{CivitUrl}', {(postgres ? "true" : "1")}, '', {(postgres ? "false" : "0")}, '2026-01-01 00:00:00', '2026-01-01 00:00:00', '', 1 FROM ({rows}) AS seed""";
        var deploys =
            """INSERT INTO deploys ("Id", "UserId", "LoraId", "ModelName", "Type", "Task", "Status", "FailReason", "FailClass", "Version", "MinInstances", "MaxInstances", "RunningInstances", "PendingInstances", "CreatedAt", "UpdatedAt") """ +
            $"""SELECT 'plan' || (((i - 900000) * 7919) % 8000 + 10000), {owner}, i, 'plan/' || i, 'lora', 'text-to-image', 'deploying', '', '', '', 1, 1, 0, 0, '2026-01-01 00:00:00', '2026-01-01 00:00:00' FROM ({rows}) AS seed""";
        await Server.QueryAsync(db => db.Database.ExecuteSqlRawAsync(loras));
        await Server.QueryAsync(db => db.Database.ExecuteSqlRawAsync(deploys));
        await Server.QueryAsync(db => db.Database.ExecuteSqlRawAsync("ANALYZE"));

        var plans = await Server.QueryAsync(async db =>
        {
            var connection = db.Database.GetDbConnection();
            await connection.OpenAsync();
            if (postgres)
            {
                foreach (var setting in LoraDeploy.Deploys.PostgresDeployReads.PlannerSettings.Split("-c", StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
                {
                    await Execute(connection, $"SET {setting}");
                }
            }
            var found = new List<string>();
            foreach (var (name, sql) in new[] { ("list", reads.NotDeletedOfSql), ("status", reads.WithStatusSql) })
            {
                found.Add(postgres
                    ? await Execute(connection, $"PREPARE {name}_plan AS {sql.Replace("@user", "$1").Replace("@statuses", "$2")}; " +
                        $"EXPLAIN EXECUTE {name}_plan({users[0]}{(name == "status" ? ", '{running,failed}'" : "")})")
                    : await Execute(connection, $"EXPLAIN QUERY PLAN {sql}"));
            }
            if (reads is LoraDeploy.Deploys.PostgresDeployReads batched)
            {
                found.Add(await Execute(connection, $"PREPARE ids_plan AS {batched.ByIdsSql.Replace("@ids", "$1::text[]")}; " +
                    "EXPLAIN EXECUTE ids_plan('{plan10001,plan10002,plan10003}')"));
                found.Add(await Execute(connection, $"PREPARE lists_plan AS {batched.NotDeletedOfManySql.Replace("@users", "$1::bigint[]").Replace("@rows", "$2")}; " +
                    $"EXPLAIN EXECUTE lists_plan('{{{users[0]},{users[1]}}}', {LoraDeploy.Deploys.PostgresDeployReads.BatchedListRows + 1})"));
            }
            return found;
        });

        foreach (var plan in plans.Take(2))
        {
            Assert.Contains("IX_deploys_UserId_CreatedAt_Id", plan);
            Assert.DoesNotContain("Sort", plan);
            Assert.DoesNotContain("TEMP B-TREE", plan);
            Assert.DoesNotContain("Bitmap", plan);
        }
        if (postgres)
        {
            // The batched statements: one primary-key lookup per id, and each caller's own index range, sorted only
            // within a caller (the callers are already in order), never the whole table.
            Assert.Contains("PK_deploys", plans[2]);
            Assert.DoesNotContain("Seq Scan", plans[2]);
            Assert.Contains("Index Scan Backward using \"IX_deploys_UserId_CreatedAt_Id\"", plans[3]);
            Assert.Contains("Presorted Key: k.\"Caller\"", plans[3]);
            Assert.DoesNotContain("Bitmap", plans[3]);
            Assert.DoesNotContain("Seq Scan", plans[3]);
        }

        // Each caller's 4,000 deploys over HTTP, newest first: more than one batched list carries (PostgreSQL), so
        // the caller's own query streams them.
        var expected = await Server.QueryAsync(db => db.Deploys.Where(d => d.UserId == users[0])
            .OrderByDescending(d => d.CreatedAt).ThenByDescending(d => d.Id).Select(d => d.Id).ToListAsync());
        var listed = await (await callers[0].Client.GetAsync("/deploy/list")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(expected, listed.EnumerateArray().Select(d => d.GetProperty("deploy_id").GetString()!));

        static async Task<string> Execute(System.Data.Common.DbConnection connection, string sql)
        {
            await using var command = connection.CreateCommand();
            command.CommandText = sql;
            foreach (var (name, value) in new (string, object)[] { ("@user", 1L), ("@statuses", "[\"running\",\"failed\"]") })
            {
                if (sql.StartsWith("EXPLAIN QUERY PLAN", StringComparison.Ordinal) && sql.Contains(name, StringComparison.Ordinal))
                {
                    var parameter = command.CreateParameter();
                    parameter.ParameterName = name;
                    parameter.Value = value;
                    command.Parameters.Add(parameter);
                }
            }
            await using var reader = await command.ExecuteReaderAsync();
            var lines = new List<string>();
            do
            {
                while (await reader.ReadAsync())
                {
                    lines.Add(reader.GetValue(reader.FieldCount - 1)?.ToString() ?? "");
                }
            } while (await reader.NextResultAsync());
            return string.Join('\n', lines);
        }
    }

    [Fact]
    public async Task Deploy_list_refuses_an_unknown_status()
    {
        var alice = await Server.CreateUserAsync("alice");
        var error = await (await alice.Client.GetAsync("/deploy/list?status=running,bogus")).ExpectValidationErrorAsync("query", "status");
        Assert.Contains("bogus", error.GetProperty("msg").GetString());
    }

    // ---- validation ----

    public static TheoryData<string, string[]> InvalidCreateBodies => new()
    {
        { """{"base_model":"black-forest-labs/FLUX-1-dev","source":{"type":"civitai","civit_url":"https://civitai.com/models/1"},"private":true}""", ["body", "lora_name"] },
        { """{"lora_name":"x","source":{"type":"civitai","civit_url":"https://civitai.com/models/1"},"private":true}""", ["body", "base_model"] },
        { """{"lora_name":"x","base_model":"black-forest-labs/FLUX-1-dev","private":true}""", ["body", "source"] },
        { """{"lora_name":"x","base_model":"black-forest-labs/FLUX-1-dev","source":{"type":"civitai","civit_url":"https://civitai.com/models/1"}}""", ["body", "private"] },
        { """{"lora_name":"x","base_model":"black-forest-labs/FLUX-1-dev","source":{"civit_url":"https://civitai.com/models/1"},"private":true}""", ["body", "source", "type"] },
        { """{"lora_name":"x","base_model":"black-forest-labs/FLUX-1-dev","source":{"type":"civitai"},"private":true}""", ["body", "source", "civit_url"] },
        { """{"lora_name":42,"base_model":"black-forest-labs/FLUX-1-dev","source":{"type":"civitai","civit_url":"https://civitai.com/models/1"},"private":true}""", ["body", "lora_name"] },
        { """{"lora_name":"x","base_model":["a"],"source":{"type":"civitai","civit_url":"https://civitai.com/models/1"},"private":true}""", ["body", "base_model"] },
        { """{"lora_name":"x","base_model":"black-forest-labs/FLUX-1-dev","source":"civitai","private":true}""", ["body", "source"] },
        { """{"lora_name":"x","base_model":"black-forest-labs/FLUX-1-dev","source":{"type":"civitai","civit_url":"https://civitai.com/models/1"},"private":"yes"}""", ["body", "private"] },
        { """{"lora_name":"x","base_model":"black-forest-labs/FLUX-1-dev","source":{"type":"civitai","civit_url":7},"private":true}""", ["body", "source", "civit_url"] },
        { """{"lora_name":"x","base_model":"black-forest-labs/FLUX-1-dev","source":{"type":"civitai","civit_url":"https://civitai.com/models/1"},"private":true,"description":5}""", ["body", "description"] },
        { """{"lora_name":"x","base_model":"black-forest-labs/FLUX-1-dev","source":{"type":"huggingface","civit_url":"https://civitai.com/models/1"},"private":true}""", ["body", "source", "type"] },
        { """{"lora_name":"x","base_model":"black-forest-labs/FLUX-1-dev","source":{"type":"civitai","civit_url":"https://example.com/models/1"},"private":true}""", ["body", "source", "civit_url"] },
        { """{"lora_name":"x","base_model":"black-forest-labs/FLUX-1-dev","source":{"type":"civitai","civit_url":"not a url"},"private":true}""", ["body", "source", "civit_url"] },
        { """{"lora_name":"x","base_model":"runwayml/stable-diffusion-v9","source":{"type":"civitai","civit_url":"https://civitai.com/models/1"},"private":true}""", ["body", "base_model"] },
        { """{"lora_name":"-starts-with-dash","base_model":"black-forest-labs/FLUX-1-dev","source":{"type":"civitai","civit_url":"https://civitai.com/models/1"},"private":true}""", ["body", "lora_name"] },
        { """{"lora_name":"has/slash","base_model":"black-forest-labs/FLUX-1-dev","source":{"type":"civitai","civit_url":"https://civitai.com/models/1"},"private":true}""", ["body", "lora_name"] },
        { """{"lora_name":"","base_model":"black-forest-labs/FLUX-1-dev","source":{"type":"civitai","civit_url":"https://civitai.com/models/1"},"private":true}""", ["body", "lora_name"] },
        { """{"lora_name":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","base_model":"black-forest-labs/FLUX-1-dev","source":{"type":"civitai","civit_url":"https://civitai.com/models/1"},"private":true}""", ["body", "lora_name"] },
        { """{"lora_name":"sp ace","base_model":"black-forest-labs/FLUX-1-dev","source":{"type":"civitai","civit_url":"https://civitai.com/models/1"},"private":true}""", ["body", "lora_name"] },
        { """["not","an","object"]""", ["body"] },
    };

    [Theory]
    [MemberData(nameof(InvalidCreateBodies))]
    public async Task Create_refuses_bad_input_with_a_422_naming_the_field(string body, string[] loc)
    {
        var alice = await Server.CreateUserAsync("alice");
        var response = await alice.Client.PostAsync("/v1/lora/create", HttpAssertions.Json(body));
        await response.ExpectValidationErrorAsync([.. loc]);
        Assert.Empty(await (await alice.Client.GetAsync("/deploy/list")).ExpectAsync(HttpStatusCode.OK) is var list ? list.EnumerateArray() : default);
    }

    [Fact]
    public async Task Create_refuses_malformed_json_with_a_422()
    {
        var alice = await Server.CreateUserAsync("alice");
        var response = await alice.Client.PostAsync("/v1/lora/create", HttpAssertions.Json("""{"lora_name": "x", """));
        var json = await response.ExpectAsync(HttpStatusCode.UnprocessableEntity);
        ContractSchema.AssertMatches("HTTPValidationError", json);
        var detail = json.GetProperty("detail")[0];
        Assert.Equal("body", detail.GetProperty("loc")[0].GetString());
        Assert.Equal("json_invalid", detail.GetProperty("type").GetString());
    }

    [Fact]
    public async Task Create_refuses_bodies_over_64_KiB_with_413()
    {
        var alice = await Server.CreateUserAsync("alice");
        var huge = JsonSerializer.Serialize(CreateBody("big", description: new string('x', 70 * 1024)));
        await (await alice.Client.PostAsync("/v1/lora/create", HttpAssertions.Json(huge))).ExpectErrorAsync(HttpStatusCode.RequestEntityTooLarge);
    }

    [Fact]
    public async Task Scale_settings_are_validated()
    {
        var alice = await Server.CreateUserAsync("alice");
        var id = (await CreateAsync(alice, "scale")).GetProperty("deploy_id").GetString();
        async Task Expect(object body, params object[] loc) =>
            await (await alice.Client.PutAsync($"/deploy/{id}", HttpAssertions.Json(body))).ExpectValidationErrorAsync(loc);

        await Expect(new { }, "body", "settings");
        await Expect(new { settings = new { min_instances = -1, max_instances = 1 } }, "body", "settings", "min_instances");
        await Expect(new { settings = new { min_instances = 0, max_instances = 1000 } }, "body", "settings", "max_instances");
        await Expect(new { settings = new { min_instances = 3, max_instances = 2 } }, "body", "settings");
        await Expect(new { settings = new { min_instances = "one", max_instances = 2 } }, "body", "settings", "min_instances");
    }

    // ---- auth ----

    [Fact]
    public async Task Missing_or_bad_tokens_get_401_through_either_header()
    {
        var alice = await Server.CreateUserAsync("alice");
        using var client = Server.CreateClient();
        var wrongSecret = alice.Token[..^4] + (alice.Token.EndsWith("AAAA", StringComparison.Ordinal) ? "BBBB" : "AAAA");

        async Task Expect401(Action<HttpRequestHeaders> setHeaders)
        {
            using var request = new HttpRequestMessage(HttpMethod.Get, "/deploy/list");
            setHeaders(request.Headers);
            var response = await client.SendAsync(request);
            Assert.Equal("Bearer", response.Headers.WwwAuthenticate.Single().Scheme);
            await response.ExpectErrorAsync(HttpStatusCode.Unauthorized);
        }

        await Expect401(_ => { });
        await Expect401(h => h.Authorization = new AuthenticationHeaderValue("Bearer", "nonsense"));
        await Expect401(h => h.Authorization = new AuthenticationHeaderValue("Bearer", wrongSecret));
        await Expect401(h => h.Add("xi-api-key", "nonsense"));
        await Expect401(h => h.Add("xi-api-key", wrongSecret));
        await Expect401(h => h.Authorization = new AuthenticationHeaderValue("Basic", alice.Token));

        foreach (var setHeaders in new Action<HttpRequestHeaders>[]
                 {
                     h => h.Authorization = new AuthenticationHeaderValue("Bearer", alice.Token),
                     h => h.TryAddWithoutValidation("Authorization", "bearer " + alice.Token),
                     h => h.Add("xi-api-key", alice.Token),
                 })
        {
            using var request = new HttpRequestMessage(HttpMethod.Get, "/deploy/list");
            setHeaders(request.Headers);
            await (await client.SendAsync(request)).ExpectAsync(HttpStatusCode.OK);
        }

        await (await client.PostAsync("/v1/lora/create", HttpAssertions.Json(CreateBody("x")))).ExpectErrorAsync(HttpStatusCode.Unauthorized);
    }

    [Fact]
    public async Task Tokens_are_stored_only_as_hashes()
    {
        var alice = await Server.CreateUserAsync("alice");
        var stored = await Server.QueryAsync(db => db.ApiTokens.Where(t => t.User!.Name == alice.Name).ToListAsync());
        var token = Assert.Single(stored);
        Assert.Equal(32, token.SecretHash.Length);
        var secret = TokenParts.Secret(alice.Token);
        Assert.Equal(43, secret.Length);
        Assert.NotEqual(secret, Convert.ToBase64String(token.SecretHash));
        Assert.DoesNotContain(secret, System.Text.Encoding.UTF8.GetString(token.SecretHash));
    }

    // ---- tenants ----

    [Fact]
    public async Task Another_users_private_objects_are_invisible_and_untouchable()
    {
        var alice = await Server.CreateUserAsync("alice");
        var bob = await Server.CreateUserAsync("bob");
        var secretDeploy = (await CreateAsync(alice, "secret", isPrivate: true)).GetProperty("deploy_id").GetString();
        await SetStatusAsync(secretDeploy!, DeployStatus.Running);

        await (await bob.Client.GetAsync($"/deploy/{secretDeploy}")).ExpectErrorAsync(HttpStatusCode.NotFound);
        await (await bob.Client.PutAsync($"/deploy/{secretDeploy}", HttpAssertions.Json(new { settings = new { min_instances = 0, max_instances = 0 } })))
            .ExpectErrorAsync(HttpStatusCode.NotFound);
        await (await bob.Client.PostAsync($"/deploy/{secretDeploy}/stop", null)).ExpectErrorAsync(HttpStatusCode.NotFound);
        await (await bob.Client.PostAsync($"/deploy/{secretDeploy}/start", null)).ExpectErrorAsync(HttpStatusCode.NotFound);
        await (await bob.Client.DeleteAsync($"/deploy/{secretDeploy}")).ExpectErrorAsync(HttpStatusCode.NotFound);
        await (await bob.Client.GetAsync("/v1/lora/secret")).ExpectErrorAsync(HttpStatusCode.NotFound);
        await (await bob.Client.GetAsync($"/v1/lora/{alice.Name}/secret")).ExpectErrorAsync(HttpStatusCode.NotFound);
        await (await bob.Client.GetAsync("/v1/lora/secret/status")).ExpectErrorAsync(HttpStatusCode.NotFound);
        await (await bob.Client.PatchAsync("/v1/lora/secret", HttpAssertions.Json(new { @private = false }))).ExpectErrorAsync(HttpStatusCode.NotFound);
        await (await bob.Client.DeleteAsync("/v1/lora/secret")).ExpectErrorAsync(HttpStatusCode.NotFound);

        Assert.Empty((await (await bob.Client.GetAsync("/deploy/list?status=initializing,downloading,deploying,running,stopped,failed,deleted")).ExpectAsync(HttpStatusCode.OK)).EnumerateArray());
        Assert.Empty((await (await bob.Client.GetAsync("/v1/user/loras")).ExpectAsync(HttpStatusCode.OK)).EnumerateArray());
        Assert.DoesNotContain((await (await bob.Client.GetAsync($"/v1/model/{Flux}/loras")).ExpectAsync(HttpStatusCode.OK)).EnumerateArray(),
            l => l.GetProperty("deploy_id").GetString() == secretDeploy);

        // Nothing bob did touched it.
        var intact = await (await alice.Client.GetAsync($"/deploy/{secretDeploy}")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal("running", intact.GetProperty("status").GetString());
        var lora = await (await alice.Client.GetAsync("/v1/lora/secret")).ExpectAsync(HttpStatusCode.OK);
        Assert.True(lora.GetProperty("private").GetBoolean());
    }

    [Fact]
    public async Task A_public_lora_is_readable_by_others_but_only_its_owner_changes_it()
    {
        var alice = await Server.CreateUserAsync("alice");
        var bob = await Server.CreateUserAsync("bob");
        var deployId = (await CreateAsync(alice, "shared", isPrivate: false, baseModel: Sdxl)).GetProperty("deploy_id").GetString();

        var seen = await (await bob.Client.GetAsync($"/v1/lora/{alice.Name}/shared")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal($"{alice.Name}/shared", seen.GetProperty("model_name").GetString());
        var onBase = await (await bob.Client.GetAsync($"/v1/model/{Sdxl}/loras")).ExpectAsync(HttpStatusCode.OK);
        Assert.Contains(onBase.EnumerateArray(), l => l.GetProperty("model_name").GetString() == $"{alice.Name}/shared");

        // bob's own namespace has no "shared", and alice's deploy is not his.
        await (await bob.Client.PatchAsync("/v1/lora/shared", HttpAssertions.Json(new { description = "mine now" }))).ExpectErrorAsync(HttpStatusCode.NotFound);
        await (await bob.Client.DeleteAsync("/v1/lora/shared")).ExpectErrorAsync(HttpStatusCode.NotFound);
        await (await bob.Client.DeleteAsync($"/deploy/{deployId}")).ExpectErrorAsync(HttpStatusCode.NotFound);
        await (await bob.Client.GetAsync($"/deploy/{deployId}")).ExpectErrorAsync(HttpStatusCode.NotFound);
        Assert.Empty((await (await bob.Client.GetAsync("/v1/user/loras")).ExpectAsync(HttpStatusCode.OK)).EnumerateArray());

        var still = await (await alice.Client.GetAsync("/v1/lora/shared")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal("", still.GetProperty("description").GetString());
    }

    // ---- conflicts and idempotency ----

    [Fact]
    public async Task A_duplicate_name_is_a_409_until_the_first_is_deleted()
    {
        var alice = await Server.CreateUserAsync("alice");
        var bob = await Server.CreateUserAsync("bob");
        await CreateAsync(alice, "dup");
        var message = await (await alice.Client.PostJsonAsync("/v1/lora/create", CreateBody("dup"))).ExpectErrorAsync(HttpStatusCode.Conflict);
        Assert.Contains("dup", message);

        await CreateAsync(bob, "dup"); // names are per user

        await (await alice.Client.DeleteAsync("/v1/lora/dup")).ExpectAsync(HttpStatusCode.OK);
        await CreateAsync(alice, "dup");
    }

    [Fact]
    public async Task Idempotency_key_returns_the_same_deploy_for_the_same_body_and_422_for_another()
    {
        var alice = await Server.CreateUserAsync("alice");
        async Task<HttpResponseMessage> Post(object body, string key)
        {
            using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/lora/create") { Content = HttpAssertions.Json(body) };
            request.Headers.Add("Idempotency-Key", key);
            return await alice.Client.SendAsync(request);
        }

        var first = await (await Post(CreateBody("idem"), "key-1")).ExpectAsync(HttpStatusCode.OK);
        var again = await (await Post(CreateBody("idem"), "key-1")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(first.GetProperty("deploy_id").GetString(), again.GetProperty("deploy_id").GetString());

        await (await Post(CreateBody("idem-other"), "key-1")).ExpectValidationErrorAsync("header", "Idempotency-Key");
        await (await Post(CreateBody("idem"), "key-2")).ExpectErrorAsync(HttpStatusCode.Conflict);

        var list = await (await alice.Client.GetAsync("/deploy/list")).ExpectAsync(HttpStatusCode.OK);
        Assert.Single(list.EnumerateArray());
    }

    [Fact]
    public async Task Concurrent_creates_of_one_name_make_exactly_one_deploy()
    {
        var alice = await Server.CreateUserAsync("alice");
        var responses = await Task.WhenAll(Enumerable.Range(0, 8).Select(_ => alice.Client.PostJsonAsync("/v1/lora/create", CreateBody("race"))));
        Assert.Equal(1, responses.Count(r => r.StatusCode == HttpStatusCode.OK));
        Assert.All(responses.Where(r => r.StatusCode != HttpStatusCode.OK), r => Assert.Equal(HttpStatusCode.Conflict, r.StatusCode));
        Assert.Single((await (await alice.Client.GetAsync("/deploy/list")).ExpectAsync(HttpStatusCode.OK)).EnumerateArray());
    }

    // ---- transitions ----

    [Fact]
    public async Task Stop_start_and_delete_follow_the_lifecycle()
    {
        var alice = await Server.CreateUserAsync("alice");
        var id = (await CreateAsync(alice, "life")).GetProperty("deploy_id").GetString()!;

        Assert.Contains("initializing", await (await alice.Client.PostAsync($"/deploy/{id}/stop", null)).ExpectErrorAsync(HttpStatusCode.BadRequest));
        Assert.Contains("initializing", await (await alice.Client.PostAsync($"/deploy/{id}/start", null)).ExpectErrorAsync(HttpStatusCode.BadRequest));

        foreach (var from in new[] { DeployStatus.Deploying, DeployStatus.Running })
        {
            await SetStatusAsync(id, from);
            await (await alice.Client.PostAsync($"/deploy/{id}/stop", null)).ExpectAsync(HttpStatusCode.OK);
            var stopped = await (await alice.Client.GetAsync($"/deploy/{id}")).ExpectAsync(HttpStatusCode.OK);
            Assert.Equal("stopped", stopped.GetProperty("status").GetString());
            Assert.Equal(0, stopped.GetProperty("instances").GetProperty("running").GetInt32());
            Assert.Contains("stopped", await (await alice.Client.PostAsync($"/deploy/{id}/stop", null)).ExpectErrorAsync(HttpStatusCode.BadRequest));
            await (await alice.Client.PostAsync($"/deploy/{id}/start", null)).ExpectAsync(HttpStatusCode.OK);
            Assert.Equal("deploying", (await (await alice.Client.GetAsync($"/deploy/{id}")).ExpectAsync(HttpStatusCode.OK)).GetProperty("status").GetString());
        }

        await SetStatusAsync(id, DeployStatus.Failed);
        Assert.Contains("failed", await (await alice.Client.PostAsync($"/deploy/{id}/stop", null)).ExpectErrorAsync(HttpStatusCode.BadRequest));
        Assert.Contains("failed", await (await alice.Client.PutAsync($"/deploy/{id}", HttpAssertions.Json(new { settings = new { min_instances = 1, max_instances = 1 } })))
            .ExpectErrorAsync(HttpStatusCode.BadRequest));

        await (await alice.Client.DeleteAsync($"/deploy/{id}")).ExpectAsync(HttpStatusCode.OK);
        await (await alice.Client.DeleteAsync($"/deploy/{id}")).ExpectAsync(HttpStatusCode.OK); // idempotent
        Assert.Contains("deleted", await (await alice.Client.PostAsync($"/deploy/{id}/start", null)).ExpectErrorAsync(HttpStatusCode.BadRequest));
        Assert.Contains("deleted", await (await alice.Client.PostAsync($"/deploy/{id}/stop", null)).ExpectErrorAsync(HttpStatusCode.BadRequest));
        Assert.Contains("deleted", await (await alice.Client.PutAsync($"/deploy/{id}", HttpAssertions.Json(new { settings = new { min_instances = 1, max_instances = 1 } })))
            .ExpectErrorAsync(HttpStatusCode.BadRequest));
        await (await alice.Client.GetAsync("/v1/lora/life")).ExpectErrorAsync(HttpStatusCode.NotFound);
    }

    [Fact]
    public async Task Unknown_deploys_and_routes_are_404_with_an_error_body()
    {
        var alice = await Server.CreateUserAsync("alice");
        await (await alice.Client.GetAsync("/deploy/doesnotexist")).ExpectErrorAsync(HttpStatusCode.NotFound);
        await (await alice.Client.DeleteAsync("/deploy/doesnotexist")).ExpectErrorAsync(HttpStatusCode.NotFound);
        await (await alice.Client.GetAsync("/no/such/route")).ExpectErrorAsync(HttpStatusCode.NotFound);
    }

    // ---- service endpoints ----

    [Fact]
    public async Task Health_ready_openapi_and_docs_are_served()
    {
        using var client = Server.CreateClient();
        Assert.Equal("ok", (await (await client.GetAsync("/health")).ExpectAsync(HttpStatusCode.OK)).GetProperty("status").GetString());
        await (await client.GetAsync("/ready")).ExpectAsync(HttpStatusCode.OK);

        var openApi = await (await client.GetAsync("/openapi/v1.json")).ExpectAsync(HttpStatusCode.OK);
        var schemas = openApi.GetProperty("components").GetProperty("schemas");
        foreach (var name in new[] { "CreateLoraApiRequest", "SourceModel", "DeploymentOut", "DeployInstances", "DeployLLMConfig", "ScaleSettings", "HTTPValidationError", "DeepError" })
        {
            Assert.True(schemas.TryGetProperty(name, out _), $"OpenAPI lacks schema {name}");
        }
        var paths = openApi.GetProperty("paths");
        foreach (var path in new[] { "/v1/lora/create", "/deploy/list", "/deploy/{deploy_id}", "/v1/lora/{lora_name}", "/models/lora/list" })
        {
            Assert.True(paths.TryGetProperty(path, out _), $"OpenAPI lacks {path}");
        }
        // The deploy reads write their JSON themselves; the document still describes it as DeploymentOut.
        JsonElement Ok(string path) => paths.GetProperty(path).GetProperty("get").GetProperty("responses").GetProperty("200")
            .GetProperty("content").GetProperty("application/json").GetProperty("schema");
        Assert.EndsWith("/DeploymentOut", Ok("/deploy/{deploy_id}").GetProperty("$ref").GetString());
        Assert.Equal("array", Ok("/deploy/list").GetProperty("type").GetString());
        Assert.EndsWith("/DeploymentOut", Ok("/deploy/list").GetProperty("items").GetProperty("$ref").GetString());
        // Create takes JSON (DeepInfra's body) or an upload: a multipart form with the json part first, then the file.
        var create = paths.GetProperty("/v1/lora/create").GetProperty("post").GetProperty("requestBody").GetProperty("content");
        Assert.EndsWith("/CreateLoraApiRequest", create.GetProperty("application/json").GetProperty("schema").GetProperty("$ref").GetString());
        var form = create.GetProperty("multipart/form-data");
        Assert.Equal(["json", "file"], form.GetProperty("schema").GetProperty("required").EnumerateArray().Select(e => e.GetString()!).Order().Reverse());
        Assert.Equal("binary", form.GetProperty("schema").GetProperty("properties").GetProperty("file").GetProperty("format").GetString());
        Assert.Equal("application/json", form.GetProperty("encoding").GetProperty("json").GetProperty("contentType").GetString());

        var docs = await client.GetAsync("/docs");
        Assert.Equal(HttpStatusCode.OK, docs.StatusCode);
        Assert.Contains("text/html", docs.Content.Headers.ContentType?.MediaType);
    }

    [Fact]
    public async Task Base_models_list_the_registry()
    {
        using var client = Server.CreateClient();
        var models = await (await client.GetAsync("/v1/base-models")).ExpectAsync(HttpStatusCode.OK);
        var flux = models.EnumerateArray().Single(m => m.GetProperty("name").GetString() == Flux);
        Assert.Equal("flux1", flux.GetProperty("family").GetString());
    }
}

public sealed class SqliteControlPlaneTests(SqliteServerFixture fixture) : ControlPlaneTests(fixture), IClassFixture<SqliteServerFixture>;

public sealed class PostgresControlPlaneTests(PostgresServerFixture fixture) : ControlPlaneTests(fixture), IClassFixture<PostgresServerFixture>;
