using System.Net;
using System.Text.Json;
using LoraDeploy.Data;
using LoraDeploy.Tests.Pipeline;
using LoraDeploy.Tests.Simulator;
using Microsoft.EntityFrameworkCore;
using Npgsql;

namespace LoraDeploy.Tests.Scale;

/// <summary>
/// Several <c>loradeploy serve</c> processes on one PostgreSQL database and one shared blob folder, as a team
/// runs them behind a load balancer: the pipeline stays exactly-once across replicas and survives one dying.
/// </summary>
public sealed class ReplicaTests
{
    [Fact]
    public async Task Fifty_concurrent_creates_over_two_replicas_download_once_and_all_reach_deploying()
    {
        await using var cluster = await Cluster.StartAsync();
        var content = AdapterFiles.Flux1(seed: 11, rank: 16);
        var version = cluster.Simulator.AddLora(content, baseModel: "Flux.1 D");
        // Slow enough that the creates all land while the one download is still running.
        version.File.Faults.ChunkDelay = TimeSpan.FromMilliseconds(20);
        var token = await cluster.CreateTokenAsync("many");
        using var a = cluster.A.CreateClient(token);
        using var b = cluster.B.CreateClient(token);

        var ids = await Task.WhenAll(Enumerable.Range(0, 50).Select(async i =>
        {
            var client = i % 2 == 0 ? a : b;
            var created = await (await client.PostJsonAsync("/v1/lora/create", PipelineHarness.CreateBody($"shared-{i}", PipelineHarness.ModelUrl(version))))
                .ExpectAsync(HttpStatusCode.OK);
            return created.GetProperty("deploy_id").GetString()!;
        }));

        var deploys = await Task.WhenAll(ids.Select((id, i) => WaitSettledAsync(i % 2 == 0 ? b : a, id, cluster)));
        foreach (var deploy in deploys)
        {
            Assert.True(deploy.GetProperty("status").GetString() == "deploying", $"{deploy}\n{cluster.Logs}");
            Assert.Equal(version.File.Sha256, deploy.GetProperty("version").GetString());
        }
        Assert.Equal(1, cluster.Simulator.DownloadsStarted(version.File.Id));
        // CivitAI counts download-endpoint hits against the account's quota: only the one fetch may ask it.
        Assert.Equal(1, cluster.Simulator.DownloadEndpointHits(version.File.Id));
        Assert.Equal([version.File.Sha256], cluster.StoredBlobs());
        await using var db = cluster.OpenDatabase();
        Assert.Equal(1, await db.Downloads.CountAsync());
        Assert.Equal(1, await db.Blobs.CountAsync());
    }

