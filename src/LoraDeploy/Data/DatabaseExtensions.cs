using Microsoft.EntityFrameworkCore.Diagnostics;
using Microsoft.Data.Sqlite;
using Microsoft.EntityFrameworkCore;
using Microsoft.EntityFrameworkCore.Design;

namespace LoraDeploy.Data;

public static class DatabaseExtensions
{
    /// <summary>
    /// Registers the provider context chosen by <c>Database:Provider</c> behind <see cref="LoraDeployDbContext"/>
    /// (scoped, for endpoints) and <see cref="IDbContextFactory{TContext}"/> (for background work).
    /// </summary>
    public static IServiceCollection AddDatabase(this IServiceCollection services, IConfiguration configuration)
    {
        services.AddOptions<DatabaseOptions>().BindConfiguration(DatabaseOptions.Section)
            .ValidateDataAnnotations().ValidateOnStart();
        var options = configuration.GetSection(DatabaseOptions.Section).Get<DatabaseOptions>() ?? new DatabaseOptions();

        switch (options.Provider)
        {
            case DatabaseProvider.Postgres:
                var postgres = configuration.GetConnectionString("Postgres");
                if (string.IsNullOrWhiteSpace(postgres))
                {
                    throw new InvalidOperationException(
                        "Database:Provider is postgres but ConnectionStrings:Postgres is not set.");
                }
                services.AddPooledDbContextFactory<PostgresLoraDeployContext>(db => ConfigurePostgres(db, postgres));
                services.AddSingleton<IDbContextFactory<LoraDeployDbContext>, ContextFactory<PostgresLoraDeployContext>>();
                break;
            default:
                var sqlite = SqliteConnectionString(configuration);
                services.AddPooledDbContextFactory<SqliteLoraDeployContext>(db => ConfigureSqlite(db, sqlite));
                services.AddSingleton<IDbContextFactory<LoraDeployDbContext>, ContextFactory<SqliteLoraDeployContext>>();
                break;
        }

        services.AddScoped(sp => sp.GetRequiredService<IDbContextFactory<LoraDeployDbContext>>().CreateDbContext());
        services.AddSingleton<DatabaseMigrator>();
        return services;
    }

    /// <summary><c>ConnectionStrings:Sqlite</c>, else <c>DATA_DIR/loradeploy.db</c>.</summary>
    public static string SqliteConnectionString(IConfiguration configuration)
    {
        var configured = configuration.GetConnectionString("Sqlite");
        if (!string.IsNullOrWhiteSpace(configured))
        {
            return configured;
        }
        var dataDir = DataDirectory.Get(configuration);
        return new SqliteConnectionStringBuilder
        {
            DataSource = Path.Combine(dataDir, "loradeploy.db"),
            Pooling = true,
            DefaultTimeout = 30,
        }.ToString();
    }

    internal static void ConfigureSqlite(DbContextOptionsBuilder db, string connectionString) =>
        db.UseSqlite(connectionString, sqlite => sqlite.MigrationsAssembly(typeof(SqliteLoraDeployContext).Assembly.FullName))
            .UseQueryTrackingBehavior(QueryTrackingBehavior.NoTracking)
            // SQLite cannot add a foreign key in place: EF rebuilds such tables with PRAGMA foreign_keys off, which it
            // warns cannot run in a transaction — on every first start of an empty database. The README's upgrade
            // note says to copy the data folder before upgrading, which is the remedy the warning asks for.
            .ConfigureWarnings(warnings => warnings.Ignore(RelationalEventId.NonTransactionalMigrationOperationWarning));

    internal static void ConfigurePostgres(DbContextOptionsBuilder db, string connectionString) =>
        db.UseNpgsql(connectionString)
            .UseQueryTrackingBehavior(QueryTrackingBehavior.NoTracking);

    /// <summary>Hands out the provider context as the shared base type.</summary>
    private sealed class ContextFactory<TContext>(IDbContextFactory<TContext> inner) : IDbContextFactory<LoraDeployDbContext>
        where TContext : LoraDeployDbContext
    {
        public LoraDeployDbContext CreateDbContext() => inner.CreateDbContext();
    }
}

/// <summary>Used by <c>dotnet ef</c> only.</summary>
internal sealed class SqliteDesignTimeFactory : IDesignTimeDbContextFactory<SqliteLoraDeployContext>
{
    public SqliteLoraDeployContext CreateDbContext(string[] args)
    {
        var builder = new DbContextOptionsBuilder<SqliteLoraDeployContext>();
        DatabaseExtensions.ConfigureSqlite(builder, "Data Source=design.db");
        return new SqliteLoraDeployContext(builder.Options);
    }
}

/// <summary>Used by <c>dotnet ef</c> only.</summary>
internal sealed class PostgresDesignTimeFactory : IDesignTimeDbContextFactory<PostgresLoraDeployContext>
{
    public PostgresLoraDeployContext CreateDbContext(string[] args)
    {
        var builder = new DbContextOptionsBuilder<PostgresLoraDeployContext>();
        DatabaseExtensions.ConfigurePostgres(builder, "Host=localhost;Database=design");
        return new PostgresLoraDeployContext(builder.Options);
    }
}
