using System.CommandLine;
using LoraDeploy.Data;

namespace LoraDeploy.Cli;

/// <summary><c>loradeploy serve [--urls URL] [--data-dir DIR] [--Section:Key=value …]</c>.</summary>
internal static class ServeCommand
{
    public const string DefaultUrls = "http://127.0.0.1:8080";

    public static Command Create()
    {
        var urls = new Option<string?>("--urls") { Description = $"Addresses to listen on (default {DefaultUrls})." };
        var dataDir = new Option<string?>("--data-dir") { Description = "Data folder: SQLite file and blobs (default ./data)." };
        var command = new Command("serve", "Run the LoraDeploy server. Any setting can be given as --Section:Key=value.")
        {
            urls,
            dataDir,
        };
        command.TreatUnmatchedTokensAsErrors = false;
        command.SetAction(async (result, ct) =>
        {
            var args = HostArgs(result, dataDir, result.UnmatchedTokens);
            var listen = result.GetValue(urls);
            if (listen is not null)
            {
                args.AddRange(["--urls", listen]);
            }
            else if (Environment.GetEnvironmentVariable("ASPNETCORE_URLS") is null && !args.Any(a => a.StartsWith("--urls", StringComparison.Ordinal)))
            {
                args.AddRange(["--urls", DefaultUrls]);
            }
            await using var app = ServerApp.Build([.. args]);
            Console.Out.WriteLine(DataDirectory.Describe(app.Configuration));
            try
            {
                await ServerApp.RunAsync(app, ct);
            }
            catch (DatabaseStartException e)
            {
                await Console.Error.WriteLineAsync($"error: {e.Message}");
                return 1;
            }
            return 0;
        });
        return command;
    }

    /// <summary>The arguments handed to the host's configuration: <c>--data-dir</c> plus whatever settings were passed through.</summary>
    internal static List<string> HostArgs(ParseResult result, Option<string?> dataDir, IReadOnlyList<string> passThrough)
    {
        var args = new List<string>(passThrough);
        if (result.GetValue(dataDir) is { } dir)
        {
            args.AddRange([$"--{DataDirectory.Key}", dir]);
        }
        return args;
    }
}
