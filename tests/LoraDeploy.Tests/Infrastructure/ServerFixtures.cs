namespace LoraDeploy.Tests;

/// <summary>One server per test class (tests isolate themselves with fresh users). The pipeline is off: these
/// tests drive statuses themselves.</summary>
public abstract class ServerFixture(TestDatabase database) : IAsyncLifetime
{
    private LoraDeployServer? _server;
    private Exception? _startFailure;

    public static readonly Dictionary<string, string?> ControlPlaneOnly = new() { ["Pipeline:Enabled"] = "false" };

    public LoraDeployServer Server
    {
        get
        {
            if (database == TestDatabase.Postgres)
            {
                TestBackend.RequirePostgres();
            }
            if (_startFailure is not null)
            {
                throw new InvalidOperationException("The test server failed to start.", _startFailure);
            }
            return _server!;
        }
    }

    public async ValueTask InitializeAsync()
    {
        if (database == TestDatabase.Postgres && string.IsNullOrWhiteSpace(Environment.GetEnvironmentVariable(TestBackend.PostgresVariable)))
        {
            return; // each test skips (or fails under CI) when it asks for the server
        }
        try
        {
            _server = await LoraDeployServer.StartAsync(database, ControlPlaneOnly);
        }
        catch (Exception e)
        {
            _startFailure = e;
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (_server is not null)
        {
            await _server.DisposeAsync();
        }
    }
}

public sealed class SqliteServerFixture() : ServerFixture(TestDatabase.Sqlite);

public sealed class PostgresServerFixture() : ServerFixture(TestDatabase.Postgres);
