using System.Buffers;
using System.Data.Common;
using System.Diagnostics.Metrics;
using System.Text;
using System.Text.Json;
using LoraDeploy.Data;
using Microsoft.Data.Sqlite;
using Microsoft.Extensions.Caching.Memory;
using Microsoft.Extensions.ObjectPool;
using Npgsql;
using SQLitePCL;

namespace LoraDeploy.Deploys;

/// <summary>
/// Every read of a <c>DeploymentOut</c> — what clients poll (<c>GET /deploy/{id}</c>, <c>GET /deploy/list</c>) —
/// as SQL of our own, written as JSON straight from the driver's row (<see cref="DeployJsonWriter"/>). A wrk
/// profile of the EF path spent more of each request in EF's command and reader plumbing, Microsoft.Data.Sqlite's
/// lock-guarded connection pool and re-preparing the statement than in anything else; these reads keep their
/// statements prepared per connection instead. Writes stay on EF. Each is one index range scan: the primary key,
/// or <c>IX_deploys_UserId_CreatedAt_Id</c> in list order.
/// </summary>
public abstract class DeployReads
{
    /// <param name="statusIsOneOf">SQL that tests <c>"Status"</c> against the <c>@statuses</c> parameter.</param>
    protected DeployReads(string statusIsOneOf)
    {
        NotDeletedOfSql = Select + $"WHERE \"UserId\" = @user AND \"Status\" <> '{DeployStatus.Deleted}'" + ListOrder;
        WithStatusSql = Select + $"WHERE \"UserId\" = @user AND \"Status\" {statusIsOneOf}" + ListOrder;
    }

    /// <summary>A deploy's columns in <see cref="DeployRow"/>'s order, then its owner (column 13).</summary>
    protected const string Select = "SELECT \"Id\", \"ModelName\", \"Version\", \"Task\", \"Status\", \"FailReason\", \"CreatedAt\", " +
        "\"UpdatedAt\", \"RunningInstances\", \"PendingInstances\", \"MinInstances\", \"MaxInstances\", \"Type\", \"UserId\" FROM deploys ";

    protected const string ListOrder = " ORDER BY \"CreatedAt\" DESC, \"Id\" DESC";

    /// <summary>The length of DeepInfra's 'yyyy-MM-ddTHH:mm:ss+00:00'.</summary>
    protected const int TimestampLength = 25;

    protected internal string NotDeletedOfSql { get; }

    protected internal string WithStatusSql { get; }

    /// <summary>The caller's deploy as its response body, or null when it does not exist or is someone else's.</summary>
    public abstract ValueTask<DeployJson?> ByIdAsync(string id, long userId, CancellationToken ct);

    /// <summary>
    /// Writes the caller's deploys, newest first, as one JSON array: those not deleted, or those with one of
    /// <paramref name="statuses"/>. Handed to the connection every <see cref="DeployListOutput.ChunkBytes"/>.
    /// </summary>
    public abstract Task WriteListAsync(long userId, IReadOnlyCollection<string>? statuses, DeployListOutput output, CancellationToken ct);

    /// <summary>One deploy's body: <paramref name="writeRow"/> writes the current row of <paramref name="reader"/>.</summary>
    protected static DeployJson Render<TReader>(TReader reader, Action<TReader, Utf8JsonWriter> writeRow)
    {
        var buffer = new ArrayBufferWriter<byte>(512);
        using (var json = new Utf8JsonWriter(buffer, DeployJsonWriter.Options))
        {
            writeRow(reader, json);
        }
        return new DeployJson(buffer.WrittenMemory);
    }

    public static DeployReads Create(IServiceProvider services) =>
        services.GetRequiredService<Microsoft.Extensions.Options.IOptions<DeployOptions>>().Value.Reads == DeployOptions.EfReads
            ? new EfDeployReads(services.GetRequiredService<Microsoft.EntityFrameworkCore.IDbContextFactory<LoraDeployDbContext>>())
            : services.GetRequiredService<Microsoft.Extensions.Options.IOptions<DatabaseOptions>>().Value.Provider switch
        {
            DatabaseProvider.Postgres => new PostgresDeployReads(services.GetRequiredService<IConfiguration>().GetConnectionString("Postgres")!),
            _ => new SqliteDeployReads(
                DatabaseExtensions.SqliteConnectionString(services.GetRequiredService<IConfiguration>()),
                services.GetRequiredService<Microsoft.Extensions.Options.IOptions<DeployOptions>>().Value.ReadCacheBytes,
                services.GetService<IMeterFactory>()),
        };
}

