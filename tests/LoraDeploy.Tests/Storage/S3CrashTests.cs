using System.Net;
using LoraDeploy.Auth;
using LoraDeploy.Data;
using LoraDeploy.Tests.Pipeline;
using LoraDeploy.Tests.Simulator;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Storage;

/// <summary>A server killed while it uploads a blob to S3: nothing visible, no row, and a restart finishes the import.</summary>
public sealed class S3CrashTests
{
    [Fact]
    public async Task A_server_killed_mid_upload_leaves_no_object_and_no_row_and_a_restart_stores_it()
    {
        await using var s3 = await S3TestServer.StartAsync();
        await using var proxy = new StallingProxy(s3.Endpoint);
        await using var simulator = await CivitaiSimulator.StartAsync();
        var content = AdapterFiles.Flux1(seed: 31, rank: 96); // ~10 MB: two 5 MiB parts
        var version = simulator.AddLora(content, baseModel: "Flux.1 D");

        var dataDir = Path.Combine(Path.GetTempPath(), "loradeploy-tests", Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dataDir);
        var settings = PipelineHarness.ServerSettings(simulator);
        foreach (var (name, value) in s3.Settings(prefix: "crash"))
        {
            settings[name] = value;
        }
        settings["Storage:S3:Endpoint"] = proxy.Url.ToString();
        settings["Storage:S3:PartSizeMiB"] = "5";
        // One part at a time: the proxy counts bytes over all connections, so with parts in parallel its first 6 MiB
        // could be pieces of both and part 1 never finish (CI once waited for it in vain).
        settings["Storage:S3:PartsInFlight"] = "1";
        var token = await CreateTokenAsync(dataDir, "crash");
        var key = $"crash/sha256/{version.File.Sha256[..2]}/{version.File.Sha256}";

        // Let the first part through and a little of the second, then hold the rest and pull the plug.
        proxy.StallAfter = 6 * 1024 * 1024;
        string deployId;
        await using (var first = await ServerProcess.StartAsync(dataDir, settings))
        {
            using var client = first.CreateClient(token);
            var created = await (await client.PostJsonAsync("/v1/lora/create", PipelineHarness.CreateBody("survivor", PipelineHarness.ModelUrl(version))))
                .ExpectAsync(HttpStatusCode.OK);
            deployId = created.GetProperty("deploy_id").GetString()!;
            await ImportPipelineTests.WaitUntilAsync(() => Task.FromResult(proxy.Stalled));
            await ImportPipelineTests.WaitUntilAsync(() => Task.FromResult(
                Directory.EnumerateFiles(s3.Directory, "1.md5", SearchOption.AllDirectories).Any()));
            await first.KillAsync();
        }

        Assert.Empty(await s3.KeysAsync()); // a part is on the server, the object is not
        await using (var db = OpenDatabase(dataDir))
        {
            Assert.Equal(0, await db.Blobs.CountAsync());
            Assert.DoesNotContain(await db.Downloads.Select(d => d.Status).ToListAsync(), s => s == DownloadStatus.Done);
        }

        proxy.StallAfter = long.MaxValue;
        await using (var second = await ServerProcess.StartAsync(dataDir, settings))
        {
            using var client = second.CreateClient(token);
            var deadline = DateTime.UtcNow.AddSeconds(60);
            System.Text.Json.JsonElement deploy;
            string status;
            do
            {
                await Task.Delay(100);
                deploy = await (await client.GetAsync($"/deploy/{deployId}")).ExpectAsync(HttpStatusCode.OK);
                status = deploy.GetProperty("status").GetString()!;
            }
            while (status is "initializing" or "downloading" && DateTime.UtcNow < deadline);
            Assert.True(status == "deploying", $"{deploy}\n{second.Output}");
        }

        Assert.Equal([key], await s3.KeysAsync());
        await using (var db = OpenDatabase(dataDir))
        {
            Assert.Equal([version.File.Sha256], await db.Blobs.Select(b => b.Sha256).ToListAsync());
        }
        Directory.Delete(dataDir, recursive: true);
    }

    private static SqliteLoraDeployContext OpenDatabase(string dataDir)
    {
        var options = new DbContextOptionsBuilder<SqliteLoraDeployContext>();
        DatabaseExtensions.ConfigureSqlite(options, $"Data Source={Path.Combine(dataDir, "loradeploy.db")};Pooling=False");
        return new SqliteLoraDeployContext(options.Options);
    }

    private static async Task<string> CreateTokenAsync(string dataDir, string user)
    {
        await using var db = OpenDatabase(dataDir);
        await db.Database.MigrateAsync();
        return await ApiTokens.CreateForUserAsync(db, user, isAdmin: false, "test", DateTime.UtcNow, CancellationToken.None);
    }
}
