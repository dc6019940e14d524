using System.Net;
using System.Text.Json;
using LoraDeploy.Data;
using LoraDeploy.Tests.Simulator;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Exports;

/// <summary>The runner's housekeeping and base kinds, each on a server of its own (SQLite).</summary>
public sealed class ExportRunnerTests : IAsyncLifetime
{
    private const string LlamaPool = "test/llama-pool";
    private readonly string _dir = Directory.CreateTempSubdirectory("export-runner-").FullName;
    private CivitaiSimulator _simulator = null!;

    public async ValueTask InitializeAsync()
    {
        _simulator = await CivitaiSimulator.StartAsync();
        ExportTestFiles.WriteSdxlBase(Path.Combine(_dir, "base.safetensors"), seed: 5);
        ExportTestFiles.WriteSdxlBase(Path.Combine(_dir, "other.safetensors"), seed: 6, toQWidth: 320);
        ExportTestFiles.WriteSdxlBase(Path.Combine(_dir, "large.safetensors"), seed: 7, fillerTensors: 48);
    }

    public async ValueTask DisposeAsync()
    {
        await _simulator.DisposeAsync();
        Directory.Delete(_dir, recursive: true);
    }

    private async Task<LoraDeployServer> StartAsync(Dictionary<string, string?> extra)
    {
        var settings = ExportFixture.Settings(_simulator, Path.Combine(_dir, "base.safetensors"), Path.Combine(_dir, "other.safetensors"));
        foreach (var (key, value) in extra)
        {
            settings[key] = value;
        }
        return await LoraDeployServer.StartAsync(TestDatabase.Sqlite, settings);
    }

    private async Task<TestUser> UserWithLoraAsync(LoraDeployServer server, string name)
    {
        var version = _simulator.AddLora(ExportTestFiles.SdxlAdapter(seed: 3), fileName: "runner.safetensors");
        var user = await server.CreateUserAsync("runner");
        var created = await (await user.Client.PostJsonAsync("/v1/lora/create", Pipeline.PipelineHarness.CreateBody(name, Pipeline.PipelineHarness.ModelUrl(version), ExportFixture.WithWeights)))
            .ExpectAsync(HttpStatusCode.OK);
        var deployId = created.GetProperty("deploy_id").GetString()!;
        var deadline = DateTime.UtcNow.AddSeconds(60);
        while ((await (await user.Client.GetAsync($"/deploy/{deployId}")).ExpectAsync(HttpStatusCode.OK)).GetProperty("status").GetString() != "deploying")
        {
            Assert.True(DateTime.UtcNow < deadline, "import did not finish");
            await Task.Delay(50);
        }
        return user;
    }

    /// <summary>Starts a bf16 export on the 250 MB base (every tensor converted: slow enough to catch) and waits until its progress is written.</summary>
    private static async Task<(string Id, JsonElement Running)> StartLargeExportAsync(TestUser user, string loraName)
    {
        var id = (await (await user.Client.PostJsonAsync($"/v1/lora/{loraName}/export", new { dtype = "bf16" })).ExpectAsync(HttpStatusCode.Accepted))
            .GetProperty("export_id").GetString()!;
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (true)
        {
            var export = await (await user.Client.GetAsync($"/v1/lora/{loraName}/export/{id}")).ExpectAsync(HttpStatusCode.OK);
            Assert.True(export.GetProperty("status").GetString() is "queued" or "running", $"the merge ended before it could be caught running; make the base larger: {export}");
            if (export.GetProperty("bytes_done").GetInt64() > 0)
            {
                return (id, export);
            }
            Assert.True(DateTime.UtcNow < deadline, $"no progress written: {export}");
            await Task.Delay(20);
        }
    }

    private Task<LoraDeployServer> StartLargeAsync() => StartAsync(new() { [$"BaseModels:{ExportFixture.WithWeights}:Weights"] = Path.Combine(_dir, "large.safetensors") });

