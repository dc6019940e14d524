using System.CommandLine;
using LoraDeploy.Auth;
using LoraDeploy.Workers.Host;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Cli;

/// <summary>
/// <c>loradeploy worker --server URL --token WORKER_TOKEN [--urls LISTEN] [--data-dir DIR] [--Section:Key=value …]</c>:
/// serves every pool of the registry whose engine this build has. Listens on <see cref="WorkerHost.DefaultUrls"/>
/// unless told otherwise; <c>Worker:AdvertiseUrl</c> sets the address the server calls when it differs.
/// </summary>
internal static class WorkerCommand
{
    /// <summary>The engines a worker process has (created per run): llama.cpp in-process and ComfyUI over HTTP.</summary>
    internal static IReadOnlyList<IServingEngine> CreateEngines() =>
        WorkerHost.CreateEngines([BaseModels.Engines.LlamaCpp, BaseModels.Engines.ComfyUi], LoggerFactory.Create(logging => logging.AddSimpleConsole(console =>
        {
            console.SingleLine = true;
            console.TimestampFormat = "yyyy-MM-ddTHH:mm:ss.fffZ ";
            console.UseUtcTimestamp = true;
        })));

    public static Command Create()
    {
        var server = new Option<string>("--server") { Description = "The LoraDeploy server's URL (http or https).", Required = true };
        var token = new Option<string>("--token") { Description = "A worker token (ldw_…) from `loradeploy token create --worker NAME`.", Required = true };
        var urls = new Option<string?>("--urls") { Description = $"Address to listen on (default {WorkerHost.DefaultUrls})." };
        var dataDir = new Option<string?>("--data-dir") { Description = "Data folder: worker id and adapter cache (default ./data)." };
        var command = new Command("worker", "Run a worker: load base models, fetch adapters, serve inference for the server. Any setting can be given as --Section:Key=value.")
        {
            server,
            token,
            urls,
            dataDir,
        };
        command.TreatUnmatchedTokensAsErrors = false;
        command.SetAction(async (result, ct) =>
        {
            var serverUrl = result.GetValue(server)!;
            if (!WorkerOptions.IsHttpUrl(serverUrl))
            {
                await Console.Error.WriteLineAsync($"error: --server '{serverUrl}' is not an http(s) URL (e.g. http://10.0.0.5:8080).");
                return 2;
            }
            var workerToken = result.GetValue(token)!;
            if (!WorkerTokens.TryParse(workerToken, out _))
            {
                await Console.Error.WriteLineAsync("error: --token is not a worker token (ldw_…): create one with `loradeploy token create --worker NAME`.");
                return 2;
            }
            var args = ServeCommand.HostArgs(result, dataDir, result.UnmatchedTokens);
            args.AddRange([$"--{WorkerOptions.Section}:Server={serverUrl}", $"--{WorkerOptions.Section}:Token={workerToken}"]);
            if (result.GetValue(urls) is { } listen)
            {
                args.AddRange(["--urls", listen]);
            }
            else if (Environment.GetEnvironmentVariable("ASPNETCORE_URLS") is null && !args.Any(a => a.StartsWith("--urls", StringComparison.Ordinal)))
            {
                args.AddRange(["--urls", WorkerHost.DefaultUrls]);
            }
            try
            {
                await using var app = WorkerHost.Build([.. args], CreateEngines());
                Console.Out.WriteLine(DataDirectory.Describe(app.Configuration));
                await WorkerHost.RunAsync(app, ct);
            }
            catch (OptionsValidationException e)
            {
                foreach (var failure in e.Failures)
                {
                    await Console.Error.WriteLineAsync($"error: {failure}");
                }
                return 2;
            }
            catch (WorkerStoppedException e)
            {
                await Console.Error.WriteLineAsync($"error: {e.Message}");
                return 1;
            }
            return 0;
        });
        return command;
    }
}
