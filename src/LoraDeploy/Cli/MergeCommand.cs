using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using LoraDeploy.Lora.Merge;
using Spectre.Console;

namespace LoraDeploy.Cli;

/// <summary>
/// <c>loradeploy merge --base PATH --lora FILE[:scale] … -o OUT [--dtype] [--json]</c>: bake adapters into a base model,
/// a safetensors file (<see cref="LoraMerger"/>) or a llama.cpp GGUF (<see cref="GgufMerger"/>, chosen by the file's magic bytes).
/// </summary>
internal static class MergeCommand
{
    /// <summary>Exit code for an input the merge refuses or an output it could not write.</summary>
    public const int MergeFailed = 2;

    public static Command Create()
    {
        var basePath = new Option<FileInfo>("--base") { Description = "The base model: .safetensors, or a llama.cpp .gguf (Llama family; PEFT adapters or llama.cpp LoRA GGUFs).", Required = true };
        var loras = new Option<string[]>("--lora")
        {
            Description = "An adapter .safetensors (or a llama.cpp LoRA .gguf onto a GGUF base), optionally with a strength: FILE or FILE:0.8. Repeat to merge several, in order.",
            Required = true,
            Arity = ArgumentArity.OneOrMore,
        };
        var output = new Option<FileInfo>("--output", "-o") { Description = "The merged model to write (.safetensors, or .gguf for a GGUF base).", Required = true };
        var dtype = new Option<string>("--dtype") { Description = "Write the float tensors as f32, f16 or bf16 (default: each keeps the base's dtype; a GGUF base always does)." };
        dtype.AcceptOnlyFromAmong("f32", "f16", "bf16");
        var json = new Option<bool>("--json") { Description = "Print a JSON summary (tensors merged/copied, bytes, seconds) instead of the progress bar." };

        var command = new Command("merge", "Merge LoRA-family adapters (LoRA/LoCon, LoHa, LoKr, DoRA; kohya or PEFT names) into a base model's weights.");
        command.Options.Add(basePath);
        command.Options.Add(loras);
        command.Options.Add(output);
        command.Options.Add(dtype);
        command.Options.Add(json);
        command.SetAction((ParseResult result, CancellationToken cancellationToken) =>
        {
            var configuration = result.InvocationConfiguration;
            var request = new Request(
                result.GetValue(basePath)!.FullName,
                result.GetValue(loras)!,
                result.GetValue(output)!.FullName,
                result.GetValue(dtype) switch { "f32" => MergeDtype.F32, "f16" => MergeDtype.F16, "bf16" => MergeDtype.BF16, _ => MergeDtype.Base },
                result.GetValue(json));
            return Task.FromResult(Run(request, configuration.Output, configuration.Error, cancellationToken));
        });
        return command;
    }

    private sealed record Request(string BasePath, string[] Loras, string OutputPath, MergeDtype Dtype, bool Json);

    private static int Run(Request request, TextWriter output, TextWriter error, CancellationToken cancellationToken)
    {
        var adapters = new List<MergeAdapter>();
        foreach (var value in request.Loras)
        {
            if (ParseLora(value) is not { } adapter)
            {
                error.WriteLine($"merge: --lora {value}: no such file");
                return MergeFailed;
            }
            adapters.Add(adapter);
        }

        MergeResult merged;
        try
        {
            var interactive = !request.Json && ReferenceEquals(output, Console.Out) && !Console.IsOutputRedirected;
            merged = interactive
                ? MergeWithProgressBar(request, adapters, output, cancellationToken)
                : Merge(request, adapters, new MergeOptions { OutputDtype = request.Dtype }, cancellationToken);
        }
        catch (LoraMergeException e)
        {
            error.WriteLine($"merge: {e.Message}");
            return MergeFailed;
        }

        if (request.Json)
        {
            WriteJson(merged, output);
        }
        else
        {
            output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"merged {merged.ModulesApplied} modules from {merged.Adapters.Count} adapter(s) into {merged.TensorsMerged} tensors " +
                $"({merged.TensorsCopied} copied), {merged.BytesWritten:N0} bytes in {merged.Elapsed.TotalSeconds:0.0} s → {merged.OutputPath}"));
        }
        return 0;
    }

    private static MergeResult Merge(Request request, List<MergeAdapter> adapters, MergeOptions options, CancellationToken cancellationToken) =>
        GgufMerger.IsGguf(request.BasePath)
            ? GgufMerger.Merge(request.BasePath, adapters, request.OutputPath, options, cancellationToken)
            : LoraMerger.Merge(request.BasePath, adapters, request.OutputPath, options, cancellationToken);

    /// <summary><c>FILE</c> or <c>FILE:scale</c>; a suffix that is not a number is part of the file name. Null if the file does not exist.</summary>
    internal static MergeAdapter? ParseLora(string value)
    {
        var colon = value.LastIndexOf(':');
        if (colon > 0 && double.TryParse(value.AsSpan(colon + 1), NumberStyles.Float, CultureInfo.InvariantCulture, out var strength)
            && double.IsFinite(strength) && File.Exists(value[..colon]))
        {
            return new MergeAdapter(value[..colon], strength);
        }
        return File.Exists(value) ? new MergeAdapter(value) : null;
    }

    private static MergeResult MergeWithProgressBar(Request request, List<MergeAdapter> adapters, TextWriter output, CancellationToken cancellationToken)
    {
        var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(output) });
        MergeResult? merged = null;
        console.Progress()
            .AutoClear(false)
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new DownloadedColumn(), new RemainingTimeColumn())
            .Start(ctx =>
            {
                var task = ctx.AddTask(Path.GetFileName(request.OutputPath));
                var progress = new ProgressToTask(task);
                merged = Merge(request, adapters, new MergeOptions { OutputDtype = request.Dtype, Progress = progress }, cancellationToken);
                task.Value = task.MaxValue;
            });
        return merged!;
    }

    private sealed class ProgressToTask(ProgressTask task) : IProgress<MergeProgress>
    {
        public void Report(MergeProgress value)
        {
            task.MaxValue = value.BytesTotal;
            task.Value = value.BytesDone;
        }
    }

    private static void WriteJson(MergeResult merged, TextWriter output)
    {
        using var stream = new MemoryStream();
        using (var writer = new Utf8JsonWriter(stream, new JsonWriterOptions { Indented = true }))
        {
            writer.WriteStartObject();
            writer.WriteString("output", merged.OutputPath);
            writer.WriteNumber("tensors_merged", merged.TensorsMerged);
            writer.WriteNumber("tensors_copied", merged.TensorsCopied);
            writer.WriteNumber("tensors_converted", merged.TensorsConverted);
            writer.WriteNumber("modules_applied", merged.ModulesApplied);
            writer.WriteNumber("bytes", merged.BytesWritten);
            writer.WriteNumber("seconds", Math.Round(merged.Elapsed.TotalSeconds, 3));
            writer.WriteStartArray("adapters");
            foreach (var adapter in merged.Adapters)
            {
                writer.WriteStartObject();
                writer.WriteString("file", adapter.File);
                writer.WriteString("sha256", adapter.Sha256);
                writer.WriteNumber("strength", adapter.Strength);
                writer.WriteNumber("modules", adapter.Modules);
                writer.WriteEndObject();
            }
            writer.WriteEndArray();
            writer.WriteEndObject();
        }
        output.WriteLine(System.Text.Encoding.UTF8.GetString(stream.ToArray()));
    }
}
