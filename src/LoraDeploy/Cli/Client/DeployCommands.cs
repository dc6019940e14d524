using System.CommandLine;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using Spectre.Console;

namespace LoraDeploy.Cli.Client;

/// <summary>The client commands: <c>create</c>, <c>status</c>, <c>list</c>, <c>delete</c>, <c>stop</c>, <c>start</c>, <c>scale</c>.</summary>
internal static partial class DeployCommands
{
    public static Command CreateCommand()
    {
        var common = new CommonOptions();
        var civitai = new Option<string?>("--civitai") { Description = "CivitAI model or version URL (or AIR).", HelpName = "URL" };
        var file = new Option<string?>("--file") { Description = "A local .safetensors LoRA to upload (instead of --civitai).", HelpName = "PATH" };
        var hf = new Option<string?>("--hf") { Description = "Hugging Face repo of a PEFT LoRA adapter (owner/repo[@revision] or URL), for an LLM base model.", HelpName = "REPO" };
        var hfToken = new Option<string?>("--hf-token") { Description = "Hugging Face token for a private or gated repo (default: $HF_TOKEN); used for this import only.", HelpName = "TOKEN" };
        var baseModel = new Option<string?>("--base") { Description = "Base model, e.g. black-forest-labs/FLUX-1-dev (optional with --hf when the server has one LLM pool).", HelpName = "MODEL" };
        var name = new Option<string?>("--name") { Description = "LoRA name: 1-64 of [A-Za-z0-9._-], starting alphanumeric.", HelpName = "NAME" };
        var isPublic = new Option<bool>("--public") { Description = "List the LoRA publicly (private by default)." };
        var description = new Option<string?>("--description") { Description = "Free text shown with the LoRA.", HelpName = "TEXT" };
        var noWait = new Option<bool>("--no-wait") { Description = "Return once the deploy is accepted instead of following it." };
        var timeout = TimeoutOption();

        var command = new Command("create", "Deploy a LoRA from CivitAI or a local file (--file), or a PEFT adapter from Hugging Face with --hf, and follow it until it deploys or fails.");
        foreach (var o in new Option[] { civitai, file, hf, hfToken, baseModel, name, isPublic, description, noWait, timeout })
        {
            command.Options.Add(o);
        }
        common.AddTo(command);

        command.SetAction(Run(common, async (r, ctx, client, output, ct) =>
        {
            var repo = r.GetValue(hf);
            var upload = r.GetValue(file);
            if (new[] { repo, r.GetValue(civitai), upload }.Count(v => v is not null) != 1)
            {
                throw new ClientException("give exactly one of --civitai URL, --file PATH or --hf REPO", ExitCodes.Usage);
            }
            var lora = Required(r.GetValue(name), "--name NAME");
            var limit = r.GetValue(timeout) is { } timeoutText ? Durations.Parse(timeoutText, "--timeout") : (TimeSpan?)null;
            ApiResponse created;
            if (repo is not null)
            {
                if (r.GetValue(isPublic))
                {
                    throw new ClientException("--public is for CivitAI LoRAs; LLM adapters from Hugging Face are private", ExitCodes.Usage);
                }
                var token = r.GetValue(hfToken) ?? Environment.GetEnvironmentVariable("HF_TOKEN");
                created = await client.PostAsync("lora-model", new JsonObject
                {
                    ["hf_model_name"] = repo.Trim(),
                    ["lora_model_name"] = lora,
                    ["base_model_name"] = r.GetValue(baseModel)?.Trim(),
                    ["hf_token"] = string.IsNullOrWhiteSpace(token) ? null : token.Trim(),
                }, ct).ConfigureAwait(false);
            }
            else if (upload is not null)
            {
                if (!File.Exists(upload))
                {
                    throw new ClientException($"--file {upload}: no such file", ExitCodes.Usage);
                }
                created = await client.PostUploadAsync("v1/lora/create", new JsonObject
                {
                    ["lora_name"] = lora,
                    ["base_model"] = Required(r.GetValue(baseModel), "--base MODEL"),
                    ["source"] = new JsonObject { ["type"] = "upload" },
                    ["private"] = !r.GetValue(isPublic),
                    ["description"] = r.GetValue(description) ?? "",
                }, upload, ct).ConfigureAwait(false);
            }
            else
            {
                created = await client.PostAsync("v1/lora/create", new JsonObject
                {
                    ["lora_name"] = lora,
                    ["base_model"] = Required(r.GetValue(baseModel), "--base MODEL"),
                    ["source"] = new JsonObject { ["type"] = "civitai", ["civit_url"] = Required(r.GetValue(civitai), "--civitai URL") },
                    ["private"] = !r.GetValue(isPublic),
                    ["description"] = r.GetValue(description) ?? "",
                }, ct).ConfigureAwait(false);
            }
            var deployId = created.Json.Str("deploy_id");
            var modelName = created.Json.Str("model_name");

            if (r.GetValue(noWait))
            {
                if (ctx.Json)
                {
                    output.Out.WriteLine(created.Text.Trim());
                }
                else
                {
                    output.Markup($"created [bold]{Markup.Escape(modelName)}[/] deploy {Markup.Escape(deployId)} ({Markup.Escape(created.Json.Str("status"))})");
                }
                return ExitCodes.Ok;
            }

            if (!ctx.Json)
            {
                output.Markup($"created [bold]{Markup.Escape(modelName)}[/] deploy {Markup.Escape(deployId)}");
            }
            var watcher = new DeployWatcher(client, output, quiet: ctx.Json);
            var final = await watcher.WatchAsync(Json.LoraNameOf(modelName.Length > 0 ? modelName : lora), limit, ct).ConfigureAwait(false);
            if (ctx.Json)
            {
                var deploy = await client.GetAsync($"deploy/{Uri.EscapeDataString(deployId)}", ct).ConfigureAwait(false);
                output.Out.WriteLine(deploy.Text.Trim());
                return ExitCodeFor(final, output, printReason: true);
            }
            PrintSummary(final, output, showFailReason: false); // the reason is printed once, on stderr
            return ExitCodeFor(final, output, printReason: true);
        }));
        return command;
    }

