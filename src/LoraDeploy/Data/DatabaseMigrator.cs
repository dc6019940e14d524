using System.Net.Sockets;
using Microsoft.Data.Sqlite;
using Microsoft.EntityFrameworkCore;
using Microsoft.EntityFrameworkCore.Infrastructure;
using Microsoft.EntityFrameworkCore.Migrations;
using Microsoft.EntityFrameworkCore.Storage;
using Microsoft.Extensions.Options;
using Npgsql;

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
    /// <exception cref="DatabaseStartException">The database cannot be reached or opened; the message says what to do.</exception>
    public async Task MigrateAsync(CancellationToken cancellationToken)
    {
        await using var db = await contexts.CreateDbContextAsync(cancellationToken);
        try
        {
            await MigrateCoreAsync(db, cancellationToken);
        }
        catch (Exception e) when (DatabaseStartException.Explain(db, e) is { } message)
        {
            throw new DatabaseStartException(message, e);
        }
    }

    private async Task MigrateCoreAsync(LoraDeployDbContext db, CancellationToken cancellationToken)
    {
        if (db is SqliteLoraDeployContext)
        {
            var connection = db.Database.GetDbConnection();
            var file = new SqliteConnectionStringBuilder(connection.ConnectionString).DataSource;
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
            await CreatePostgresDatabaseIfMissingAsync(db, cancellationToken);
            await MigrateUnderAdvisoryLockAsync(db, cancellationToken);
            return;
        }
        await ApplyMigrationsAsync(db, cancellationToken);
    }

    /// <summary>
    /// A missing database is created when the configured user may (CREATEDB); otherwise the start fails with a line
    /// that says so. The advisory lock below needs a connection to the database itself, so this comes first.
    /// </summary>
    private async Task CreatePostgresDatabaseIfMissingAsync(LoraDeployDbContext db, CancellationToken cancellationToken)
    {
        if (await db.GetService<IRelationalDatabaseCreator>().ExistsAsync(cancellationToken))
        {
            return;
        }
        var target = new NpgsqlConnectionStringBuilder(db.Database.GetConnectionString());
        // On our own connection to the maintenance database rather than EF's creator: EF logs a refused CREATE DATABASE
        // as a failed command with its SQL, and the user should see only the one line below.
        var maintenance = new NpgsqlConnectionStringBuilder(target.ConnectionString) { Database = "postgres", Pooling = false, Multiplexing = false };
        try
        {
            await using var connection = new NpgsqlConnection(maintenance.ToString());
            await connection.OpenAsync(cancellationToken);
            await using var create = new NpgsqlCommand($"CREATE DATABASE \"{target.Database!.Replace("\"", "\"\"", StringComparison.Ordinal)}\"", connection);
            await create.ExecuteNonQueryAsync(cancellationToken);
            logger.LogInformation("Created the PostgreSQL database {Database}", target.Database);
        }
        catch (PostgresException e) when (e.SqlState == PostgresErrorCodes.DuplicateDatabase)
        {
            // Another replica created it first.
        }
        catch (PostgresException e) when (e.SqlState == PostgresErrorCodes.InsufficientPrivilege)
        {
            throw new DatabaseStartException(
                $"the PostgreSQL database '{target.Database}' does not exist on {target.Host}:{target.Port} and user '{target.Username}' may not create it: " +
                $"create it (createdb -h {target.Host} -p {target.Port} -O {target.Username} {target.Database}) or set ConnectionStrings:Postgres to an existing database", e);
        }
    }

    /// <summary>
    /// Replicas starting together on PostgreSQL take turns: EF's own migration lock did not stop two processes from
    /// both applying the same pending migration (the replica tests caught "relation already exists"), so the
    /// whole read-pending-then-apply runs under a session advisory lock on its own unpooled connection.
    /// </summary>
    private async Task MigrateUnderAdvisoryLockAsync(LoraDeployDbContext db, CancellationToken cancellationToken)
    {
        // Not multiplexed either: multiplexing needs pooling, and a session lock needs one fixed connection.
        var builder = new NpgsqlConnectionStringBuilder(db.Database.GetConnectionString()) { Pooling = false, Multiplexing = false };
        await using var connection = new NpgsqlConnection(builder.ToString());
        await connection.OpenAsync(cancellationToken);
        await using (var take = new NpgsqlCommand("SELECT pg_advisory_lock(@key)", connection))
        {
            take.Parameters.AddWithValue("key", MigrationLockKey);
            take.CommandTimeout = 0; // wait as long as the other replica migrates
            await take.ExecuteNonQueryAsync(cancellationToken);
        }
        try
        {
            await ApplyMigrationsAsync(db, cancellationToken);
        }
        finally
        {
            await using var release = new NpgsqlCommand("SELECT pg_advisory_unlock(@key)", connection);
            release.Parameters.AddWithValue("key", MigrationLockKey);
            await release.ExecuteNonQueryAsync(CancellationToken.None);
        }
    }

    /// <summary>An arbitrary constant that names "LoraDeploy migrations" among advisory locks.</summary>
    private const long MigrationLockKey = 0x4C6F7261_4D696772; // "LoraMigr"

    private async Task ApplyMigrationsAsync(LoraDeployDbContext db, CancellationToken cancellationToken)
    {
        // The history table first: on a fresh database EF would otherwise read a table that is not there yet and log
        // that failed command as an error ("Failed executing DbCommand … __EFMigrationsHistory") before creating it.
        await db.GetService<IHistoryRepository>().CreateIfNotExistsAsync(cancellationToken);
        var pending = (await db.Database.GetPendingMigrationsAsync(cancellationToken)).ToList();
        if (pending.Count > 0)
        {
            logger.LogInformation("Applying {Count} database migrations: {Migrations}", pending.Count, pending);
        }
        await db.Database.MigrateAsync(cancellationToken);
    }
}

