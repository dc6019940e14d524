using System.CommandLine;
using System.Text.Json;
using Spectre.Console;

namespace LoraDeploy.Cli.Client;

/// <summary><c>loradeploy workers</c>: the server's workers (admin token), with pools, slots, resident adapters and heartbeat.</summary>
internal static class WorkersCommand
{
    public static Command Create()
    {
        var common = new CommonOptions();
        var command = new Command("workers", "List the server's workers: pools, slots, resident adapters, last heartbeat (admin token).");
        common.AddTo(command);
        command.SetAction(DeployCommands.Run(common, async (r, ctx, client, output, ct) =>
        {
            var response = await client.GetAsync("v1/workers", ct).ConfigureAwait(false);
            if (ctx.Json)
            {
                output.Out.WriteLine(response.Text.Trim());
                return ExitCodes.Ok;
            }
            var workers = response.Json.ValueKind == JsonValueKind.Array ? response.Json.EnumerateArray().ToList() : [];
            if (workers.Count == 0)
            {
                output.Line("no workers");
                return ExitCodes.Ok;
            }
            string[] headers = ["WORKER", "ENGINE", "POOLS", "SLOTS", "QUEUE", "RESIDENT", "LAST HEARTBEAT"];
            var rows = workers.Select(static w => new[]
            {
                $"{w.Str("id")} ({w.Str("name")})",
                w.Str("engine"),
                string.Join(", ", w.Strings("pools")),
                $"{w.Long("busy_slots") ?? 0}/{w.Long("slots") ?? 0}",
                (w.Long("queue_depth") ?? 0).ToString(System.Globalization.CultureInfo.InvariantCulture),
                string.Join(" ", w.Strings("resident").Select(static r => Json.ShortHash(r[(r.LastIndexOf('|') + 1)..]))),
                w.Str("last_heartbeat_at"),
            }).ToList();
            if (output.Interactive)
            {
                var table = new Table().Border(TableBorder.Rounded);
                foreach (var h in headers)
                {
                    table.AddColumn(h);
                }
                foreach (var row in rows)
                {
                    table.AddRow(row.Select(Markup.Escape).ToArray());
                }
                output.Console.Write(table);
            }
            else
            {
                var widths = headers.Select((h, i) => Math.Max(h.Length, rows.Max(row => row[i].Length))).ToArray();
                output.Line(string.Join("  ", headers.Select((h, i) => h.PadRight(widths[i]))).TrimEnd());
                foreach (var row in rows)
                {
                    output.Line(string.Join("  ", row.Select((c, i) => c.PadRight(widths[i]))).TrimEnd());
                }
            }
            return ExitCodes.Ok;
        }));
        return command;
    }
}
