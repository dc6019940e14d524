using System.Data.Common;
using System.Text.Json;
using LoraDeploy.Data;
using Microsoft.Data.Sqlite;
using Microsoft.Extensions.ObjectPool;
using Npgsql;

namespace LoraDeploy.Deploys;

/// <summary>
/// Every read of <see cref="DeploymentOut"/> — what clients poll (<c>GET /deploy/{id}</c>, <c>GET /deploy/list</c>) —
/// as SQL of our own straight into the wire type. A wrk profile of the EF path spent more of each request in EF's
/// command and reader plumbing, Microsoft.Data.Sqlite's lock-guarded connection pool and re-preparing the statement
/// than in anything else; these reads keep their statements prepared per connection instead. Writes stay on EF.
/// Each is one index range scan: the primary key, or <c>IX_deploys_UserId_CreatedAt_Id</c> in list order.
/// </summary>
public abstract class DeployReads
{
    /// <param name="timestamp">SQL that selects a UTC timestamp column for <see cref="ReadTimestamp"/>.</param>
    /// <param name="statusIsOneOf">SQL that tests <c>"Status"</c> against the <c>@statuses</c> parameter.</param>
    protected DeployReads(Func<string, string> timestamp, string statusIsOneOf)
    {
        var select = "SELECT \"Id\", \"ModelName\", \"Version\", \"Task\", \"Status\", \"FailReason\", " +
            $"{timestamp("\"CreatedAt\"")}, {timestamp("\"UpdatedAt\"")}, " +
            "\"RunningInstances\", \"PendingInstances\", \"MinInstances\", \"MaxInstances\", \"Type\" FROM deploys ";
        const string listOrder = " ORDER BY \"CreatedAt\" DESC, \"Id\" DESC";
        ByIdSql = select + "WHERE \"Id\" = @id AND \"UserId\" = @user";
        NotDeletedOfSql = select + $"WHERE \"UserId\" = @user AND \"Status\" <> '{DeployStatus.Deleted}'" + listOrder;
        WithStatusSql = select + $"WHERE \"UserId\" = @user AND \"Status\" {statusIsOneOf}" + listOrder;
    }

    protected string ByIdSql { get; }

    protected string NotDeletedOfSql { get; }

    protected string WithStatusSql { get; }

    /// <summary>The caller's deploy, or null when it does not exist or is someone else's.</summary>
    public abstract ValueTask<DeploymentOut?> ByIdAsync(string id, long userId, CancellationToken ct);

    /// <summary>The caller's deploys, newest first: those not deleted, or those with one of <paramref name="statuses"/>.</summary>
    public abstract ValueTask<List<DeploymentOut>> ListAsync(long userId, IReadOnlyCollection<string>? statuses, CancellationToken ct);

    /// <summary>A timestamp column as DeepInfra writes it (<see cref="Timestamps.Format"/>).</summary>
    protected abstract string ReadTimestamp(DbDataReader row, int ordinal);

    protected DeploymentOut ReadRow(DbDataReader row) => new(
        row.GetString(0),
        row.GetString(1),
        row.GetString(2),
        row.GetString(3),
        row.GetString(4),
        row.GetString(5),
        ReadTimestamp(row, 6),
        ReadTimestamp(row, 7),
        new DeployInstances(row.GetInt32(8), row.GetInt32(9)),
        null,
        new ScaleSettings(row.GetInt32(10), row.GetInt32(11)),
        row.GetString(12));

    public static DeployReads Create(IServiceProvider services) =>
        services.GetRequiredService<Microsoft.Extensions.Options.IOptions<DatabaseOptions>>().Value.Provider switch
        {
            DatabaseProvider.Postgres => new PostgresDeployReads(services.GetRequiredService<IConfiguration>().GetConnectionString("Postgres")!),
            _ => new SqliteDeployReads(DatabaseExtensions.SqliteConnectionString(services.GetRequiredService<IConfiguration>())),
        };
}

/// <summary>
/// SQLite: a small pool of open connections, each with its statements prepared once. Microsoft.Data.Sqlite
/// prepares a statement again for every new command, and its own pool takes a lock on every open and close.
/// In WAL mode these readers never block the writers.
/// </summary>
public sealed class SqliteDeployReads : DeployReads, IDisposable
{
    private readonly ObjectPool<Session> _sessions;

    public SqliteDeployReads(string connectionString)
        // EF stores a DateTime as 'yyyy-MM-dd HH:mm:ss[.fffffff]': cutting the text truncates the fraction exactly as
        // Timestamps.Format does, where strftime would round to the millisecond first. SQLite has no array
        // parameters, so the statuses arrive as one JSON array and the statement stays prepared.
        : base(column => $"substr({column}, 1, 10) || 'T' || substr({column}, 12, 8) || '+00:00'",
            "IN (SELECT value FROM json_each(@statuses))")
    {
        _sessions = new DefaultObjectPoolProvider { MaximumRetained = 4 * Environment.ProcessorCount }
            .Create(new SessionPolicy(this, connectionString));
    }

    /// <summary>Rendered by the SQL already: parsing the text into a DateTime only to format it again cost more.</summary>
    protected override string ReadTimestamp(DbDataReader row, int ordinal) => row.GetString(ordinal);

