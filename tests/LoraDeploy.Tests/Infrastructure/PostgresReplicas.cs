using LoraDeploy.Auth;
using LoraDeploy.Data;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests;

/// <summary>
/// Two <c>loradeploy serve</c> processes (<see cref="A"/>, <see cref="B"/>) on one throwaway PostgreSQL database, each
/// with its own data folder (nothing of the shared state lives there), started at the same moment. By default the
/// pipeline is off and both share one blob folder; the caller's settings go on top. Creating the database comes first, so without PostgreSQL the test skips (or fails under CI) there.
/// </summary>
public sealed class PostgresReplicas : IAsyncDisposable
{
    private readonly string _root;

    private PostgresReplicas(string connectionString, string root, IReadOnlyDictionary<string, string?> settings, ServerProcess a, ServerProcess b)
    {
        ConnectionString = connectionString;
        _root = root;
        Settings = settings;
        A = a;
        B = b;
    }

    public string ConnectionString { get; }
    /// <summary>What both replicas were started with.</summary>
    public IReadOnlyDictionary<string, string?> Settings { get; }
    /// <summary>The blob folder both replicas share (unless the settings store blobs elsewhere).</summary>
    public string StoragePath => Settings["Storage:Path"]!;
    public string Logs => $"--- replica A (pid {A.ProcessId}) ---\n{A.Output}\n--- replica B (pid {B.ProcessId}) ---\n{B.Output}";
    public ServerProcess A { get; }
    public ServerProcess B { get; }

    public static async Task<PostgresReplicas> StartAsync(IDictionary<string, string?>? settings = null)
    {
        var connectionString = await TestBackend.CreatePostgresDatabaseAsync();
        var root = Path.Combine(Path.GetTempPath(), "loradeploy-tests", Guid.NewGuid().ToString("N"));
        var all = new Dictionary<string, string?>
        {
            ["Pipeline:Enabled"] = "false",
            ["Storage:Path"] = Path.Combine(root, "blobs"),
            ["Logging:LogLevel:Default"] = "Warning",
        };
        foreach (var (key, value) in settings ?? new Dictionary<string, string?>())
        {
            all[key] = value;
        }
        all["Database:Provider"] = "postgres";
        all["ConnectionStrings:Postgres"] = connectionString;
        var dirs = new[] { Path.Combine(root, "a"), Path.Combine(root, "b") };
        foreach (var dir in dirs)
        {
            Directory.CreateDirectory(dir);
        }
        var starts = dirs.Select(dir => ServerProcess.StartAsync(dir, all)).ToArray();
        try
        {
            await Task.WhenAll(starts);
        }
        catch
        {
            foreach (var start in starts.Where(s => s.IsCompletedSuccessfully))
            {
                await start.Result.DisposeAsync();
            }
            await TestBackend.DropPostgresDatabaseAsync(connectionString);
            DeleteQuietly(root);
            throw;
        }
        return new PostgresReplicas(connectionString, root, all, starts[0].Result, starts[1].Result);
    }

    public PostgresLoraDeployContext OpenDatabase()
    {
        var options = new DbContextOptionsBuilder<PostgresLoraDeployContext>();
        DatabaseExtensions.ConfigurePostgres(options, ConnectionString);
        return new PostgresLoraDeployContext(options.Options);
    }

    /// <summary>A user's API token, written straight into the shared database.</summary>
    public async Task<string> CreateTokenAsync(string user)
    {
        await using var db = OpenDatabase();
        return await ApiTokens.CreateForUserAsync(db, user, isAdmin: false, "test", DateTime.UtcNow, CancellationToken.None);
    }

    public async ValueTask DisposeAsync()
    {
        await A.DisposeAsync();
        await B.DisposeAsync();
        await TestBackend.DropPostgresDatabaseAsync(ConnectionString);
        DeleteQuietly(_root);
    }

    private static void DeleteQuietly(string root)
    {
        try
        {
            Directory.Delete(root, recursive: true);
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
    }
}
