using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Data;

/// <summary>
/// Applies migrations at start. On PostgreSQL replicas starting together take turns under an advisory lock, so each
/// migration is applied once. SQLite also gets WAL so readers never wait on the pipeline's writes.
/// </summary>
public sealed class DatabaseMigrator(
    IDbContextFactory<LoraDeployDbContext> contexts,
    IOptions<DatabaseOptions> options,
    ILogger<DatabaseMigrator> logger)
{
    public async Task MigrateAsync(CancellationToken cancellationToken)
    {
        await using var db = await contexts.CreateDbContextAsync(cancellationToken);
        if (db is SqliteLoraDeployContext)
        {
            var connection = db.Database.GetDbConnection();
            var file = new Microsoft.Data.Sqlite.SqliteConnectionStringBuilder(connection.ConnectionString).DataSource;
            var folder = Path.GetDirectoryName(Path.GetFullPath(file));
            if (!string.IsNullOrEmpty(folder))
            {
                Directory.CreateDirectory(folder);
            }
            await db.Database.ExecuteSqlRawAsync("PRAGMA journal_mode=WAL;", cancellationToken);
        }
        if (!options.Value.MigrateAtStart)
        {
            return;
        }
        if (db is PostgresLoraDeployContext)
        {
            await MigrateUnderAdvisoryLockAsync(db, cancellationToken);
            return;
        }
        await MigrateCoreAsync(db, cancellationToken);
    }

    /// <summary>
    /// Replicas starting together on PostgreSQL take turns: EF's own migration lock did not stop two processes from
    /// both applying the same pending migration (the replica tests caught "relation already exists"), so the
    /// whole read-pending-then-apply runs under a session advisory lock on its own unpooled connection.
    /// </summary>
    private async Task MigrateUnderAdvisoryLockAsync(LoraDeployDbContext db, CancellationToken cancellationToken)
    {
        // Not multiplexed either: multiplexing needs pooling, and a session lock needs one fixed connection.
        var builder = new Npgsql.NpgsqlConnectionStringBuilder(db.Database.GetConnectionString()) { Pooling = false, Multiplexing = false };
        await using var connection = new Npgsql.NpgsqlConnection(builder.ToString());
        await connection.OpenAsync(cancellationToken);
        await using (var take = new Npgsql.NpgsqlCommand("SELECT pg_advisory_lock(@key)", connection))
        {
            take.Parameters.AddWithValue("key", MigrationLockKey);
            take.CommandTimeout = 0; // wait as long as the other replica migrates
            await take.ExecuteNonQueryAsync(cancellationToken);
        }
        try
        {
            await MigrateCoreAsync(db, cancellationToken);
        }
        finally
        {
            await using var release = new Npgsql.NpgsqlCommand("SELECT pg_advisory_unlock(@key)", connection);
            release.Parameters.AddWithValue("key", MigrationLockKey);
            await release.ExecuteNonQueryAsync(CancellationToken.None);
        }
    }

    /// <summary>An arbitrary constant that names "LoraDeploy migrations" among advisory locks.</summary>
    private const long MigrationLockKey = 0x4C6F7261_4D696772; // "LoraMigr"

    private async Task MigrateCoreAsync(LoraDeployDbContext db, CancellationToken cancellationToken)
    {
        var pending = (await db.Database.GetPendingMigrationsAsync(cancellationToken)).ToList();
        if (pending.Count > 0)
        {
            logger.LogInformation("Applying {Count} database migrations: {Migrations}", pending.Count, pending);
        }
        await db.Database.MigrateAsync(cancellationToken);
    }
}