    public override ValueTask<DeploymentOut?> ByIdAsync(string id, long userId, CancellationToken ct)
    {
        var session = _sessions.Get();
        try
        {
            session.ById.Parameters[0].Value = id;
            session.ById.Parameters[1].Value = userId;
            using var reader = session.ById.ExecuteReader();
            return ValueTask.FromResult(reader.Read() ? ReadRow(reader) : null);
        }
        finally
        {
            _sessions.Return(session);
        }
    }

    public override ValueTask<List<DeploymentOut>> ListAsync(long userId, IReadOnlyCollection<string>? statuses, CancellationToken ct)
    {
        var session = _sessions.Get();
        try
        {
            var command = statuses is null ? session.NotDeletedOf : session.WithStatus;
            command.Parameters[0].Value = userId;
            if (statuses is not null)
            {
                command.Parameters[1].Value = JsonSerializer.Serialize([.. statuses], ApiJson.Context.ListString);
            }
            using var reader = command.ExecuteReader();
            var deploys = new List<DeploymentOut>();
            while (reader.Read())
            {
                ct.ThrowIfCancellationRequested();
                deploys.Add(ReadRow(reader));
            }
            return ValueTask.FromResult(deploys);
        }
        finally
        {
            _sessions.Return(session);
        }
    }

    public void Dispose() => (_sessions as IDisposable)?.Dispose();

    private sealed class Session : IDisposable
    {
        private readonly SqliteConnection _connection;

        public Session(SqliteDeployReads reads, string connectionString)
        {
            // Its own connection, outside Microsoft.Data.Sqlite's pool: it lives as long as the session.
            _connection = new SqliteConnection(new SqliteConnectionStringBuilder(connectionString) { Pooling = false }.ToString());
            _connection.Open();
            ById = Prepare(reads.ByIdSql, "@id", "@user");
            NotDeletedOf = Prepare(reads.NotDeletedOfSql, "@user");
            WithStatus = Prepare(reads.WithStatusSql, "@user", "@statuses");
        }

        public SqliteCommand ById { get; }

        public SqliteCommand NotDeletedOf { get; }

        public SqliteCommand WithStatus { get; }

        private SqliteCommand Prepare(string sql, params string[] parameters)
        {
            var command = _connection.CreateCommand();
            command.CommandText = sql;
            foreach (var name in parameters)
            {
                command.Parameters.Add(new SqliteParameter { ParameterName = name });
            }
            command.Prepare();
            return command;
        }

        public void Dispose()
        {
            ById.Dispose();
            NotDeletedOf.Dispose();
            WithStatus.Dispose();
            _connection.Dispose();
        }
    }

    private sealed class SessionPolicy(SqliteDeployReads reads, string connectionString) : IPooledObjectPolicy<Session>
    {
        public Session Create() => new(reads, connectionString);

        public bool Return(Session session) => true;
    }
}

/// <summary>
/// PostgreSQL: a data source of its own for these reads, so it can use what suits single statements outside
/// transactions: multiplexing (many requests' queries written onto a few connections instead of one connection
/// and one backend wake-up each), auto-prepared statements, and no session reset on return (nothing here sets
/// session state). Measured in docs/benchmarks.md; EF keeps the connection string as configured.
/// </summary>
public sealed class PostgresDeployReads : DeployReads, IDisposable
{
    private readonly NpgsqlDataSource _dataSource;

    public PostgresDeployReads(string connectionString)
        : base(column => column, "= ANY(@statuses)")
    {
        var builder = new NpgsqlDataSourceBuilder(connectionString);
        builder.ConnectionStringBuilder.Multiplexing = true;
        builder.ConnectionStringBuilder.NoResetOnClose = true;
        builder.ConnectionStringBuilder.MaxAutoPrepare = Math.Max(builder.ConnectionStringBuilder.MaxAutoPrepare, 8);
        _dataSource = builder.Build();
    }

    /// <summary>
    /// Formatted here, not with to_char: a timestamptz arrives as 8 binary bytes, and to_char cost the database
    /// more than the formatting costs us.
    /// </summary>
    protected override string ReadTimestamp(DbDataReader row, int ordinal) => Timestamps.Format(row.GetFieldValue<DateTime>(ordinal));

    public override async ValueTask<DeploymentOut?> ByIdAsync(string id, long userId, CancellationToken ct)
    {
        await using var command = _dataSource.CreateCommand(ByIdSql);
        command.Parameters.Add(new NpgsqlParameter<string>("id", id));
        command.Parameters.Add(new NpgsqlParameter<long>("user", userId));
        await using var reader = await command.ExecuteReaderAsync(ct);
        return await reader.ReadAsync(ct) ? ReadRow(reader) : null;
    }

    public override async ValueTask<List<DeploymentOut>> ListAsync(long userId, IReadOnlyCollection<string>? statuses, CancellationToken ct)
    {
        await using var command = _dataSource.CreateCommand(statuses is null ? NotDeletedOfSql : WithStatusSql);
        command.Parameters.Add(new NpgsqlParameter<long>("user", userId));
        if (statuses is not null)
        {
            command.Parameters.Add(new NpgsqlParameter<string[]>("statuses", [.. statuses]));
        }
        await using var reader = await command.ExecuteReaderAsync(ct);
        var deploys = new List<DeploymentOut>();
        while (await reader.ReadAsync(ct))
        {
            deploys.Add(ReadRow(reader));
        }
        return deploys;
    }

    public void Dispose() => _dataSource.Dispose();
}