    public static Command StatusCommand()
    {
        var common = new CommonOptions();
        var target = new Argument<string>("NAME|ID") { Description = "A LoRA name or a deploy id.", Arity = ArgumentArity.ZeroOrOne };
        var watch = new Option<bool>("--watch", "-w") { Description = "Follow the deploy until it deploys or fails." };
        var timeout = TimeoutOption();
        var command = new Command("status", "Show a deploy or LoRA; with --watch follow it live.");
        command.Arguments.Add(target);
        command.Options.Add(watch);
        command.Options.Add(timeout);
        common.AddTo(command);

        command.SetAction(Run(common, async (r, ctx, client, output, ct) =>
        {
            var limit = r.GetValue(timeout) is { } timeoutText ? Durations.Parse(timeoutText, "--timeout") : (TimeSpan?)null;
            var (response, isDeploy) = await FindAsync(client, r.GetValue(target) ?? "", ct).ConfigureAwait(false);
            if (!r.GetValue(watch) || DeployWatcher.IsSettled(response.Json.Str("status")))
            {
                if (ctx.Json)
                {
                    output.Out.WriteLine(response.Text.Trim());
                }
                else
                {
                    var shown = response.Json;
                    if (!isDeploy && shown.Str("deploy_id") is { Length: > 0 } deployId)
                    {
                        // A LoRA's own record has no instances; its deploy has.
                        var deploy = await client.GetAsync($"deploy/{Uri.EscapeDataString(deployId)}", ct).ConfigureAwait(false);
                        shown = Json.WithInstances(shown, deploy.Json);
                    }
                    PrintSummary(shown, output);
                }
                return ExitCodeFor(response.Json, output, printReason: ctx.Json, watched: false);
            }

            var loraName = Json.LoraNameOf(response.Json.Str("model_name"));
            var watcher = new DeployWatcher(client, output, quiet: ctx.Json);
            var final = await watcher.WatchAsync(loraName, limit, ct).ConfigureAwait(false);
            if (ctx.Json)
            {
                var path = isDeploy
                    ? $"deploy/{Uri.EscapeDataString(response.Json.Str("deploy_id"))}"
                    : $"v1/lora/{Uri.EscapeDataString(loraName)}";
                var again = await client.GetAsync(path, ct).ConfigureAwait(false);
                output.Out.WriteLine(again.Text.Trim());
                return ExitCodeFor(final, output, printReason: true);
            }
            PrintSummary(final, output, showFailReason: false); // the reason is printed once, on stderr
            return ExitCodeFor(final, output, printReason: true);
        }));
        return command;
    }

