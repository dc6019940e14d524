using System.CommandLine;
using System.Text.Json;
using LoraDeploy.Auth;
using LoraDeploy.Cli.Client;
using LoraDeploy.Data;
using LoraDeploy.Loras;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Cli;

/// <summary>
/// <c>loradeploy token create (--user NAME | --worker NAME) [--data-dir DIR]</c>: works beside a running server on the
/// same data. A worker token is its own credential kind (see <see cref="WorkerTokens"/>).
/// <c>loradeploy token list</c> and <c>token revoke ID</c> are client commands: they manage the caller's own tokens
/// through the HTTP API (<c>/v1/me/tokens</c>) with the caller's token.
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
        return new Command("token", "Manage API tokens.") { create, ListCommand(), RevokeCommand() };
    }

    private static Command ListCommand()
    {
        var common = new CommonOptions();
        var command = new Command("list", "List your API tokens: id, label, created, expires (never the secrets).");
        common.AddTo(command);
        command.SetAction(DeployCommands.Run(common, async (r, ctx, client, output, ct) =>
        {
            var response = await client.GetAsync("v1/me/tokens", ct).ConfigureAwait(false);
            if (ctx.Json)
            {
                output.Out.WriteLine(response.Text.Trim());
                return ExitCodes.Ok;
            }
            var tokens = response.Json.ValueKind == JsonValueKind.Array ? response.Json.EnumerateArray().ToList() : [];
            if (tokens.Count == 0)
            {
                output.Line("no tokens");
                return ExitCodes.Ok;
            }
            string[] headers = ["ID", "LABEL", "CREATED", "EXPIRES", ""];
            var rows = tokens.Select(static t => new[]
            {
                t.Str("id"), t.Str("label"), t.Str("created_at"),
                t.Str("expires_at") is { Length: > 0 } expires ? expires : "never",
                t.TryGetProperty("current", out var current) && current.ValueKind == JsonValueKind.True ? "(this token)" : "",
            }).ToList();
            var widths = headers.Select((h, i) => Math.Max(h.Length, rows.Max(row => row[i].Length))).ToArray();
            output.Line(string.Join("  ", headers.Select((h, i) => h.PadRight(widths[i]))).TrimEnd());
            foreach (var row in rows)
            {
                output.Line(string.Join("  ", row.Select((c, i) => c.PadRight(widths[i]))).TrimEnd());
            }
            return ExitCodes.Ok;
        }));
        return command;
    }

    private static Command RevokeCommand()
    {
        var common = new CommonOptions();
        var id = new Argument<string>("ID") { Description = "The token's id (from `token list`; the part after ld_).", Arity = ArgumentArity.ZeroOrOne };
        var command = new Command("revoke", "Revoke one of your API tokens; it is refused from the next request on.");
        command.Arguments.Add(id);
        common.AddTo(command);
        command.SetAction(DeployCommands.Run(common, async (r, ctx, client, output, ct) =>
        {
            var tokenId = r.GetValue(id)?.Trim();
            if (string.IsNullOrEmpty(tokenId))
            {
                throw new ClientException("give the id of the token to revoke (see `loradeploy token list`)", ExitCodes.Usage);
            }
            // A whole token pasted by mistake: revoke it by its id, and never send its secret in a URL.
            if (ApiTokens.TryParse(tokenId, out var parsed))
            {
                tokenId = parsed.Id;
            }
            await client.DeleteAsync($"v1/me/tokens/{Uri.EscapeDataString(tokenId)}", ct).ConfigureAwait(false);
            if (ctx.Json)
            {
                output.Out.WriteLine(new System.Text.Json.Nodes.JsonObject { ["id"] = tokenId, ["revoked"] = true }.ToJsonString());
            }
            else
            {
                output.Line($"revoked token {tokenId}");
            }
            return ExitCodes.Ok;
        }));
        return command;
    }
}
