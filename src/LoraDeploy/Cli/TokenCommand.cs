using System.CommandLine;
using LoraDeploy.Auth;
using LoraDeploy.Data;
using LoraDeploy.Loras;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Cli;

/// <summary>
/// <c>loradeploy token create (--user NAME | --worker NAME) [--data-dir DIR]</c>: works beside a running server on the
/// same data. A worker token is its own credential kind (see <see cref="WorkerTokens"/>).
/// </summary>
internal static class TokenCommand
{
    public static Command Create()
    {
        var user = new Option<string?>("--user") { Description = "User name (created if new)." };
        var worker = new Option<string?>("--worker") { Description = "Worker name: a token for `loradeploy worker` (replaces that worker's earlier token)." };
        var label = new Option<string?>("--label") { Description = "A note to remember the token by." };
        var dataDir = new Option<string?>("--data-dir") { Description = "Data folder (default ./data)." };
        var create = new Command("create", "Create an API token; prints it as the last line (shown once).") { user, worker, label, dataDir };
        create.TreatUnmatchedTokensAsErrors = false;
        create.SetAction(async (result, ct) =>
        {
            var (userName, workerName) = (result.GetValue(user), result.GetValue(worker));
            if ((userName is null) == (workerName is null))
            {
                await Console.Error.WriteLineAsync("error: give exactly one of --user NAME or --worker NAME.");
                return 2;
            }
            var name = userName ?? workerName!;
            var kind = userName is null ? "worker" : "user";
            if (!LoraNames.IsValid(name))
            {
                await Console.Error.WriteLineAsync($"error: '{name}' is not a valid {kind} name (1-64 of letters, digits, '.', '_', '-', starting alphanumeric).");
                return 2;
            }
            var args = ServeCommand.HostArgs(result, dataDir, result.UnmatchedTokens);
            var builder = Host.CreateApplicationBuilder(new Microsoft.Extensions.Hosting.HostApplicationBuilderSettings { Args = [.. args], ContentRootPath = AppContext.BaseDirectory });
            builder.Logging.ClearProviders();
            builder.Services.AddSingleton(TimeProvider.System);
            builder.Services.AddDatabase(builder.Configuration);
            using var host = builder.Build();
            Console.Out.WriteLine(DataDirectory.Describe(builder.Configuration));
            try
            {
                await host.Services.GetRequiredService<DatabaseMigrator>().MigrateAsync(ct);
            }
            catch (DatabaseStartException e)
            {
                await Console.Error.WriteLineAsync($"error: {e.Message}");
                return 1;
            }
            await using var db = await host.Services.GetRequiredService<IDbContextFactory<LoraDeployDbContext>>().CreateDbContextAsync(ct);
            var now = host.Services.GetRequiredService<TimeProvider>().GetUtcNow().UtcDateTime;
            if (workerName is not null)
            {
                var workerToken = await WorkerTokens.CreateAsync(db, workerName, now, ct);
                Console.Out.WriteLine($"Created a token for worker '{workerName}' (shown once; use it with `loradeploy worker --token`):");
                Console.Out.WriteLine(workerToken);
                return 0;
            }
            string token;
            try
            {
                token = await ApiTokens.CreateForUserAsync(db, name, isAdmin: false, result.GetValue(label), now, ct);
            }
            catch (DbUpdateException e) when (db.IsUniqueViolation(e))
            {
                db.ChangeTracker.Clear(); // the user was created concurrently; issue the token for it
                token = await ApiTokens.CreateForUserAsync(db, name, isAdmin: false, result.GetValue(label), now, ct);
            }
            Console.Out.WriteLine($"Created a token for user '{name}' (shown once):");
            Console.Out.WriteLine(token);
            return 0;
        });
        return new Command("token", "Manage API tokens.") { create };
    }
}