    public static Command ListCommand()
    {
        var common = new CommonOptions();
        var status = new Option<string?>("--status") { Description = "Only these statuses, comma separated (e.g. running,failed).", HelpName = "a,b" };
        var command = new Command("list", "List your deploys, newest first.");
        command.Options.Add(status);
        common.AddTo(command);

        command.SetAction(Run(common, async (r, ctx, client, output, ct) =>
        {
            var filter = r.GetValue(status);
            var path = string.IsNullOrWhiteSpace(filter) ? "deploy/list" : $"deploy/list?status={Uri.EscapeDataString(filter.Trim())}";
            var response = await client.GetAsync(path, ct).ConfigureAwait(false);
            if (ctx.Json)
            {
                output.Out.WriteLine(response.Text.Trim());
                return ExitCodes.Ok;
            }

            var deploys = response.Json.ValueKind == JsonValueKind.Array ? response.Json.EnumerateArray().ToList() : [];
            if (deploys.Count == 0)
            {
                output.Line("no deploys");
                return ExitCodes.Ok;
            }

            string[] headers = ["DEPLOY ID", "NAME", "STATUS", "VERSION", "UPDATED", "FAIL REASON"];
            var rows = deploys.Select(static d => new[]
            {
                d.Str("deploy_id"), d.Str("model_name"), d.Str("status"), Json.ShortHash(d.Str("version")),
                d.Str("updated_at"), d.Str("fail_reason"),
            }).ToList();
            FitLastColumn(headers, rows, output);
            if (output.Interactive)
            {
                var table = new Table().Border(TableBorder.Rounded);
                foreach (var h in headers)
                {
                    table.AddColumn(h);
                }
                foreach (var row in rows)
                {
                    table.AddRow(row.Select((cell, i) => i == 2 ? StatusMarkup(cell) : Markup.Escape(cell)).ToArray());
                }
                output.Console.Write(table);
            }
            else
            {
                var widths = headers.Select((h, i) => Math.Max(h.Length, rows.Max(row => row[i].Length))).ToArray();
                output.Line(Pad(headers, widths));
                foreach (var row in rows)
                {
                    output.Line(Pad(row, widths));
                }
            }
            return ExitCodes.Ok;
        }));
        return command;
    }

    public static Command DeleteCommand()
    {
        var common = new CommonOptions();
        var target = new Argument<string>("NAME|ID") { Description = "A LoRA name or a deploy id.", Arity = ArgumentArity.ZeroOrOne };
        var command = new Command("delete", "Delete a deploy and its LoRA (idempotent).");
        command.Arguments.Add(target);
        common.AddTo(command);

        command.SetAction(Run(common, async (r, ctx, client, output, ct) =>
        {
            var name = r.GetValue(target) ?? "";
            ApiResponse found;
            bool isDeploy;
            try
            {
                (found, isDeploy) = await FindAsync(client, name, ct).ConfigureAwait(false);
            }
            catch (ClientException ex) when (ex.StatusCode == 404)
            {
                // Delete is idempotent: a LoRA that is already gone is no longer found by name, but its deploy is listed.
                if (await FindDeletedAsync(client, name.Trim(), ct).ConfigureAwait(false) is not { } gone)
                {
                    throw;
                }
                if (ctx.Json)
                {
                    output.Out.WriteLine(new JsonObject { ["lora_name"] = name.Trim(), ["deploy_id"] = gone.Str("deploy_id") }.ToJsonString());
                }
                else
                {
                    output.Line($"{gone.Str("model_name")} is already deleted (deploy {gone.Str("deploy_id")})");
                }
                return ExitCodes.Ok;
            }
            var response = isDeploy
                ? await client.DeleteAsync($"deploy/{Uri.EscapeDataString(found.Json.Str("deploy_id"))}", ct).ConfigureAwait(false)
                : await client.DeleteAsync($"v1/lora/{Uri.EscapeDataString(found.Json.Str("lora_name"))}", ct).ConfigureAwait(false);
            if (ctx.Json)
            {
                output.Out.WriteLine(response.Text.Trim());
            }
            else
            {
                output.Line($"deleted {found.Json.Str("model_name")} (deploy {found.Json.Str("deploy_id")})");
            }
            return ExitCodes.Ok;
        }));
        return command;
    }

