using System.Net;
using LoraDeploy.Auth;
using LoraDeploy.Data;
using LoraDeploy.Tests.Simulator;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Pipeline;

/// <summary>A server killed mid-download resumes from its staging file after a restart, with one copy of the bytes.</summary>
public sealed class CrashRecoveryTests
{
    [Fact]
    public async Task A_server_killed_mid_download_resumes_with_range_after_restart()
    {
        await using var simulator = await CivitaiSimulator.StartAsync();
        var content = AdapterFiles.Flux1(seed: 7, rank: 32);
        var version = simulator.AddLora(content, baseModel: "Flux.1 D");
        // About 5 s for the whole file: seconds to notice a third of it staged and kill the server, even on a busy machine.
        version.File.Faults.ChunkDelay = TimeSpan.FromMilliseconds(100);

        var dataDir = Path.Combine(Path.GetTempPath(), "loradeploy-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dataDir);
        var settings = PipelineHarness.ServerSettings(simulator);
        var token = await CreateTokenAsync(dataDir, "crash");

        string deployId;
        long bytesBeforeKill;
        await using (var first = await ServerProcess.StartAsync(dataDir, settings))
        {
            using var client = first.CreateClient(token);
            var created = await (await client.PostJsonAsync("/v1/lora/create", PipelineHarness.CreateBody("survivor", PipelineHarness.ModelUrl(version))))
                .ExpectAsync(HttpStatusCode.OK);
            deployId = created.GetProperty("deploy_id").GetString()!;

            // Wait until a good part of the file is in the staging folder, then pull the plug.
            var staging = Path.Combine(dataDir, "blobs", "staging");
            await ImportPipelineTests.WaitUntilAsync(() => Task.FromResult(
                Directory.Exists(staging) && Directory.GetFiles(staging).Sum(f => new FileInfo(f).Length) > content.Length / 3));
            await first.KillAsync();
            bytesBeforeKill = Directory.GetFiles(staging).Sum(f => new FileInfo(f).Length);
        }
        Assert.True(bytesBeforeKill < content.Length, "the download finished before the kill; slow it down");
        Assert.False(Directory.Exists(Path.Combine(dataDir, "blobs", "sha256")), "no blob may exist before the bytes are complete");

        version.File.Faults.ChunkDelay = TimeSpan.Zero;
        await using (var second = await ServerProcess.StartAsync(dataDir, settings))
        {
            using var client = second.CreateClient(token);
            var deadline = DateTime.UtcNow.AddSeconds(60);
            string status;
            System.Text.Json.JsonElement deploy;
            do
            {
                await Task.Delay(100);
                deploy = await (await client.GetAsync($"/deploy/{deployId}")).ExpectAsync(HttpStatusCode.OK);
                status = deploy.GetProperty("status").GetString()!;
            }
            while (status is "initializing" or "downloading" && DateTime.UtcNow < deadline);

            Assert.True(status == "deploying", $"{deploy}\n{second.Output}");
            Assert.Equal(version.File.Sha256, deploy.GetProperty("version").GetString());
        }

        // Resumed where the dead process stopped, never a second copy: one blob, the staging folder empty.
        Assert.Contains(simulator.RangeRequests, r => r.FileId == version.File.Id && r.Offset > 0);
        var fromZero = simulator.DownloadsStarted(version.File.Id) - simulator.RangeRequests.Count(r => r.FileId == version.File.Id && r.Offset > 0);
        Assert.Equal(1, fromZero);
        var blobs = Directory.GetFiles(Path.Combine(dataDir, "blobs", "sha256"), "*", SearchOption.AllDirectories);
        Assert.Equal([version.File.Sha256], blobs.Select(Path.GetFileName));
        Assert.Empty(Directory.GetFiles(Path.Combine(dataDir, "blobs", "staging")));
    }

    private static async Task<string> CreateTokenAsync(string dataDir, string user)
    {
        var options = new DbContextOptionsBuilder<SqliteLoraDeployContext>();
        Data.DatabaseExtensions.ConfigureSqlite(options, $"Data Source={Path.Combine(dataDir, "loradeploy.db")}");
        await using var db = new SqliteLoraDeployContext(options.Options);
        await db.Database.MigrateAsync();
        return await ApiTokens.CreateForUserAsync(db, user, isAdmin: false, "test", DateTime.UtcNow, CancellationToken.None);
    }
}