/// <summary>
/// SQLite: a small pool of open connections, each with its statements prepared once, read through SQLitePCL.raw
/// (the layer under Microsoft.Data.Sqlite): a column arrives as a span of SQLite's own buffer, so a row costs no
/// strings. Microsoft.Data.Sqlite prepares a statement again for every new command, takes a lock in its pool on
/// every open and close, and copies each column into a string. In WAL mode these readers never block the writers.
/// </summary>
/// <remarks>
/// Polls mostly ask again for what has not changed, so the bodies of <c>GET /deploy/{id}</c> and of an unfiltered list
/// that fits one chunk are kept, rendered, and served again while nothing has been committed to the database since
/// they were read (<see cref="CurrentVersion"/>). Any commit, by this process or another on the same file, makes all
/// of them stale at once: exact, and cheap while deploys change a few times a second rather than thousands.
/// </remarks>
public sealed class SqliteDeployReads : DeployReads, IDisposable
{
    /// <summary>What an entry costs besides its body (the entry, its key, the record), for the size limit.</summary>
    private const int EntryOverhead = 160;

    /// <summary>A poller that stops lets its bodies go after this long, before the size limit needs them gone.</summary>
    private static readonly TimeSpan IdleFor = TimeSpan.FromMinutes(5);

    private static readonly KeyValuePair<string, object?> FromKept = new("source", "kept");
    private static readonly KeyValuePair<string, object?> FromDatabase = new("source", "database");

    private readonly ObjectPool<Session> _sessions;
    private readonly MemoryCache? _rendered;
    private readonly Counter<long>? _answers;
    private long _version;

    // SQLite has no array parameters, so the statuses arrive as one JSON array and the statement stays prepared.
    /// <param name="connectionString">The database, as EF's connections open it.</param>
    /// <param name="cacheBytes">Bytes of rendered bodies to keep (<see cref="DeployOptions.ReadCacheBytes"/>); 0 keeps none.</param>
    /// <param name="meters">Where to count kept and freshly read answers, if anywhere.</param>
    public SqliteDeployReads(string connectionString, long cacheBytes = 0, IMeterFactory? meters = null)
        : base("IN (SELECT value FROM json_each(@statuses))")
    {
        ByIdSql = Select + "WHERE \"Id\" = @id AND \"UserId\" = @user";
        _sessions = new DefaultObjectPoolProvider { MaximumRetained = 4 * Environment.ProcessorCount }
            .Create(new SessionPolicy(this, connectionString));
        _rendered = cacheBytes > 0 ? new MemoryCache(new MemoryCacheOptions { SizeLimit = cacheBytes }) : null;
        _answers = meters?.Create(Observability.DeployStatusGauge.MeterName).CreateCounter<long>("loradeploy.deploy_reads",
            description: "Answers to GET /deploy/{id} and the unfiltered GET /deploy/list, by source: a body kept since the last commit, or the database");
    }

    /// <summary>Parameters: <c>@id</c>, <c>@user</c> (the owner).</summary>
    internal string ByIdSql { get; }

    public override ValueTask<DeployJson?> ByIdAsync(string id, long userId, CancellationToken ct)
    {
        var session = _sessions.Get();
        var statement = session.ById;
        try
        {
            var version = _rendered is null ? 0 : CurrentVersion(session);
            if (_rendered?.Get(id) is Rendered kept && kept.Version == version)
            {
                _answers?.Add(1, FromKept);
                // Deploys never change owner: someone else's is a 404 however old the body.
                return ValueTask.FromResult(kept.Owner == userId ? new DeployJson(kept.Body) : null);
            }
            _answers?.Add(1, FromDatabase);
            raw.sqlite3_bind_text(statement, 1, id);
            raw.sqlite3_bind_int64(statement, 2, userId);
            if (!session.Step(statement))
            {
                return ValueTask.FromResult<DeployJson?>(null);
            }
            var body = Render(statement, WriteRow);
            Keep(id, new Rendered(version, userId, body.Utf8.ToArray()));
            return ValueTask.FromResult<DeployJson?>(body);
        }
        finally
        {
            session.Release(statement);
            _sessions.Return(session);
        }
    }