    public static Command TransitionCommand(string verb, string description)
    {
        var common = new CommonOptions();
        var id = new Argument<string>("NAME|ID") { Description = "A LoRA name or a deploy id.", Arity = ArgumentArity.ZeroOrOne };
        var command = new Command(verb, description);
        command.Arguments.Add(id);
        common.AddTo(command);

        command.SetAction(Run(common, async (r, ctx, client, output, ct) =>
        {
            var (found, _) = await FindAsync(client, r.GetValue(id) ?? "", ct).ConfigureAwait(false);
            var deployId = found.Json.Str("deploy_id");
            var response = await client.PostAsync($"deploy/{Uri.EscapeDataString(deployId)}/{verb}", null, ct).ConfigureAwait(false);
            if (ctx.Json)
            {
                output.Out.WriteLine(response.Text.Trim());
            }
            else
            {
                output.Line($"{(verb == "stop" ? "stopping" : "starting")} deploy {response.Json.Str("deploy_id")}");
            }
            return ExitCodes.Ok;
        }));
        return command;
    }

    public static Command ScaleCommand()
    {
        var common = new CommonOptions();
        var id = new Argument<string>("NAME|ID") { Description = "A LoRA name or a deploy id.", Arity = ArgumentArity.ZeroOrOne };
        // Parsed here rather than by the parser, so a bad number is a usage error (exit 2) like the rest.
        var min = new Option<string?>("--min") { Description = "Minimum instances (0 or more).", HelpName = "N" };
        var max = new Option<string?>("--max") { Description = "Maximum instances (at least --min).", HelpName = "N" };
        var command = new Command("scale", "Change a deploy's instance limits.");
        command.Arguments.Add(id);
        command.Options.Add(min);
        command.Options.Add(max);
        common.AddTo(command);

        command.SetAction(Run(common, async (r, ctx, client, output, ct) =>
        {
            var target = Required(r.GetValue(id), "NAME|ID");
            if (r.GetValue(min) is not { } minText || r.GetValue(max) is not { } maxText)
            {
                throw new ClientException("give both --min N and --max N", ExitCodes.Usage);
            }
            var lo = Count(minText, "--min");
            var hi = Count(maxText, "--max");
            if (lo < 0 || hi < lo)
            {
                throw new ClientException($"need 0 <= --min <= --max, got --min {lo} --max {hi}", ExitCodes.Usage);
            }
            var (found, _) = await FindAsync(client, target, ct).ConfigureAwait(false);
            var deployId = found.Json.Str("deploy_id");
            var body = new JsonObject
            {
                ["settings"] = new JsonObject { ["min_instances"] = lo, ["max_instances"] = hi },
            };
            var response = await client.PutAsync($"deploy/{Uri.EscapeDataString(deployId)}", body, ct).ConfigureAwait(false);
            if (ctx.Json)
            {
                output.Out.WriteLine(response.Text.Trim());
            }
            else
            {
                output.Line($"deploy {response.Json.Str("deploy_id")}: min_instances {lo}, max_instances {hi}");
            }
            return ExitCodes.Ok;
        }));
        return command;
    }

    internal delegate Task<int> ClientAction(ParseResult result, ClientContext context, ApiClient client, ClientOutput output, CancellationToken ct);

    /// <summary>Wraps an action: resolves options, owns the HttpClient, turns failures into one stderr line and an exit code.</summary>
    internal static Func<ParseResult, CancellationToken, Task<int>> Run(CommonOptions common, ClientAction action) =>
        async (result, ct) =>
        {
            var output = ClientOutput.ForProcess();
            try
            {
                var context = common.Read(result);
                using var client = context.CreateClient();
                return await action(result, context, client, output, ct).ConfigureAwait(false);
            }
            catch (ClientException ex)
            {
                output.Fail(ex.Message);
                return ex.ExitCode;
            }
            catch (OperationCanceledException) when (ct.IsCancellationRequested)
            {
                output.Fail("cancelled");
                return 130;
            }
#pragma warning disable CA1031 // A CLI reports any failure as one line, never a stack trace.
            catch (Exception ex)
#pragma warning restore CA1031
            {
                output.Fail($"unexpected failure: {ex.Message.ReplaceLineEndings(" ")}");
                return ExitCodes.ServerError;
            }
        };

