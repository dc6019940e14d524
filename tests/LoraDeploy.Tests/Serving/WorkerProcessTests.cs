using System.Net;
using System.Text.Json;
using LoraDeploy.Auth;
using LoraDeploy.Data;
using LoraDeploy.Lora.Tests.Support;
using LoraDeploy.Tests.Simulator;
using LoraDeploy.Tests.Workers;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Serving;

/// <summary>
/// Two real <c>loradeploy worker</c> processes with the llama.cpp engine on one pool: placement, affinity, and a
/// worker killed with SIGKILL — out of routing within Workers:TimeoutSeconds, its deploy placed on the survivor, which
/// answers exactly as the dead one did.
/// </summary>
public sealed class WorkerProcessTests : IAsyncLifetime
{
    private const string Pool = LoraModelImportTests.Pool;
    private readonly string _dir = Directory.CreateTempSubdirectory("worker-procs-").FullName;
    private readonly List<ServerProcess> _workers = [];
    private HuggingFaceSimulator _hub = null!;
    private LoraDeployServer _server = null!;
    private TestUser _user = null!;
    private TinyLlama _model = null!;
    private string _gguf = "";

    public async ValueTask InitializeAsync()
    {
        _hub = await HuggingFaceSimulator.StartAsync();
        _model = new TinyLlama().Generate();
        _gguf = _model.WriteGguf(Path.Combine(_dir, "tiny.gguf"));
        var settings = LoraModelImportTests.LlmPoolSettings(_hub, _gguf);
        settings["Workers:TimeoutSeconds"] = "3";
        settings["Workers:HeartbeatSeconds"] = "1";
        _server = await LoraDeployServer.StartAsync(TestDatabase.Sqlite, settings);
        _user = await _server.CreateUserAsync("llm");
    }

    public async ValueTask DisposeAsync()
    {
        foreach (var worker in _workers)
        {
            await worker.DisposeAsync();
        }
        await _server.DisposeAsync();
        await _hub.DisposeAsync();
        Directory.Delete(_dir, recursive: true);
    }

    private async Task<ServerProcess> WorkerAsync(string id)
    {
        var token = await _server.QueryAsync(db => WorkerTokens.CreateAsync(db, id, DateTime.UtcNow, CancellationToken.None));
        var dataDir = Directory.CreateDirectory(Path.Combine(_dir, id)).FullName;
        var worker = await ServerProcess.StartWorkerAsync(dataDir, _server.BaseUrl, token, new Dictionary<string, string?>
        {
            [$"BaseModels:{Pool}:Family"] = "llama",
            [$"BaseModels:{Pool}:Engine"] = "llamacpp",
            [$"BaseModels:{Pool}:Gguf"] = _gguf,
            [$"BaseModels:{Pool}:Defaults:context_size"] = "256",
            [$"BaseModels:{Pool}:Defaults:threads"] = "1",
            ["Worker:Id"] = id,
        });
        _workers.Add(worker);
        return worker;
    }

    private async Task<JsonElement> DeployAsync(string deployId, Func<JsonElement, bool> until, string what, TimeSpan? timeout = null)
    {
        var deadline = DateTime.UtcNow + (timeout ?? TimeSpan.FromSeconds(60));
        while (true)
        {
            var deploy = await (await _user.Client.GetAsync($"/deploy/{deployId}")).ExpectAsync(HttpStatusCode.OK);
            Assert.NotEqual("failed", deploy.GetProperty("status").GetString());
            if (until(deploy))
            {
                return deploy;
            }
            Assert.True(DateTime.UtcNow < deadline, $"never {what}: {deploy}");
            await Task.Delay(100);
        }
    }

    private async Task<string> ChatAsync(string model) =>
        (await (await _user.Client.PostJsonAsync("/v1/chat/completions", new
        {
            model,
            messages = new[] { new { role = "user", content = "hello world" } },
            max_tokens = 6,
            temperature = 0,
        })).ExpectAsync(HttpStatusCode.OK)).GetProperty("choices")[0].GetProperty("message").GetProperty("content").GetString()!;

    private Task<List<string>> HoldersAsync(string deployId) =>
        _server.QueryAsync(db => db.Instances.Where(i => i.DeployId == deployId).Select(i => i.WorkerId).ToListAsync());

    [Fact]
    public async Task Two_worker_processes_share_a_pool_and_a_killed_one_is_replaced_by_the_other()
    {
        var a = await WorkerAsync("proc-a");
        var b = await WorkerAsync("proc-b");
        var workers = new Dictionary<string, ServerProcess> { ["proc-a"] = a, ["proc-b"] = b };

        var fixture = new PeftAdapterFixture { Seed = 11, Std = 1.5f };
        _hub.AddAdapter("alice/procs", fixture.Generate(_model).Safetensors().ToBytes(), config: fixture.ConfigJson());
        var created = await (await _user.Client.PostJsonAsync("/lora-model",
            new { hf_model_name = "alice/procs", lora_model_name = "procs", base_model_name = Pool })).ExpectAsync(HttpStatusCode.OK);
        var id = created.GetProperty("deploy_id").GetString()!;
        await DeployAsync(id, d => d.GetProperty("status").GetString() == "running", "ran");

        var holder = Assert.Single(await HoldersAsync(id));
        var other = holder == "proc-a" ? "proc-b" : "proc-a";
        var answer = await ChatAsync($"{_user.Name}/procs");
        for (var i = 0; i < 4; i++)
        {
            Assert.Equal(answer, await ChatAsync($"{_user.Name}/procs"));
        }
        // Affinity: every request went to the holder; the other worker never loaded the adapter.
        var sha = await _server.QueryAsync(db => db.Loras.Where(l => l.Name == "procs").Select(l => l.AdapterSha256!).SingleAsync());
        var resident = await _server.QueryAsync(db => db.Workers.Where(w => w.Id == other).Select(w => w.ResidentJson).SingleAsync());
        Assert.DoesNotContain(sha, resident);

        await workers[holder].KillAsync();
        var killedAt = DateTime.UtcNow;
        // The survivor's copy ready first, then the deploy read after it: a status read before the re-placement still
        // says "running" from the killed holder's copy (CI once saw that, then 423 "deploying" from the next request).
        await Eventually.TrueAsync(() => _server.QueryAsync(db => db.Instances.AnyAsync(i => i.DeployId == id && i.WorkerId == other && i.State == InstanceState.Ready)),
            "moved to the surviving worker");
        await DeployAsync(id, d => d.GetProperty("status").GetString() == "running", "ran again", TimeSpan.FromSeconds(30));
        Assert.True(DateTime.UtcNow - killedAt < TimeSpan.FromSeconds(15), "re-placed within seconds");
        Assert.Equal([other], await HoldersAsync(id));
        Assert.Equal(answer, await ChatAsync($"{_user.Name}/procs"));
    }
}