    public override async Task WriteListAsync(long userId, IReadOnlyCollection<string>? statuses, DeployListOutput output, CancellationToken ct)
    {
        var keep = statuses is null && _rendered is not null;
        long version = 0;
        Rendered? kept = null;
        var session = _sessions.Get();
        var statement = statuses is null ? session.NotDeletedOf : session.WithStatus;
        await using var json = new Utf8JsonWriter(output, DeployJsonWriter.Options);
        try
        {
            if (keep)
            {
                version = CurrentVersion(session);
                kept = _rendered!.Get(userId) is Rendered found && found.Version == version ? found : null;
            }
            if (statuses is null)
            {
                _answers?.Add(1, kept is null ? FromDatabase : FromKept);
            }
            if (kept is null)
            {
                raw.sqlite3_bind_int64(statement, 1, userId);
                if (statuses is not null)
                {
                    raw.sqlite3_bind_text(statement, 2, JsonSerializer.Serialize([.. statuses], ApiJson.Context.ListString));
                }
                json.WriteStartArray();
                while (WriteRows(session, statement, json))
                {
                    if (!await output.FlushAsync(json, ct))
                    {
                        return;
                    }
                }
            }
        }
        finally
        {
            // The rows are read: the session goes back before the list goes out.
            session.Release(statement);
            _sessions.Return(session);
        }
        if (kept is not null)
        {
            await output.WriteWholeAsync(kept.Body, ct);
            return;
        }
        json.WriteEndArray();
        await output.CompleteAsync(json, ct);
        if (keep && output.SentWhole is { } whole)
        {
            Keep(userId, new Rendered(version, userId, whole.ToArray()));
        }
    }

    /// <summary>
    /// The version to tag a body read now with, and to accept a kept body at: bumped whenever a session sees that
    /// another connection — a writer of this process or of any other — has committed since it last looked.
    /// <c>PRAGMA data_version</c> counts per connection, so each session compares with what it saw last, and a new
    /// session bumps once, as it cannot know what it missed. Whoever reads after a commit has ended therefore sees a
    /// bump made after that commit, and every body tagged before the bump (read, maybe, before the commit) is stale.
    /// </summary>
    private long CurrentVersion(Session session)
    {
        var seen = session.DataVersion();
        if (seen != session.LastSeenDataVersion)
        {
            session.LastSeenDataVersion = seen;
            return Interlocked.Increment(ref _version);
        }
        return Volatile.Read(ref _version);
    }

    private void Keep(object key, Rendered rendered)
    {
        // A read that raced a newer one must not replace the newer body with its older one.
        if (_rendered is null || _rendered.Get(key) is Rendered current && current.Version >= rendered.Version)
        {
            return;
        }
        using var entry = _rendered.CreateEntry(key);
        entry.Value = rendered;
        entry.Size = rendered.Body.Length + EntryOverhead;
        entry.SlidingExpiration = IdleFor;
    }

    /// <param name="Version">What <see cref="CurrentVersion"/> said before the body was read.</param>
    /// <param name="Owner">The deploy's owner (a body by id), or the caller (a list).</param>
    /// <param name="Body">The response body; never changed once kept.</param>
    private sealed record Rendered(long Version, long Owner, byte[] Body);

    /// <summary>Writes rows until a chunk is full (true) or the rows are done (false).</summary>
    private static bool WriteRows(Session session, sqlite3_stmt statement, Utf8JsonWriter json)
    {
        var until = json.BytesCommitted + json.BytesPending + DeployListOutput.ChunkBytes;
        while (json.BytesCommitted + json.BytesPending < until)
        {
            if (!session.Step(statement))
            {
                return false;
            }
            WriteRow(statement, json);
        }
        return true;
    }

    private static void WriteRow(sqlite3_stmt row, Utf8JsonWriter json)
    {
        Span<byte> created = stackalloc byte[TimestampLength], updated = stackalloc byte[TimestampLength];
        DeployJsonWriter.Write(json, ReadRow(row, created, updated));
    }