    /// <summary>
    /// Finds a deploy by id or a LoRA by name. Something shaped like a deploy id is tried as
    /// <c>GET /deploy/{id}</c> first; anything else (or a 404) as <c>GET /v1/lora/{name}</c>.
    /// </summary>
    private static async Task<(ApiResponse Response, bool IsDeploy)> FindAsync(ApiClient client, string target, CancellationToken ct)
    {
        target = target.Trim();
        if (target.Length == 0)
        {
            throw new ClientException("give a LoRA name or a deploy id", ExitCodes.Usage);
        }
        if (DeployIdShape().IsMatch(target))
        {
            try
            {
                return (await client.GetAsync($"deploy/{Uri.EscapeDataString(target)}", ct).ConfigureAwait(false), true);
            }
            catch (ClientException ex) when (ex.StatusCode == 404)
            {
                // Not a deploy id after all: try it as a name.
            }
        }
        try
        {
            return (await client.GetAsync($"v1/lora/{Uri.EscapeDataString(target)}", ct).ConfigureAwait(false), false);
        }
        catch (ClientException ex) when (ex.StatusCode == 404)
        {
            throw new ClientException($"not found: no deploy or LoRA named '{target}'", ExitCodes.ServerError, 404);
        }
    }

    [GeneratedRegex(@"^[a-z0-9]{8,40}\z")]
    private static partial Regex DeployIdShape();

    /// <summary>Your deleted deploy of the LoRA <paramref name="name"/>, if there is one.</summary>
    private static async Task<JsonElement?> FindDeletedAsync(ApiClient client, string name, CancellationToken ct)
    {
        if (name.Length == 0)
        {
            return null;
        }
        var deleted = await client.GetAsync("deploy/list?status=deleted", ct).ConfigureAwait(false);
        return deleted.Json.ValueKind == JsonValueKind.Array
            && deleted.Json.EnumerateArray().FirstOrDefault(d => Json.LoraNameOf(d.Str("model_name")) == name) is { ValueKind: JsonValueKind.Object } gone
            ? gone
            : null;
    }

    private static Option<string?> TimeoutOption() => new("--timeout")
    {
        Description = "Stop waiting after this long (e.g. 90s, 10m, 1h) and exit 3; the deploy goes on on the server.",
        HelpName = "DURATION",
    };

    /// <summary>
    /// Cuts the last column (fail reasons: long hashes and tensor names) so each row fits the terminal on one line;
    /// <c>--json</c> and <c>status</c> have the full text.
    /// </summary>
    private static void FitLastColumn(string[] headers, List<string[]> rows, ClientOutput output)
    {
        if (output.Width is not { } width)
        {
            return;
        }
        var last = headers.Length - 1;
        var others = Enumerable.Range(0, last).Sum(i => Math.Max(headers[i].Length, rows.Max(row => row[i].Length)));
        // Plain rows put two spaces between columns; the rounded table puts "│ " before and " " after each, plus "│".
        var overhead = output.Interactive ? 3 * headers.Length + 1 : 2 * last;
        var room = Math.Max(headers[last].Length, width - others - overhead);
        foreach (var row in rows)
        {
            if (row[last].Length > room)
            {
                row[last] = string.Concat(row[last].AsSpan(0, room - 1), "…");
            }
        }
    }

    private static int Count(string text, string option) =>
        int.TryParse(text, System.Globalization.NumberStyles.AllowLeadingSign, System.Globalization.CultureInfo.InvariantCulture, out var n)
            ? n
            : throw new ClientException($"{option} must be a whole number, got '{text}'", ExitCodes.Usage);

    private static string Required(string? value, string what) =>
        string.IsNullOrWhiteSpace(value) ? throw new ClientException($"missing {what}", ExitCodes.Usage) : value.Trim();

    /// <summary>0 unless the deploy failed (1); a watch that ends in <c>deleted</c> is a failure too.</summary>
    private static int ExitCodeFor(JsonElement final, ClientOutput output, bool printReason, bool watched = true)
    {
        switch (final.Str("status"))
        {
            case "failed":
                if (printReason)
                {
                    output.Fail($"deploy failed: {OrUnknown(final.Str("fail_reason"))}");
                }
                return ExitCodes.ServerError;
            case "deleted" when watched:
                if (printReason)
                {
                    output.Fail("the deploy was deleted");
                }
                return ExitCodes.ServerError;
            default:
                return ExitCodes.Ok;
        }
    }