    [Fact]
    public async Task A_running_merge_shows_its_progress_and_stops_when_its_export_is_deleted()
    {
        await using var server = await StartLargeAsync();
        var user = await UserWithLoraAsync(server, "cancelled");
        var (id, running) = await StartLargeExportAsync(user, "cancelled");
        Assert.Equal("running", running.GetProperty("status").GetString());
        Assert.InRange(running.GetProperty("bytes_done").GetInt64(), 1, running.GetProperty("bytes_total").GetInt64() - 1);
        Assert.InRange(running.GetProperty("progress_percent").GetDouble(), 0.1, 99.9);
        Assert.Equal(64, running.GetProperty("tensors_total").GetInt32());

        await (await user.Client.DeleteAsync($"/v1/lora/cancelled/export/{id}")).ExpectAsync(HttpStatusCode.OK);
        var exports = Path.Combine(server.DataDir, "exports");
        var deadline = DateTime.UtcNow.AddSeconds(10);
        while (Directory.GetFileSystemEntries(exports, $"{id}*").Length > 0)
        {
            Assert.True(DateTime.UtcNow < deadline, "the merge went on writing after its export was deleted: " + string.Join(", ", Directory.GetFileSystemEntries(exports)));
            await Task.Delay(100);
        }
        Assert.False(await server.QueryAsync(db => db.ExportJobs.AnyAsync(j => j.Id == id)));

        // The merge stopped rather than ran on into the void: the runner's one slot is free for the next export at
        // once (within a progress interval), long before the deleted merge would have ended.
        // Freed = the next export is claimed (running), not its first progress write, which waits a progress interval.
        var deleted = DateTime.UtcNow;
        var next = (await (await user.Client.PostJsonAsync("/v1/lora/cancelled/export", new { dtype = "bf16" })).ExpectAsync(HttpStatusCode.Accepted))
            .GetProperty("export_id").GetString()!;
        while ((await (await user.Client.GetAsync($"/v1/lora/cancelled/export/{next}")).ExpectAsync(HttpStatusCode.OK)).GetProperty("status").GetString() == "queued")
        {
            Assert.True(DateTime.UtcNow - deleted < TimeSpan.FromSeconds(30), "the next export was never claimed");
            await Task.Delay(20);
        }
        var freedAfter = DateTime.UtcNow - deleted;
        var (finished, _) = await ExportTestFiles.WaitAsync(user.Client, "cancelled", next, TimeSpan.FromSeconds(120));
        var fullMerge = DateTime.UtcNow - deleted;
        Assert.True(freedAfter < TimeSpan.FromSeconds(4) && freedAfter * 2 < fullMerge,
            $"the next export started {freedAfter.TotalSeconds:F1} s after the delete; a whole merge took {fullMerge.TotalSeconds:F1} s");
        Assert.Equal("done", finished.GetProperty("status").GetString());
    }

    [Fact]
    public async Task A_merge_interrupted_by_a_restart_goes_back_to_the_queue_uncounted_and_finishes_after_it()
    {
        await using var server = await StartLargeAsync();
        var user = await UserWithLoraAsync(server, "restarted");
        var (id, _) = await StartLargeExportAsync(user, "restarted");

        await server.RestartAsync();
        using var client = server.CreateClient(user.Token);
        var (export, _) = await ExportTestFiles.WaitAsync(client, "restarted", id, TimeSpan.FromSeconds(120));
        Assert.True(export.GetProperty("status").GetString() == "done", export.ToString());
        Assert.Equal(1, await server.QueryAsync(db => db.ExportJobs.Where(j => j.Id == id).Select(j => j.Attempts).SingleAsync()));
        Assert.Equal([$"{id}.1.safetensors"], Directory.GetFileSystemEntries(Path.Combine(server.DataDir, "exports"), $"{id}*").Select(Path.GetFileName));
        var file = Path.Combine(server.DataDir, "exports", $"{id}.1.safetensors");
        Assert.Equal(export.GetProperty("sha256").GetString(), await LoraDeploy.Exports.ExportFiles.Sha256Async(file, CancellationToken.None));
    }

