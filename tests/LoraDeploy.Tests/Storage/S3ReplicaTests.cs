using System.Net;
using LoraDeploy.Auth;
using LoraDeploy.Data;
using LoraDeploy.Tests.Pipeline;
using LoraDeploy.Tests.Simulator;
using LoraDeploy.Workers;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Storage;

/// <summary>Two <c>loradeploy serve</c> processes on one PostgreSQL database and one bucket, with no folder in common.</summary>
public sealed class S3ReplicaTests
{
    [Fact]
    public async Task Two_replicas_with_no_shared_folder_download_once_and_both_serve_the_blob()
    {
        var connectionString = await TestBackend.CreatePostgresDatabaseAsync();
        var root = Path.Combine(Path.GetTempPath(), "loradeploy-tests", Guid.NewGuid().ToString("N"));
        try
        {
            await using var s3 = await S3TestServer.StartAsync();
            await using var simulator = await CivitaiSimulator.StartAsync();
            var content = AdapterFiles.Flux1(seed: 41, rank: 16);
            var version = simulator.AddLora(content, baseModel: "Flux.1 D");
            // Slow enough that the second replica's create lands while the first download is running.
            version.File.Faults.ChunkDelay = TimeSpan.FromMilliseconds(20);
            var settings = PipelineHarness.ServerSettings(simulator);
            // "Once" must not be undone by a lease that lapsed or an attempt that timed out on a loaded machine: both
            // legitimately start the download again, and neither is what this test is about.
            settings["Pipeline:LeaseDuration"] = "00:00:20";
            settings["Import:AttemptTimeout"] = "00:01:00";
            foreach (var (name, value) in s3.Settings(prefix: "shared"))
            {
                settings[name] = value;
            }
            settings["Database:Provider"] = "postgres";
            settings["ConnectionStrings:Postgres"] = connectionString;
            var dirs = new[] { Path.Combine(root, "a"), Path.Combine(root, "b") };
            foreach (var dir in dirs)
            {
                Directory.CreateDirectory(dir);
            }
            var replicas = await Task.WhenAll(dirs.Select(dir => ServerProcess.StartAsync(dir, settings)));
            await using var a = replicas[0];
            await using var b = replicas[1];
            string token, workerToken;
            await using (var db = OpenDatabase(connectionString))
            {
                token = await ApiTokens.CreateForUserAsync(db, "team", isAdmin: false, "test", DateTime.UtcNow, CancellationToken.None);
                workerToken = await WorkerTokens.CreateAsync(db, "gpu-box", DateTime.UtcNow, CancellationToken.None);
            }

            var ids = new List<(ServerProcess Server, string Id)>();
            foreach (var (server, name) in new[] { (a, "on-a"), (b, "on-b") })
            {
                using var client = server.CreateClient(token);
                var created = await (await client.PostJsonAsync("/v1/lora/create", PipelineHarness.CreateBody(name, PipelineHarness.ModelUrl(version))))
                    .ExpectAsync(HttpStatusCode.OK);
                ids.Add((server, created.GetProperty("deploy_id").GetString()!));
            }
            foreach (var (server, id) in ids)
            {
                using var client = server.CreateClient(token);
                await ImportPipelineTests.WaitUntilAsync(async () =>
                {
                    var status = (await (await client.GetAsync($"/deploy/{id}")).ExpectAsync(HttpStatusCode.OK)).GetProperty("status").GetString();
                    Assert.True(status != "failed", $"{id} failed\n{a.Output}\n{b.Output}");
                    return status == "deploying";
                }, seconds: 60);
            }

            Assert.Equal(1, simulator.DownloadsStarted(version.File.Id));
            Assert.Equal([$"shared/sha256/{version.File.Sha256[..2]}/{version.File.Sha256}"], await s3.KeysAsync());
            foreach (var dir in dirs)
            {
                Assert.False(Directory.Exists(Path.Combine(dir, "blobs", "sha256")), $"a blob file in {dir}");
            }
            // Either replica hands a worker the bytes, the one that did not download them included.
            foreach (var server in new[] { a, b })
            {
                using var worker = server.CreateClient(workerToken);
                Assert.Equal(content, await worker.GetByteArrayAsync(string.Format(WorkerProtocol.BlobPathFormat, version.File.Sha256)));
            }
        }
        finally
        {
            await TestBackend.DropPostgresDatabaseAsync(connectionString);
            if (Directory.Exists(root))
            {
                Directory.Delete(root, recursive: true);
            }
        }
    }

    private static PostgresLoraDeployContext OpenDatabase(string connectionString)
    {
        var options = new DbContextOptionsBuilder<PostgresLoraDeployContext>();
        DatabaseExtensions.ConfigurePostgres(options, connectionString);
        return new PostgresLoraDeployContext(options.Options);
    }
}