    private static string OrUnknown(string reason) => reason.Length > 0 ? reason : "no reason given";

    /// <summary>Prints a <c>DeploymentOut</c> or <c>LoraOut</c> as a few readable lines, ending with the status line.</summary>
    private static void PrintSummary(JsonElement item, ClientOutput output, bool showFailReason = true)
    {
        void Field(string label, string value)
        {
            if (value.Length > 0)
            {
                output.Markup($"  [grey]{label,-12}[/] {Markup.Escape(value)}");
            }
        }

        Field("base model", item.Str("base_model"));
        Field("source", item.Obj("source")?.Str("civit_url") ?? "");
        if (item.Long("size_bytes") is { } size)
        {
            Field("size", $"{Json.Bytes(item.Long("downloaded_bytes"))} / {Json.Bytes(size)}");
        }
        Field("version", item.Str("version"));
        if (item.Obj("probe") is { } probe)
        {
            var arch = probe.Str("architecture_display").Length > 0 ? probe.Str("architecture_display") : probe.Str("architecture");
            var rank = probe.Long("rank_min") is { } rmin && probe.Long("rank_max") is { } rmax
                ? rmin == rmax ? $"rank {rmin}" : $"rank {rmin}-{rmax}"
                : "";
            Field("adapter", string.Join(", ", new[] { arch, probe.Str("network"), rank }.Where(static s => s.Length > 0)));
            Field("triggers", string.Join(", ", probe.Strings("trigger_words")));
        }
        PrintLicense(item, Field);
        foreach (var warning in item.Strings("warnings"))
        {
            Field("warning", warning);
        }
        if (item.Obj("instances") is { } instances)
        {
            Field("instances", $"{instances.Long("running") ?? 0} running, {instances.Long("pending") ?? 0} pending");
        }
        Field("updated", item.Str("updated_at"));

        var status = item.Str("status");
        output.Markup($"[bold]{Markup.Escape(item.Str("model_name"))}[/] {StatusMarkup(status)} [grey](deploy {Markup.Escape(item.Str("deploy_id"))})[/]");
        if (status == "failed" && showFailReason)
        {
            output.Markup($"  [red]fail reason[/]  {Markup.Escape(OrUnknown(item.Str("fail_reason")))}");
        }
    }

    /// <summary>A CivitAI model's recorded license terms, creator and NSFW level (<c>license</c> and <c>nsfw_level</c>).</summary>
    internal static void PrintLicense(JsonElement item, Action<string, string> field)
    {
        if (item.Obj("license") is { } license)
        {
            static string YesNo(JsonElement e, string name) =>
                e.ValueKind == JsonValueKind.Object && e.TryGetProperty(name, out var v) && v.ValueKind is JsonValueKind.True or JsonValueKind.False
                    ? v.ValueKind == JsonValueKind.True ? "yes" : "no"
                    : "?";
            var commercial = license.TryGetProperty("allow_commercial_use", out var c) && c.ValueKind == JsonValueKind.Array
                ? c.GetArrayLength() == 0 ? "none" : string.Join(", ", c.EnumerateArray().Select(static x => x.ToString()))
                : "?";
            field("license", $"commercial use: {commercial}; derivatives: {YesNo(license, "allow_derivatives")}; "
                + $"other license: {YesNo(license, "allow_different_license")}; no credit needed: {YesNo(license, "allow_no_credit")}");
            field("creator", license.Str("creator"));
        }
        if (item.Long("nsfw_level") is { } level)
        {
            field("nsfw", Sources.NsfwLevels.Highest((int)level) is { } highest ? $"{highest.Name} (level {level})" : $"unrated (level {level})");
        }
    }

    private static string StatusMarkup(string status) => status switch
    {
        "running" or "deploying" => $"[green]{Markup.Escape(status)}[/]",
        "failed" => $"[red]{Markup.Escape(status)}[/]",
        "initializing" or "downloading" => $"[yellow]{Markup.Escape(status)}[/]",
        _ => $"[grey]{Markup.Escape(status)}[/]",
    };

    private static string Pad(string[] cells, int[] widths) =>
        string.Join("  ", cells.Select((c, i) => i == cells.Length - 1 ? c : c.PadRight(widths[i]))).TrimEnd();
}