    private static DeployRow ReadRow(sqlite3_stmt row, Span<byte> created, Span<byte> updated) => new()
    {
        // A TEXT column's blob is its UTF-8 bytes, without a conversion.
        Id = raw.sqlite3_column_blob(row, 0),
        ModelName = raw.sqlite3_column_blob(row, 1),
        Version = raw.sqlite3_column_blob(row, 2),
        Task = raw.sqlite3_column_blob(row, 3),
        Status = raw.sqlite3_column_blob(row, 4),
        FailReason = raw.sqlite3_column_blob(row, 5),
        CreatedAt = Timestamp(raw.sqlite3_column_blob(row, 6), created),
        UpdatedAt = Timestamp(raw.sqlite3_column_blob(row, 7), updated),
        RunningInstances = raw.sqlite3_column_int(row, 8),
        PendingInstances = raw.sqlite3_column_int(row, 9),
        MinInstances = raw.sqlite3_column_int(row, 10),
        MaxInstances = raw.sqlite3_column_int(row, 11),
        Type = raw.sqlite3_column_blob(row, 12),
    };

    /// <summary>
    /// EF stores a DateTime as 'yyyy-MM-dd HH:mm:ss[.fffffff]'; DeepInfra's form is 'yyyy-MM-ddTHH:mm:ss+00:00'.
    /// Cutting the text truncates the fraction exactly as <see cref="Timestamps.Format"/> does (SQLite's own
    /// strftime would round to the millisecond first, and doing it in SQL cost ~2 µs a row).
    /// </summary>
    private static ReadOnlySpan<byte> Timestamp(ReadOnlySpan<byte> stored, Span<byte> into)
    {
        if (stored.Length < 19 || stored[10] != (byte)' ')
        {
            throw new InvalidDataException($"A deploy timestamp reads '{Encoding.UTF8.GetString(stored)}'; expected 'yyyy-MM-dd HH:mm:ss'.");
        }
        stored[..19].CopyTo(into);
        into[10] = (byte)'T';
        "+00:00"u8.CopyTo(into[19..]);
        return into[..TimestampLength];
    }

    public void Dispose()
    {
        (_sessions as IDisposable)?.Dispose();
        _rendered?.Dispose();
    }

    /// <summary>One connection and its prepared statements; used by one request at a time.</summary>
    private sealed class Session : IDisposable
    {
        private readonly SqliteConnection _connection;
        private readonly sqlite3 _db;

        public Session(SqliteDeployReads reads, string connectionString)
        {
            // Its own connection, outside Microsoft.Data.Sqlite's pool: it lives as long as the session.
            _connection = new SqliteConnection(new SqliteConnectionStringBuilder(connectionString) { Pooling = false }.ToString());
            _connection.Open();
            using (var wait = _connection.CreateCommand())
            {
                // Microsoft.Data.Sqlite retries a busy database itself; statements of our own ask SQLite to wait.
                wait.CommandText = "PRAGMA busy_timeout = 30000";
                wait.ExecuteNonQuery();
            }
            _db = _connection.Handle!;
            ById = Prepare(reads.ByIdSql);
            NotDeletedOf = Prepare(reads.NotDeletedOfSql);
            WithStatus = Prepare(reads.WithStatusSql);
            _dataVersion = Prepare("PRAGMA data_version");
        }

        private readonly sqlite3_stmt _dataVersion;

        /// <summary>What <see cref="DataVersion"/> returned last; none yet at first.</summary>
        public long LastSeenDataVersion { get; set; } = -1;

        /// <summary>SQLite's count of commits by other connections, as this connection sees it.</summary>
        public long DataVersion()
        {
            try
            {
                Step(_dataVersion);
                return raw.sqlite3_column_int64(_dataVersion, 0);
            }
            finally
            {
                raw.sqlite3_reset(_dataVersion);
            }
        }

        /// <summary>Parameters: 1 = deploy id, 2 = user id.</summary>
        public sqlite3_stmt ById { get; }

        /// <summary>Parameters: 1 = user id.</summary>
        public sqlite3_stmt NotDeletedOf { get; }

        /// <summary>Parameters: 1 = user id, 2 = statuses as a JSON array.</summary>
        public sqlite3_stmt WithStatus { get; }

        /// <summary>True with a row to read, false when done.</summary>
        public bool Step(sqlite3_stmt statement)
        {
            var rc = raw.sqlite3_step(statement);
            if (rc is raw.SQLITE_ROW or raw.SQLITE_DONE)
            {
                return rc == raw.SQLITE_ROW;
            }
            SqliteException.ThrowExceptionForRC(rc, _db);
            throw new InvalidOperationException($"SQLite returned {rc}.");
        }