    [Fact]
    public async Task A_finished_export_is_deleted_file_and_row_after_the_retention()
    {
        await using var server = await StartAsync(new() { ["Exports:RetentionHours"] = "0.001" }); // 3.6 s
        var user = await UserWithLoraAsync(server, "fleeting");
        var id = (await (await user.Client.PostAsync("/v1/lora/fleeting/export", null)).ExpectAsync(HttpStatusCode.Accepted)).GetProperty("export_id").GetString()!;
        var (export, _) = await ExportTestFiles.WaitAsync(user.Client, "fleeting", id);
        Assert.True(export.GetProperty("status").GetString() == "done", export.ToString());
        var finished = DateTimeOffset.Parse(export.GetProperty("finished_at").GetString()!, System.Globalization.CultureInfo.InvariantCulture);
        var expires = DateTimeOffset.Parse(export.GetProperty("expires_at").GetString()!, System.Globalization.CultureInfo.InvariantCulture);
        Assert.InRange((expires - finished).TotalSeconds, 2, 5);
        var file = Path.Combine(server.DataDir, "exports", $"{id}.1.safetensors");
        Assert.True(File.Exists(file));

        var deadline = DateTime.UtcNow.AddSeconds(20);
        while (await server.QueryAsync(db => db.ExportJobs.AnyAsync(j => j.Id == id)))
        {
            Assert.True(DateTime.UtcNow < deadline, "the expired export's row is still there");
            await Task.Delay(100);
        }
        Assert.False(File.Exists(file));
        await (await user.Client.GetAsync($"/v1/lora/fleeting/export/{id}")).ExpectErrorAsync(HttpStatusCode.NotFound);
    }

    [Fact]
    public async Task An_image_lora_exported_onto_a_gguf_base_fails_with_the_merges_reason_and_leaves_no_file()
    {
        var gguf = new LoraDeploy.Lora.Tests.Support.TinyLlama().Generate().WriteGguf(Path.Combine(_dir, "llama.gguf"));
        await using var server = await StartAsync(new()
        {
            [$"BaseModels:{LlamaPool}:Family"] = "llama",
            [$"BaseModels:{LlamaPool}:Engine"] = "llamacpp",
            [$"BaseModels:{LlamaPool}:Gguf"] = gguf,
            ["Workers:Embedded"] = "false",
        });
        var user = await UserWithLoraAsync(server, "llm");
        var lora = await server.QueryAsync(db => db.Loras.Where(l => l.Name == "llm" && l.User!.Name == user.Name)
            .Select(l => new { l.Id, l.UserId, l.AdapterSha256, DeployId = db.Deploys.Where(d => d.LoraId == l.Id).Select(d => d.Id).First() }).FirstAsync());
        // A job for the SDXL adapter on the llama pool, as no endpoint would make it: the merge itself refuses.
        await server.QueryAsync(async db =>
        {
            db.ExportJobs.Add(new ExportJob
            {
                Id = "ggufexport1",
                UserId = lora.UserId,
                LoraId = lora.Id,
                DeployId = lora.DeployId,
                AdapterSha256 = lora.AdapterSha256!,
                BaseModel = LlamaPool,
                Format = "gguf",
                Dtype = "base",
                CreatedAt = DateTime.UtcNow,
            });
            return await db.SaveChangesAsync();
        });

        var (export, _) = await ExportTestFiles.WaitAsync(user.Client, "llm", "ggufexport1");
        Assert.True(export.GetProperty("status").GetString() == "failed", export.ToString());
        Assert.StartsWith("The merge was refused: cannot merge: 3 adapter module(s) match no tensor of llama.gguf (llama): runner.safetensors: lora_unet_", export.GetProperty("fail_reason").GetString());
        Assert.Empty(Directory.GetFileSystemEntries(Path.Combine(server.DataDir, "exports"), "ggufexport1*"));
    }
}
