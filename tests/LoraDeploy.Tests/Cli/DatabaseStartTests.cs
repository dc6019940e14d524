using LoraDeploy.Tests.Dashboard;
using Npgsql;

namespace LoraDeploy.Tests.Cli;

/// <summary>
/// <c>serve</c> against a database it cannot use says in one line what is wrong and what to do, and exits 1; a
/// first start logs no failed commands.
/// </summary>
public sealed class DatabaseStartTests : IDisposable
{
    private readonly string _dataDir = Path.Combine(Path.GetTempPath(), "loradeploy-tests", Guid.NewGuid().ToString("N"));

    public DatabaseStartTests() => Directory.CreateDirectory(_dataDir);

    public void Dispose() => Directory.Delete(_dataDir, recursive: true);

    private Task<CliResult> ServeAsync(string postgres) => LoraDeployExe.RunAsync(
        ["serve", "--urls", $"http://127.0.0.1:{ServerProcess.FreePort()}", "--data-dir", _dataDir,
         "--Database:Provider=postgres", $"--ConnectionStrings:Postgres={postgres}", "--Pipeline:Enabled=false"]);

    /// <summary>Exit 1, and stderr is the one line (no stack trace, no logged exception anywhere).</summary>
    private static string OneErrorLine(CliResult result)
    {
        Assert.True(result.ExitCode == 1, result.ToString());
        var line = Assert.Single(result.StdErr.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries));
        Assert.StartsWith("error: ", line);
        Assert.DoesNotContain("   at ", result.StdOut + result.StdErr);
        Assert.DoesNotContain("Exception", result.StdOut + result.StdErr);
        return line;
    }

    [Fact]
    public async Task A_server_that_is_not_running_is_one_line_and_exit_1()
    {
        var port = ServerProcess.FreePort(); // nothing listens there

        var result = await ServeAsync($"Host=127.0.0.1;Port={port};Username=loradeploy;Password=x;Database=loradeploy");

        var line = OneErrorLine(result);
        Assert.Contains($"cannot connect to PostgreSQL at 127.0.0.1:{port} (connection refused; is the server running?)", line);
        Assert.Contains("ConnectionStrings:Postgres", line);
    }

    [Fact]
    public async Task A_missing_database_the_user_may_not_create_is_one_line_and_exit_1()
    {
        var admin = TestBackend.RequirePostgres();
        var role = $"ld_nocreate_{Guid.NewGuid():N}"[..24];
        await ExecuteAsync(admin, $"CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw' NOCREATEDB");
        try
        {
            var missing = $"ld_missing_{Guid.NewGuid():N}";
            var connection = new NpgsqlConnectionStringBuilder(admin) { Username = role, Password = "pw", Database = missing, Pooling = false };

            var result = await ServeAsync(connection.ToString());

            var line = OneErrorLine(result);
            Assert.Contains($"the PostgreSQL database '{missing}' does not exist", line);
            Assert.Contains($"user '{role}' may not create it", line);
            Assert.Contains("createdb", line);
            Assert.DoesNotContain("Failed executing DbCommand", result.StdOut); // the one line is all there is
        }
        finally
        {
            NpgsqlConnection.ClearAllPools();
            await ExecuteAsync(admin, $"DROP ROLE IF EXISTS \"{role}\"");
        }
    }

    [Fact]
    public async Task A_missing_database_is_created_when_the_user_may_and_the_first_start_logs_no_failed_command()
    {
        var admin = TestBackend.RequirePostgres();
        var connection = new NpgsqlConnectionStringBuilder(admin) { Database = $"ld_test_{Guid.NewGuid():N}" }.ToString();
        try
        {
            await using var server = await ServerProcess.StartAsync(_dataDir, new Dictionary<string, string?>
            {
                ["Pipeline:Enabled"] = "false",
                ["Database:Provider"] = "postgres",
                ["ConnectionStrings:Postgres"] = connection,
            });

            Assert.Contains("Created the PostgreSQL database", server.Output);
            Assert.DoesNotContain("Failed executing DbCommand", server.Output);
            Assert.DoesNotContain("fail:", server.Output);
        }
        finally
        {
            await TestBackend.DropPostgresDatabaseAsync(connection);
        }
    }

    private static async Task ExecuteAsync(string connectionString, string sql)
    {
        await using var connection = new NpgsqlConnection(connectionString);
        await connection.OpenAsync();
        await using var command = new NpgsqlCommand(sql, connection);
        await command.ExecuteNonQueryAsync();
    }
}