    [Fact]
    public async Task A_replica_killed_mid_download_is_taken_over_by_the_other_after_the_lease_expires()
    {
        await using var cluster = await Cluster.StartAsync();
        var content = AdapterFiles.Flux1(seed: 12, rank: 32);
        var version = cluster.Simulator.AddLora(content, baseModel: "Flux.1 D");
        version.File.Faults.ChunkDelay = TimeSpan.FromMilliseconds(40);
        var token = await cluster.CreateTokenAsync("crash");
        using var a = cluster.A.CreateClient(token);

        var created = await (await a.PostJsonAsync("/v1/lora/create", PipelineHarness.CreateBody("survivor", PipelineHarness.ModelUrl(version))))
            .ExpectAsync(HttpStatusCode.OK);
        var deployId = created.GetProperty("deploy_id").GetString()!;

        // Whichever replica claimed the download is the one to kill, once a good part of the file is staged.
        string? owner = null;
        await ImportPipelineTests.WaitUntilAsync(async () =>
        {
            await using var db = cluster.OpenDatabase();
            var download = await db.Downloads.Select(d => new { d.LeaseOwner, d.Status }).FirstOrDefaultAsync();
            owner = download?.Status == DownloadStatus.Downloading ? download.LeaseOwner : null;
            return owner is not null && cluster.StagedBytes() > content.Length / 3;
        });
        var (victim, survivor) = owner!.Contains($":{cluster.A.ProcessId}:", StringComparison.Ordinal)
            ? (cluster.A, cluster.B)
            : (cluster.B, cluster.A);
        Assert.Contains($":{victim.ProcessId}:", owner, StringComparison.Ordinal);
        await victim.KillAsync();
        var stagedAtKill = cluster.StagedBytes();
        Assert.True(stagedAtKill < content.Length, "the download finished before the kill; slow it down");
        Assert.Empty(cluster.StoredBlobs());
        version.File.Faults.ChunkDelay = TimeSpan.Zero;

        using var client = survivor.CreateClient(token);
        var deploy = await WaitSettledAsync(client, deployId, cluster);
        Assert.True(deploy.GetProperty("status").GetString() == "deploying", $"{deploy}\n{cluster.Logs}");
        Assert.Equal(version.File.Sha256, deploy.GetProperty("version").GetString());

        // The survivor resumed the dead replica's staging file: one from-zero fetch, one blob, no leftovers.
        Assert.Contains(cluster.Simulator.RangeRequests, r => r.FileId == version.File.Id && r.Offset > 0);
        var fromZero = cluster.Simulator.DownloadsStarted(version.File.Id)
            - cluster.Simulator.RangeRequests.Count(r => r.FileId == version.File.Id && r.Offset > 0);
        Assert.Equal(1, fromZero);
        Assert.Equal([version.File.Sha256], cluster.StoredBlobs());
        Assert.Empty(Directory.GetFiles(Path.Combine(cluster.StoragePath, "staging")));
        await using var check = cluster.OpenDatabase();
        var row = await check.Downloads.SingleAsync();
        Assert.Equal(DownloadStatus.Done, row.Status);
        // The download row records which replica finished the fetch (the lease is cleared when it ends).
        Assert.NotNull(row.FetchedBy);
        Assert.Contains($":{survivor.ProcessId}:", row.FetchedBy, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Two_replicas_starting_at_once_on_an_empty_database_apply_the_migrations_once()
    {
        await using var cluster = await Cluster.StartAsync();
        foreach (var server in new[] { cluster.A, cluster.B })
        {
            using var client = server.CreateClient();
            Assert.Equal(HttpStatusCode.OK, (await client.GetAsync("/ready")).StatusCode);
        }

        await using var db = cluster.OpenDatabase();
        var applied = new List<string>();
        await using (var connection = new NpgsqlConnection(cluster.ConnectionString))
        {
            await connection.OpenAsync();
            await using var command = new NpgsqlCommand("SELECT \"MigrationId\" FROM \"__EFMigrationsHistory\"", connection);
            await using var reader = await command.ExecuteReaderAsync();
            while (await reader.ReadAsync())
            {
                applied.Add(reader.GetString(0));
            }
        }
        var known = db.Database.GetMigrations().ToList();
        Assert.NotEmpty(known);
        Assert.Equal(known.Order(), applied.Order());
        // Exactly one admin was bootstrapped although both replicas found the database empty.
        Assert.Equal(1, await db.Users.CountAsync(u => u.Name == "admin"));
    }

    private static async Task<JsonElement> WaitSettledAsync(HttpClient client, string deployId, Cluster cluster)
    {
        var deadline = DateTime.UtcNow.AddSeconds(90);
        while (true)
        {
            var deploy = await (await client.GetAsync($"/deploy/{deployId}")).ExpectAsync(HttpStatusCode.OK);
            if (deploy.GetProperty("status").GetString() is not ("initializing" or "downloading"))
            {
                return deploy;
            }
            if (DateTime.UtcNow > deadline)
            {
                Assert.Fail($"Deploy {deployId} still not settled: {deploy}\n{cluster.Logs}");
            }
            await Task.Delay(100);
        }
    }

    /// <summary>A CivitAI simulator and two replicas on a throwaway PostgreSQL database with one shared blob folder.</summary>
    private sealed class Cluster : IAsyncDisposable
    {
        private readonly PostgresReplicas _replicas;

        private Cluster(CivitaiSimulator simulator, PostgresReplicas replicas)
        {
            Simulator = simulator;
            _replicas = replicas;
        }

        public CivitaiSimulator Simulator { get; }
        public ServerProcess A => _replicas.A;
        public ServerProcess B => _replicas.B;
        public string ConnectionString => _replicas.ConnectionString;
        public string StoragePath => _replicas.StoragePath;
        public string Logs => _replicas.Logs;

        public static async Task<Cluster> StartAsync()
        {
            var simulator = await CivitaiSimulator.StartAsync();
            try
            {
                var settings = PipelineHarness.ServerSettings(simulator);
                settings["Pipeline:Enabled"] = "true";
                settings["Logging:LogLevel:Default"] = "Information"; // the logs go into failure messages
                return new Cluster(simulator, await PostgresReplicas.StartAsync(settings));
            }
            catch
            {
                await simulator.DisposeAsync();
                throw;
            }
        }

        public PostgresLoraDeployContext OpenDatabase() => _replicas.OpenDatabase();

        public Task<string> CreateTokenAsync(string user) => _replicas.CreateTokenAsync(user);

        public long StagedBytes()
        {
            var staging = Path.Combine(StoragePath, "staging");
            return Directory.Exists(staging) ? Directory.GetFiles(staging).Sum(f => new FileInfo(f).Length) : 0;
        }

        public IReadOnlyList<string> StoredBlobs()
        {
            var folder = Path.Combine(StoragePath, "sha256");
            return Directory.Exists(folder)
                ? Directory.GetFiles(folder, "*", SearchOption.AllDirectories).Select(f => Path.GetFileName(f)).ToList()
                : [];
        }

        public async ValueTask DisposeAsync()
        {
            await _replicas.DisposeAsync();
            await Simulator.DisposeAsync();
        }
    }
}