/// <summary>
/// The database cannot be used at start (server down, database missing, login refused, file not writable). Its
/// message is one line saying what is wrong and what to do; the commands print it instead of a stack trace.
/// </summary>
public sealed class DatabaseStartException(string message, Exception? inner = null) : Exception(message, inner)
{
    /// <summary>A one-line explanation of a start failure, or null when it is not a database problem we know.</summary>
    internal static string? Explain(LoraDeployDbContext db, Exception e)
    {
        if (e is DatabaseStartException)
        {
            return e.Message;
        }
        if (db is PostgresLoraDeployContext)
        {
            var builder = new NpgsqlConnectionStringBuilder(db.Database.GetConnectionString());
            var where = $"PostgreSQL at {builder.Host}:{builder.Port}";
            const string Fix = "check ConnectionStrings:Postgres";
            switch (Find<PostgresException>(e))
            {
                case { SqlState: PostgresErrorCodes.InvalidCatalogName }:
                    return $"the database '{builder.Database}' does not exist on {where}: create it, or {Fix}";
                case { SqlState: PostgresErrorCodes.InvalidPassword or PostgresErrorCodes.InvalidAuthorizationSpecification } p:
                    return $"{where} refused the login of user '{builder.Username}' ({p.MessageText}): {Fix}";
                case { } p:
                    return $"{where} answered: {p.MessageText}";
            }
            if (Find<SocketException>(e) is { } socket)
            {
                var why = socket.SocketErrorCode switch
                {
                    SocketError.ConnectionRefused => "connection refused; is the server running?",
                    SocketError.HostNotFound or SocketError.TryAgain or SocketError.NoData => "host not found",
                    _ => socket.Message,
                };
                return $"cannot connect to {where} ({why}): start PostgreSQL or {Fix}";
            }
            if (Find<TimeoutException>(e) is not null)
            {
                return $"cannot connect to {where} (timed out): start PostgreSQL or {Fix}";
            }
            if (Find<NpgsqlException>(e) is { } npgsql)
            {
                return $"cannot use {where} ({npgsql.Message.ReplaceLineEndings(" ")}): {Fix}";
            }
            return null;
        }
        var file = new SqliteConnectionStringBuilder(db.Database.GetConnectionString()).DataSource;
        return Find<SqliteException>(e) is { } sqlite
            ? $"cannot open the SQLite database {Path.GetFullPath(file)} ({sqlite.Message.ReplaceLineEndings(" ")}): check that its folder (--data-dir) is writable"
            : e is UnauthorizedAccessException or IOException
                ? $"cannot create the data folder for {Path.GetFullPath(file)} ({e.Message}): choose a writable --data-dir"
                : null;
    }

    private static T? Find<T>(Exception e) where T : Exception
    {
        for (Exception? current = e; current is not null; current = current.InnerException)
        {
            if (current is T match)
            {
                return match;
            }
        }
        return null;
    }
}
