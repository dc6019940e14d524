using Npgsql;

namespace LoraDeploy.Tests;

/// <summary>Which database a test server runs on.</summary>
public enum TestDatabase
{
    Sqlite,
    Postgres,
}

/// <summary>
/// PostgreSQL is found through <c>LORADEPLOY_TEST_POSTGRES</c> (a connection string to a server where we may create
/// databases). Unset: PostgreSQL tests are skipped, except under <c>CI=true</c>, where a missing service is a failure.
/// </summary>
public static class TestBackend
{
    public const string PostgresVariable = "LORADEPLOY_TEST_POSTGRES";

    public static bool IsCi => string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase);

    public static string RequirePostgres()
    {
        var connection = Environment.GetEnvironmentVariable(PostgresVariable);
        if (!string.IsNullOrWhiteSpace(connection))
        {
            return connection;
        }
        if (IsCi)
        {
            Assert.Fail($"CI=true but {PostgresVariable} is not set: .ci/run must start PostgreSQL for these tests.");
        }
        Assert.Skip($"PostgreSQL tests need {PostgresVariable} (a connection string); skipped.");
        return "";
    }

    /// <summary>Creates an empty database for one test server and returns its connection string.</summary>
    public static async Task<string> CreatePostgresDatabaseAsync()
    {
        var server = RequirePostgres();
        var name = $"ld_test_{Guid.NewGuid():N}";
        await using (var connection = new NpgsqlConnection(server))
        {
            await connection.OpenAsync();
            await using var command = new NpgsqlCommand($"CREATE DATABASE \"{name}\"", connection);
            await command.ExecuteNonQueryAsync();
        }
        return new NpgsqlConnectionStringBuilder(server) { Database = name }.ToString();
    }

    public static async Task DropPostgresDatabaseAsync(string connectionString)
    {
        var builder = new NpgsqlConnectionStringBuilder(connectionString);
        var name = builder.Database;
        NpgsqlConnection.ClearAllPools();
        builder.Database = "postgres";
        await using var connection = new NpgsqlConnection(builder.ToString());
        await connection.OpenAsync();
        await using var command = new NpgsqlCommand($"DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)", connection);
        await command.ExecuteNonQueryAsync();
    }
}
