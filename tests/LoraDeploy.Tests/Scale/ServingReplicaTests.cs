using System.Net;
using LoraDeploy.Auth;
using LoraDeploy.Data;
using LoraDeploy.Lora.Tests.Support;
using LoraDeploy.Tests.Serving;
using LoraDeploy.Tests.Simulator;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Scale;

/// <summary>
/// Two <c>serve</c> replicas on one PostgreSQL database and one blob folder, one real llama.cpp worker registered
/// through replica A: replica B places, sees and routes to the same worker, because workers are rows.
/// </summary>
public sealed class ServingReplicaTests
{
    private const string Pool = LoraModelImportTests.Pool;

    [Fact]
    public async Task Two_api_replicas_on_postgres_route_to_the_same_workers()
    {
        var connection = await TestBackend.CreatePostgresDatabaseAsync();
        var root = Directory.CreateTempSubdirectory("serving-replicas-").FullName;
        await using var hub = await HuggingFaceSimulator.StartAsync();
        var servers = new List<ServerProcess>();
        try
        {
            var model = new TinyLlama().Generate();
            var gguf = model.WriteGguf(Path.Combine(root, "tiny.gguf"));
            var settings = LoraModelImportTests.LlmPoolSettings(hub, gguf);
            settings["Database:Provider"] = "postgres";
            settings["ConnectionStrings:Postgres"] = connection;
            settings["Storage:Path"] = Path.Combine(root, "shared-blobs");
            settings["Workers:HeartbeatSeconds"] = "1";
            foreach (var name in new[] { "a", "b" })
            {
                servers.Add(await ServerProcess.StartAsync(Directory.CreateDirectory(Path.Combine(root, name)).FullName, settings));
            }
            var (a, b) = (servers[0], servers[1]);

            var options = new DbContextOptionsBuilder<PostgresLoraDeployContext>();
            DatabaseExtensions.ConfigurePostgres(options, connection);
            string userToken, workerToken;
            await using (var db = new PostgresLoraDeployContext(options.Options))
            {
                userToken = await ApiTokens.CreateForUserAsync(db, "shared", isAdmin: false, "test", DateTime.UtcNow, CancellationToken.None);
                workerToken = await WorkerTokens.CreateAsync(db, "gpu-1", DateTime.UtcNow, CancellationToken.None);
            }
            servers.Add(await ServerProcess.StartWorkerAsync(Directory.CreateDirectory(Path.Combine(root, "worker")).FullName, a.BaseUrl, workerToken,
                new Dictionary<string, string?>
                {
                    [$"BaseModels:{Pool}:Family"] = "llama",
                    [$"BaseModels:{Pool}:Engine"] = "llamacpp",
                    [$"BaseModels:{Pool}:Gguf"] = gguf,
                    [$"BaseModels:{Pool}:Defaults:context_size"] = "256",
                    [$"BaseModels:{Pool}:Defaults:threads"] = "1",
                }));

            var fixture = new PeftAdapterFixture { Seed = 21, Std = 1.5f };
            hub.AddAdapter("alice/shared", fixture.Generate(model).Safetensors().ToBytes(), config: fixture.ConfigJson());
            using var viaA = a.CreateClient(userToken);
            using var viaB = b.CreateClient(userToken);
            var created = await (await viaA.PostJsonAsync("/lora-model", new { hf_model_name = "alice/shared", lora_model_name = "shared", base_model_name = Pool }))
                .ExpectAsync(HttpStatusCode.OK);
            var id = created.GetProperty("deploy_id").GetString()!;
            var deadline = DateTime.UtcNow.AddSeconds(60);
            while ((await (await viaB.GetAsync($"/deploy/{id}")).ExpectAsync(HttpStatusCode.OK)).GetProperty("status").GetString() != "running")
            {
                Assert.True(DateTime.UtcNow < deadline, $"never running\n{a.Output}\n{b.Output}");
                await Task.Delay(100);
            }
            var body = new { model = "shared/shared", messages = new[] { new { role = "user", content = "hello world" } }, max_tokens = 4, temperature = 0 };
            var fromA = await (await viaA.PostJsonAsync("/v1/openai/chat/completions", body)).ExpectAsync(HttpStatusCode.OK);
            var fromB = await (await viaB.PostJsonAsync("/v1/openai/chat/completions", body)).ExpectAsync(HttpStatusCode.OK);
            Assert.Equal(fromA.GetProperty("choices")[0].GetProperty("message").GetProperty("content").GetString(),
                fromB.GetProperty("choices")[0].GetProperty("message").GetProperty("content").GetString());
        }
        finally
        {
            foreach (var server in servers)
            {
                await server.DisposeAsync();
            }
            await TestBackend.DropPostgresDatabaseAsync(connection);
            Directory.Delete(root, recursive: true);
        }
    }
}