        /// <summary>Ends the statement's read (and its snapshot) so the session can serve the next request.</summary>
        public void Release(sqlite3_stmt statement)
        {
            raw.sqlite3_reset(statement);
            raw.sqlite3_clear_bindings(statement);
        }

        private sqlite3_stmt Prepare(string sql)
        {
            SqliteException.ThrowExceptionForRC(raw.sqlite3_prepare_v2(_db, sql, out var statement), _db);
            return statement;
        }

        public void Dispose()
        {
            ById.Dispose();
            NotDeletedOf.Dispose();
            WithStatus.Dispose();
            _dataVersion.Dispose();
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
/// <c>GET /deploy/{id}</c> and the unfiltered list are batched (<see cref="ReadBatcher{TKey, TValue}"/>): polls that
/// arrive while a query is out share the next one, which costs PostgreSQL and Npgsql about what one poll did.
/// </summary>
public sealed class PostgresDeployReads : DeployReads, IDisposable
{
    /// <summary>
    /// Session settings of the reads' connections only. Each statement here is best served by one index range already
    /// in the order asked for, whoever the caller is. Left alone, PostgreSQL plans the list again on every call
    /// (its generic plan, costed for the average user, looks worse than a custom one), and for a caller with
    /// 10,000 deploys picks a bitmap scan and a sort: 17–19 ms, where walking <c>IX_deploys_UserId_CreatedAt_Id</c>
    /// backwards takes 6–9 ms (docs/benchmarks.md). So: plan once, and price sorts and bitmap scans out of reach
    /// (they stay possible should an index be missing; the settings only make them look expensive).
    /// </summary>
    public const string PlannerSettings = "-c plan_cache_mode=force_generic_plan -c enable_sort=off -c enable_bitmapscan=off";

    /// <summary>
    /// Batched queries out at once. One: a lookup that arrives while a batch is out waits for it and goes in the
    /// next, so under load each query answers every poll that arrived meanwhile. Measured against two, four and
    /// eight (docs/benchmarks.md), one cost the least per request; it still answers a lone lookup at once.
    /// </summary>
    private const int MaxRunningBatches = 1;

    /// <summary>The rows a caller's list may have and still be answered from a batch.</summary>
    internal const int BatchedListRows = 100;

    private readonly NpgsqlDataSource _dataSource;
    private readonly ReadBatcher<(string Id, long UserId), DeployJson> _byId;
    private readonly ReadBatcher<long, BatchedList> _lists;

    public PostgresDeployReads(string connectionString) : base("= ANY(@statuses)")
    {
        var builder = new NpgsqlDataSourceBuilder(connectionString);
        builder.ConnectionStringBuilder.Multiplexing = true;
        builder.ConnectionStringBuilder.NoResetOnClose = true;
        builder.ConnectionStringBuilder.MaxAutoPrepare = Math.Max(builder.ConnectionStringBuilder.MaxAutoPrepare, 8);
        builder.ConnectionStringBuilder.Options = $"{builder.ConnectionStringBuilder.Options} {PlannerSettings}".Trim();
        _dataSource = builder.Build();

        ByIdsSql = Select + "WHERE \"Id\" = ANY(@ids)";
        // Each caller's rows as the single list reads them; the outer ORDER BY states the order the nested loop gives
        // (PostgreSQL knows the callers come in ordinality order and only sorts within each caller's rows).
        NotDeletedOfManySql = "SELECT d.* FROM unnest(@users) WITH ORDINALITY AS k(\"UserId\", \"Caller\") CROSS JOIN LATERAL (" +
            Select + $"WHERE \"UserId\" = k.\"UserId\" AND \"Status\" <> '{DeployStatus.Deleted}'" + ListOrder + " LIMIT @rows) d " +
            "ORDER BY k.\"Caller\", d.\"CreatedAt\" DESC, d.\"Id\" DESC";
        _byId = new ReadBatcher<(string Id, long UserId), DeployJson>(ReadByIdsAsync, MaxRunningBatches, maxBatch: 256);
        _lists = new ReadBatcher<long, BatchedList>(ReadListsAsync, MaxRunningBatches, maxBatch: 64);
    }

    /// <summary>Parameters: <c>@ids</c>, the deploy ids of one batch's lookups.</summary>
    internal string ByIdsSql { get; }

    /// <summary>Parameters: <c>@users</c>, the callers of one batch, and <c>@rows</c>, the rows to read for each.</summary>
    internal string NotDeletedOfManySql { get; }

    public override ValueTask<DeployJson?> ByIdAsync(string id, long userId, CancellationToken ct) =>
        new(_byId.GetAsync((id, userId)).WaitAsync(ct));

    /// <summary>
    /// One query for a batch of lookups. A row answers the lookup of its own id and owner only, so a caller asking
    /// for someone else's deploy finds nothing, exactly as the single-row statement's owner condition did.
    /// </summary>
    private async Task<IReadOnlyDictionary<(string Id, long UserId), DeployJson>> ReadByIdsAsync(IReadOnlyCollection<(string Id, long UserId)> lookups)
    {
        var ids = new string[lookups.Count];
        var at = 0;
        foreach (var lookup in lookups)
        {
            ids[at++] = lookup.Id;
        }
        await using var command = _dataSource.CreateCommand(ByIdsSql);
        command.Parameters.Add(new NpgsqlParameter<string[]>("ids", ids));
        await using var reader = await command.ExecuteReaderAsync();
        var found = new Dictionary<(string Id, long UserId), DeployJson>(lookups.Count);
        while (await reader.ReadAsync())
        {
            found[(reader.GetString(0), reader.GetInt64(13))] = Render<DbDataReader>(reader, WriteRow);
        }
        return found;
    }

    public override async Task WriteListAsync(long userId, IReadOnlyCollection<string>? statuses, DeployListOutput output, CancellationToken ct)
    {
        if (statuses is null)
        {
            var batched = await _lists.GetAsync(userId).WaitAsync(ct);
            if (batched is null)
            {
                output.Write("[]"u8);
                await output.CompleteAsync(ct);
                return;
            }
            if (batched.Json is { } json)
            {
                output.Write(json.WrittenSpan);
                await output.CompleteAsync(ct);
                return;
            }
            // Longer than a batch carries: the caller's own query streams it, in a snapshot of its own.
        }
        await StreamListAsync(userId, statuses, output, ct);
    }

    /// <summary>
    /// One query for the lists of a batch of callers: each caller's first <see cref="BatchedListRows"/> + 1 rows,
    /// walked from its range of <c>IX_deploys_UserId_CreatedAt_Id</c> as the single list is, in the callers' order.
    /// A list is answered from the batch only when it is whole in it and fits one chunk.
    /// </summary>
    private async Task<IReadOnlyDictionary<long, BatchedList>> ReadListsAsync(IReadOnlyCollection<long> userIds)
    {
        await using var command = _dataSource.CreateCommand(NotDeletedOfManySql);
        command.Parameters.Add(new NpgsqlParameter<long[]>("users", [.. userIds]));
        command.Parameters.Add(new NpgsqlParameter<int>("rows", BatchedListRows + 1));
        await using var reader = await command.ExecuteReaderAsync();
        var lists = new Dictionary<long, BatchedList>(userIds.Count);
        BatchedList? list = null;
        var rows = 0;
        while (await reader.ReadAsync())
        {
            var userId = reader.GetInt64(13);
            if (list is null || list.UserId != userId)
            {
                list?.End();
                list = lists[userId] = new BatchedList(userId);
                rows = 0;
            }
            if (list.Writer is not { } json)
            {
                continue;
            }
            WriteRow(reader, json);
            // A list longer than a chunk goes out chunked from a query of its own, as it would have without batching.
            if (++rows > BatchedListRows || json.BytesCommitted + json.BytesPending > DeployListOutput.ChunkBytes)
            {
                list.Overflow();
            }
        }
        list?.End();
        return lists;
    }

    /// <summary>A caller's list from a batch, written as its rows arrive.</summary>
    private sealed class BatchedList
    {
        public BatchedList(long userId)
        {
            UserId = userId;
            Writer = new Utf8JsonWriter(Json!, DeployJsonWriter.Options);
            Writer.WriteStartArray();
        }

        public long UserId { get; }

        /// <summary>The JSON array once ended; null when the list was too long to be answered from the batch.</summary>
        public ArrayBufferWriter<byte>? Json { get; private set; } = new(4096);

        /// <summary>Where the next row goes; null once the list is ended or too long.</summary>
        public Utf8JsonWriter? Writer { get; private set; }

        public void Overflow()
        {
            Writer?.Dispose();
            Writer = null;
            Json = null;
        }

        public void End()
        {
            Writer?.WriteEndArray();
            Writer?.Dispose();
            Writer = null;
        }
    }

    private async Task StreamListAsync(long userId, IReadOnlyCollection<string>? statuses, DeployListOutput output, CancellationToken ct)
    {
        await using var command = _dataSource.CreateCommand(statuses is null ? NotDeletedOfSql : WithStatusSql);
        command.Parameters.Add(new NpgsqlParameter<long>("user", userId));
        if (statuses is not null)
        {
            command.Parameters.Add(new NpgsqlParameter<string[]>("statuses", [.. statuses]));
        }
        await using var reader = await command.ExecuteReaderAsync(ct);
        await using var json = new Utf8JsonWriter(output, DeployJsonWriter.Options);
        json.WriteStartArray();
        var until = (long)DeployListOutput.ChunkBytes;
        while (await reader.ReadAsync(ct))
        {
            WriteRow(reader, json);
            if (json.BytesCommitted + json.BytesPending >= until)
            {
                if (!await output.FlushAsync(json, ct))
                {
                    return;
                }
                until = json.BytesCommitted + DeployListOutput.ChunkBytes;
            }
        }
        json.WriteEndArray();
        await output.CompleteAsync(json, ct);
    }

    /// <summary>
    /// Npgsql hands text over as strings; they are encoded once into one scratch buffer for the row. Timestamps are
    /// formatted here, not with to_char: a timestamptz arrives as 8 binary bytes, and to_char cost the database
    /// more than the formatting costs us.
    /// </summary>
    private static void WriteRow(DbDataReader row, Utf8JsonWriter json)
    {
        string id = row.GetString(0), modelName = row.GetString(1), version = row.GetString(2), task = row.GetString(3),
            status = row.GetString(4), failReason = row.GetString(5), type = row.GetString(12);
        var length = Encoding.UTF8.GetMaxByteCount(id.Length + modelName.Length + version.Length + task.Length +
            status.Length + failReason.Length + type.Length) + 2 * TimestampLength;
        byte[]? rented = null;
        var scratch = length <= 1024 ? stackalloc byte[1024] : (rented = ArrayPool<byte>.Shared.Rent(length));
        try
        {
            var at = 0;
            DeployJsonWriter.Write(json, new DeployRow
            {
                Id = Encode(id, scratch, ref at),
                ModelName = Encode(modelName, scratch, ref at),
                Version = Encode(version, scratch, ref at),
                Task = Encode(task, scratch, ref at),
                Status = Encode(status, scratch, ref at),
                FailReason = Encode(failReason, scratch, ref at),
                CreatedAt = Timestamp(row.GetFieldValue<DateTime>(6), scratch, ref at),
                UpdatedAt = Timestamp(row.GetFieldValue<DateTime>(7), scratch, ref at),
                RunningInstances = row.GetInt32(8),
                PendingInstances = row.GetInt32(9),
                MinInstances = row.GetInt32(10),
                MaxInstances = row.GetInt32(11),
                Type = Encode(type, scratch, ref at),
            });
        }
        finally
        {
            if (rented is not null)
            {
                ArrayPool<byte>.Shared.Return(rented);
            }
        }
    }

    private static ReadOnlySpan<byte> Encode(string text, Span<byte> scratch, ref int at)
    {
        var start = at;
        at += Encoding.UTF8.GetBytes(text, scratch[at..]);
        return scratch[start..at];
    }

    /// <summary>Like <see cref="Timestamps.Format"/>, into UTF-8.</summary>
    private static ReadOnlySpan<byte> Timestamp(DateTime utc, Span<byte> scratch, ref int at)
    {
        var start = at;
        if (!utc.TryFormat(scratch[at..], out var written, Timestamps.Pattern, System.Globalization.CultureInfo.InvariantCulture))
        {
            throw new InvalidOperationException("A timestamp did not fit its buffer.");
        }
        at += written;
        return scratch[start..at];
    }

    public void Dispose() => _dataSource.Dispose();
}
