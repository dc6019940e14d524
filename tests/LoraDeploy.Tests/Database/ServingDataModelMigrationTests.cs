using LoraDeploy.Data;
using Microsoft.EntityFrameworkCore;
using Microsoft.EntityFrameworkCore.Infrastructure;
using Microsoft.EntityFrameworkCore.Migrations;

namespace LoraDeploy.Tests.Database;

/// <summary>
/// The migration that split the deploy row (import job, adapter, instances) keeps every existing row's meaning: probed
/// files become shared adapters, each deploy gets the import job its status implies, an import under way keeps its
/// lease and download.
/// </summary>
public sealed class ServingDataModelMigrationTests : IDisposable
{
    /// <summary>The migration before the split (each provider names its own by timestamp).</summary>
    private const string Before = "DownloadDeadlineAndFetcher";
    private readonly string _dir = Directory.CreateTempSubdirectory("migration-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public async Task Sqlite_rows_survive_the_split() =>
        await RunAsync(() =>
        {
            var builder = new DbContextOptionsBuilder<SqliteLoraDeployContext>();
            DatabaseExtensions.ConfigureSqlite(builder, $"Data Source={Path.Combine(_dir, "old.db")};Pooling=false");
            return new SqliteLoraDeployContext(builder.Options);
        }, postgres: false);

    [Fact]
    public async Task Postgres_rows_survive_the_split()
    {
        var connection = await TestBackend.CreatePostgresDatabaseAsync();
        try
        {
            await RunAsync(() =>
            {
                var builder = new DbContextOptionsBuilder<PostgresLoraDeployContext>();
                DatabaseExtensions.ConfigurePostgres(builder, connection);
                return new PostgresLoraDeployContext(builder.Options);
            }, postgres: true);
        }
        finally
        {
            await TestBackend.DropPostgresDatabaseAsync(connection);
        }
    }

    private static async Task RunAsync(Func<LoraDeployDbContext> open, bool postgres)
    {
        await using (var db = open())
        {
            var before = db.Database.GetMigrations().Single(m => m.EndsWith("_" + Before, StringComparison.Ordinal));
            await db.GetService<IMigrator>().MigrateAsync(before);
            var t = postgres ? "true" : "1";
            var f = postgres ? "false" : "0";
            // Doubled braces: raw SQL goes through string.Format.
            const string probe = """{{"format": "kohya", "network": "lora", "architecture": "flux1", "rank_min": 4, "rank_max": 8, "alpha": 2.5}}""";
            const string sha = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            string[] statements =
            [
                """INSERT INTO users ("Id", "Name", "IsAdmin", "CreatedAt") VALUES (1, 'old', """ + t + """, '2026-01-01 00:00:00')""",
                """INSERT INTO downloads ("Id", "SourceKey", "Status", "CivitaiVersionId", "CivitaiFileId", "BytesDone", "FailReason", "FailClass", "LeaseOwner", "LeaseExpiresAt", "Attempts", "CreatedAt", "UpdatedAt") VALUES (7, 'sha256:b', 'downloading', 1, 2, 10, '', '', 'replica-a', '2026-01-01 00:05:00', 1, '2026-01-01 00:00:00', '2026-01-01 00:00:00')""",
                // Two LoRAs of one probed file (shared), one downloading, one queued, one failed.
                Lora(1, "one", "d1", sha, probe, f), Lora(2, "two", "d2", sha, probe, f), Lora(3, "three", "d3", null, null, f),
                Lora(4, "four", "d4", null, null, f), Lora(5, "five", "d5", null, null, f),
                Deploy("d1", 1, "deploying", null, null), Deploy("d2", 2, "running", null, null),
                Deploy("d3", 3, "downloading", 7, "'replica-a'"), Deploy("d4", 4, "initializing", null, null), Deploy("d5", 5, "failed", null, null),
            ];
            foreach (var statement in statements)
            {
                await db.Database.ExecuteSqlRawAsync(statement);
            }
        }

        await using (var db = open())
        {
            await db.Database.MigrateAsync();

            var adapter = await db.Adapters.SingleAsync();
            Assert.Equal(("flux1", "lora", "kohya", 4, 8, 2.5), (adapter.Architecture, adapter.Network, adapter.Format, adapter.RankMin, adapter.RankMax, adapter.Alpha));
            Assert.Equal("civitai:file:11", adapter.SourceRef);
            Assert.Equal(2, await db.Loras.CountAsync(l => l.AdapterSha256 == adapter.Sha256));

            var jobs = await db.ImportJobs.OrderBy(j => j.DeployId).ToDictionaryAsync(j => j.DeployId);
            Assert.Equal(["d1", "d2", "d3", "d4", "d5"], jobs.Keys);
            Assert.Equal(ImportJobStatus.Done, jobs["d1"].Status);
            Assert.Equal(ImportJobStatus.Done, jobs["d2"].Status);
            Assert.Equal((ImportJobStatus.Importing, 7L, "replica-a", 3), (jobs["d3"].Status, jobs["d3"].DownloadId, jobs["d3"].LeaseOwner, jobs["d3"].Attempts));
            Assert.Equal(ImportJobStatus.Queued, jobs["d4"].Status);
            Assert.Equal(ImportJobStatus.Ended, jobs["d5"].Status);
            Assert.Equal(["deploying", "downloading", "failed", "initializing", "running"], (await db.Deploys.Select(d => d.Status).ToListAsync()).Order());
        }
    }

    private static string Lora(int id, string name, string deployId, string? sha, string? probe, string falseValue) =>
        $"""INSERT INTO loras ("Id", "UserId", "Name", "BaseModel", "SourceType", "SourceUrl", "Private", "Description", "Deleted", "DeployId", "CreatedAt", "UpdatedAt", "CivitaiFileId", "Sha256", "ProbeJson", "SizeBytes") VALUES ({id}, 1, '{name}', 'black-forest-labs/FLUX-1-dev', 'civitai', 'https://civitai.com/models/1', {falseValue}, '', {falseValue}, '{deployId}', '2026-01-01 00:00:00', '2026-01-01 00:00:00', {10 + id}, {Quote(sha)}, {Quote(probe)}, 100)""";

    private static string Deploy(string id, int loraId, string status, int? downloadId, string? leaseOwner) =>
        $"""INSERT INTO deploys ("Id", "UserId", "LoraId", "ModelName", "Type", "Task", "Status", "FailReason", "FailClass", "Version", "MinInstances", "MaxInstances", "RunningInstances", "PendingInstances", "CreatedAt", "UpdatedAt", "LeaseOwner", "LeaseExpiresAt", "Attempts", "DownloadId") VALUES ('{id}', 1, {loraId}, 'old/{id}', 'lora', 'text-to-image', '{status}', '', '', '', 1, 1, 0, 0, '2026-01-01 00:00:00', '2026-01-01 00:00:00', {leaseOwner ?? "NULL"}, {(leaseOwner is null ? "NULL" : "'2026-01-01 00:05:00'")}, 3, {downloadId?.ToString() ?? "NULL"})""";

    private static string Quote(string? value) => value is null ? "NULL" : $"'{value}'";
}
