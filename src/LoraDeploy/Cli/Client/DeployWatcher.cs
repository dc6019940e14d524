using System.Diagnostics;
using System.Text.Json;
using Spectre.Console;
using Spectre.Console.Rendering;

namespace LoraDeploy.Cli.Client;

/// <summary>
/// Polls <c>GET /v1/lora/{name}</c> until the deploy settles, showing each lifecycle step and a live
/// download bar (bytes, rate, ETA) on a terminal, or plain progress lines elsewhere.
/// </summary>
internal sealed class DeployWatcher(ApiClient client, ClientOutput output, bool quiet)
{
    private static readonly string[] Steps = ["initializing", "downloading", "deploying", "running"];

    public TimeSpan PollInterval { get; init; } = TimeSpan.FromMilliseconds(400);

    /// <summary>Statuses after which watching stops.</summary>
    public static bool IsSettled(string status) =>
        status is "deploying" or "running" or "failed" or "stopped" or "deleted";

    private string _lastStatus = "";

    /// <summary>
    /// Watches until settled; returns the last <c>LoraOut</c> seen. After <paramref name="timeout"/> it gives up with a
    /// <see cref="ClientException"/> (<see cref="ExitCodes.TimedOut"/>); the deploy itself goes on.
    /// </summary>
    public async Task<JsonElement> WatchAsync(string loraName, TimeSpan? timeout, CancellationToken ct)
    {
        using var deadline = timeout is { } limit ? new CancellationTokenSource(limit, TimeProvider.System) : null;
        using var linked = deadline is null ? null : CancellationTokenSource.CreateLinkedTokenSource(ct, deadline.Token);
        try
        {
            return await WatchUntilSettledAsync(loraName, linked?.Token ?? ct).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (deadline is { IsCancellationRequested: true } && !ct.IsCancellationRequested)
        {
            var still = _lastStatus.Length > 0 ? $"still {_lastStatus}" : "not settled";
            throw new ClientException(
                $"gave up after {Durations.Format(timeout!.Value)} (--timeout): {loraName} is {still}; it goes on on the server " +
                $"(follow it with 'loradeploy status {loraName} --watch')", ExitCodes.TimedOut);
        }
    }

    private async Task<JsonElement> WatchUntilSettledAsync(string loraName, CancellationToken ct)
    {
        var path = $"v1/lora/{Uri.EscapeDataString(loraName)}";
        if (quiet)
        {
            return await PollUntilSettledAsync(path, static _ => { }, ct).ConfigureAwait(false);
        }
        if (!output.Interactive)
        {
            var plain = new PlainReporter(output);
            return await PollUntilSettledAsync(path, plain.Report, ct).ConfigureAwait(false);
        }

        JsonElement last = default;
        // The finished bar is hidden: each step leaves a ✓/✗ line instead, and a deploy that failed before its size was
        // known would otherwise stay on screen as "0% 1 byte ?/s **:**:**".
        await output.Console.Progress()
            .AutoClear(false)
            .HideCompleted(true)
            .Columns(
                new TaskDescriptionColumn { Alignment = Justify.Left },
                new ProgressBarColumn(),
                new OnceSizeKnown(new PercentageColumn()),
                new OnceSizeKnown(new DownloadedColumn()),
                new OnceSizeKnown(new TransferSpeedColumn()),
                new OnceSizeKnown(new RemainingTimeColumn()),
                new SpinnerColumn())
            .StartAsync(async ctx =>
            {
                var live = new LiveReporter(output, ctx);
                last = await PollUntilSettledAsync(path, live.Report, ct).ConfigureAwait(false);
                live.Finish(last);
            }).ConfigureAwait(false);
        return last;
    }

    private async Task<JsonElement> PollUntilSettledAsync(string path, Action<JsonElement> report, CancellationToken ct)
    {
        var transientFailures = 0;
        while (true)
        {
            JsonElement lora;
            try
            {
                lora = (await client.GetAsync(path, ct).ConfigureAwait(false)).Json;
                transientFailures = 0;
            }
            catch (ClientException ex) when (ex.StatusCode is null or >= 500 && ++transientFailures < 10)
            {
                // The server restarting or a blip: keep watching for a few seconds before giving up.
                await Task.Delay(PollInterval * 2, ct).ConfigureAwait(false);
                continue;
            }

            report(lora);
            _lastStatus = lora.Str("status");
            if (IsSettled(_lastStatus))
            {
                return lora;
            }
            await Task.Delay(PollInterval, ct).ConfigureAwait(false);
        }
    }

    private static int StepIndex(string status) => Array.IndexOf(Steps, status);

    /// <summary>A column that shows nothing until the download's size is known (the task is indeterminate before).</summary>
    private sealed class OnceSizeKnown(ProgressColumn inner) : ProgressColumn
    {
        public override IRenderable Render(RenderOptions options, ProgressTask task, TimeSpan deltaTime) =>
            task.IsIndeterminate ? Text.Empty : inner.Render(options, task, deltaTime);

        public override int? GetColumnWidth(RenderOptions options) => inner.GetColumnWidth(options);
    }

    /// <summary>Lines for logs and tests: one per step, and download progress every quarter.</summary>
    private sealed class PlainReporter(ClientOutput output)
    {
        private string _status = "";
        private int _quarter = -1;

        public void Report(JsonElement lora)
        {
            var status = lora.Str("status");
            if (status != _status)
            {
                _status = status;
                output.Line($"{status}");
            }
            if (status == "downloading" && lora.Long("size_bytes") is > 0 and var size)
            {
                var done = lora.Long("downloaded_bytes") ?? 0;
                var quarter = (int)Math.Min(4, done * 4 / size);
                if (quarter > _quarter)
                {
                    _quarter = quarter;
                    output.Line($"  {Json.Bytes(done)} / {Json.Bytes(size)} ({done * 100 / size}%)");
                }
            }
        }
    }

    /// <summary>The Spectre live view: a line per finished step, and one bar that follows the download.</summary>
    private sealed class LiveReporter(ClientOutput output, ProgressContext ctx)
    {
        private readonly ProgressTask _task = CreateTask(ctx);
        private readonly Stopwatch _stepClock = Stopwatch.StartNew();
        private string _status = "";
        private string _previous = "";

        private static ProgressTask CreateTask(ProgressContext ctx)
        {
            var task = ctx.AddTask("[grey]waiting[/]", autoStart: true, maxValue: 1);
            task.IsIndeterminate = true;
            return task;
        }

        public void Report(JsonElement lora)
        {
            var status = lora.Str("status");
            if (status != _status)
            {
                var settled = IsSettled(status) && status is not ("deploying" or "running");
                if (_status.Length > 0 && StepIndex(_status) >= 0 && !settled)
                {
                    output.Console.MarkupLine(
                        $"[green]✓[/] {Markup.Escape(_status)} [grey]({_stepClock.Elapsed.TotalSeconds:0.0} s)[/]");
                    _stepClock.Restart();
                }
                _previous = _status;
                _status = status;
                _task.Description = $"[bold]{Markup.Escape(status)}[/]";
            }

            if (lora.Long("size_bytes") is > 0 and var size)
            {
                _task.IsIndeterminate = false;
                _task.MaxValue = size;
                var done = StepIndex(status) >= 2 ? size : lora.Long("downloaded_bytes") ?? 0;
                if (done > _task.Value)
                {
                    _task.Value = done;
                }
            }
        }

        public void Finish(JsonElement lora)
        {
            var status = lora.Str("status");
            if (status is not ("deploying" or "running") && StepIndex(_previous) >= 0)
            {
                // The step that did not finish; the reason is printed once, by the command.
                output.Console.MarkupLine(
                    $"[red]✗[/] {Markup.Escape(_previous)} [grey]({_stepClock.Elapsed.TotalSeconds:0.0} s)[/]");
            }
            _task.StopTask();
        }
    }
}
