using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using LoraDeploy.Lora;
using LoraDeploy.Lora.Safetensors;
using Spectre.Console;

namespace LoraDeploy.Cli;

/// <summary><c>loradeploy inspect FILE [--json]</c>: probe a local adapter file.</summary>
internal static class InspectCommand
{
    /// <summary>Exit code for a file that is malformed, unreadable, or not a LoRA-family adapter.</summary>
    public const int NotAnAdapter = 2;

    public static Command Create()
    {
        var file = new Argument<FileInfo>("file") { Description = "Path to a .safetensors file." };
        var json = new Option<bool>("--json") { Description = "Print the probe report as JSON (see docs/inspect-json.md)." };
        var command = new Command("inspect", "Probe a local .safetensors adapter: format, network, architecture, rank, metadata.");
        command.Arguments.Add(file);
        command.Options.Add(json);
        command.SetAction((ParseResult result, CancellationToken cancellationToken) =>
        {
            var output = result.InvocationConfiguration.Output;
            var error = result.InvocationConfiguration.Error;
            var path = result.GetValue(file)!.FullName;
            var asJson = result.GetValue(json);
            return Task.FromResult(Run(path, asJson, output, error));
        });
        return command;
    }

    private static int Run(string path, bool asJson, TextWriter output, TextWriter error)
    {
        ProbeReport report;
        try
        {
            if (AdapterFileKind.DescribeFile(path) is { } kind)
            {
                error.WriteLine($"inspect: {path} is {kind}");
                return NotAnAdapter;
            }
            report = LoraProber.ProbeFile(path, hashes: asJson);
        }
        catch (SafetensorsFormatException e)
        {
            error.WriteLine($"inspect: {path}: not a valid safetensors file: {e.Message}");
            return NotAnAdapter;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            error.WriteLine($"inspect: {path}: {e.Message}");
            return NotAnAdapter;
        }

        if (!report.IsAdapter)
        {
            error.WriteLine($"inspect: {path}: not a LoRA-family adapter: {report.NotApplicableReason}");
            return NotAnAdapter;
        }

        if (asJson)
        {
            output.WriteLine(JsonSerializer.Serialize(report, ProbeJsonContext.Default.ProbeReport));
        }
        else
        {
            WriteTable(path, report, output);
        }
        return 0;
    }

    private static void WriteTable(string path, ProbeReport report, TextWriter output)
    {
        var console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Out = new AnsiConsoleOutput(output),
            Ansi = ReferenceEquals(output, Console.Out) ? AnsiSupport.Detect : AnsiSupport.No,
            ColorSystem = ReferenceEquals(output, Console.Out) ? ColorSystemSupport.Detect : ColorSystemSupport.NoColors,
        });

        var table = new Table().Border(TableBorder.Rounded).AddColumn("Property").AddColumn("Value").HideHeaders();
        void Row(string name, string? value)
        {
            if (!string.IsNullOrEmpty(value))
            {
                table.AddRow(new Text(name, new Style(decoration: Decoration.Bold)), new Text(value));
            }
        }

        static string Number(double? value) => value?.ToString("0.####", CultureInfo.InvariantCulture) ?? "";

        Row("File", Path.GetFileName(path));
        Row("Architecture", $"{report.ArchitectureDisplay} ({report.Architecture})");
        Row("Network", report.Network);
        Row("Format", report.Format);
        Row("Targets", string.Join(", ", report.Targets));
        Row("Modules", report.ModuleCount.ToString(CultureInfo.InvariantCulture));
        Row("Rank", report.RankMin is null ? "" : report.RankMin == report.RankMax ? $"{report.RankMin}" : $"{report.RankMin}–{report.RankMax}");
        Row("Alpha", Number(report.Alpha));
        Row("Scale", Number(report.Scale));
        Row("Dtypes", string.Join(", ", report.Dtypes));
        Row("Parameters", report.ParameterCount.ToString("N0", CultureInfo.InvariantCulture));
        Row("Base model (metadata)", report.BaseModelVersion);
        Row("Trigger words", string.Join(", ", report.TriggerWords));
        Row("Top tags", string.Join(", ", report.TopTags.Select(t => $"{t.Tag} ({t.Count})")));
        if (report.Metadata.TryGetValue("modelspec.title", out var title))
        {
            Row("Title", title);
        }
        if (report.Metadata.TryGetValue("ss_output_name", out var outputName))
        {
            Row("Output name", outputName);
        }
        Row("Applicable", report.Applicable ? "yes" : $"no: {report.NotApplicableReason}");
        console.Write(table);

        foreach (var warning in report.Warnings)
        {
            console.Write(new Text($"warning: {warning}{Environment.NewLine}"));
        }
    }
}
