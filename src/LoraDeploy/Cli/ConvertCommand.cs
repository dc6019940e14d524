using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using LoraDeploy.Lora.Conversion;
using Spectre.Console;

namespace LoraDeploy.Cli;

/// <summary><c>loradeploy convert FILE --to kohya|peft|diffusers -o OUT [--arch] [--json]</c>: re-emit an adapter in another naming convention.</summary>
internal static class ConvertCommand
{
    /// <summary>Exit code for an adapter convert refuses or an output it could not write.</summary>
    public const int ConvertFailed = 2;

    public static Command Create()
    {
        var input = new Argument<FileInfo>("FILE") { Description = "The adapter to convert (.safetensors)." };
        var to = new Option<string>("--to") { Description = "The convention to write: kohya, peft (adapter_config.json written beside OUT) or diffusers.", Required = true };
        to.AcceptOnlyFromAmong("kohya", "peft", "diffusers");
        var output = new Option<FileInfo>("--output", "-o") { Description = "The converted adapter to write (.safetensors).", Required = true };
        var architecture = new Option<string>("--arch") { Description = "The base family, when the adapter does not tell: sd15, sdxl or flux1." };
        architecture.AcceptOnlyFromAmong("sd15", "sdxl", "flux1");
        var json = new Option<bool>("--json") { Description = "Print a JSON summary (modules in/out, tensors copied/built, fused ranks) instead of the one-line summary." };

        var command = new Command("convert", "Re-emit an SD1.5/SDXL/FLUX.1 adapter in kohya, PEFT or diffusers names, exactly (q/k/v split or fused as needed).");
        command.Arguments.Add(input);
        command.Options.Add(to);
        command.Options.Add(output);
        command.Options.Add(architecture);
        command.Options.Add(json);
        command.SetAction((ParseResult result, CancellationToken cancellationToken) =>
        {
            var configuration = result.InvocationConfiguration;
            var request = new Request(
                result.GetValue(input)!.FullName,
                Enum.Parse<AdapterConvention>(result.GetValue(to)!, ignoreCase: true),
                result.GetValue(output)!.FullName,
                result.GetValue(architecture) switch { "sd15" => AdapterArchitecture.SD15, "sdxl" => AdapterArchitecture.SDXL, "flux1" => AdapterArchitecture.Flux1, _ => null },
                result.GetValue(json));
            return Task.FromResult(Run(request, configuration.Output, configuration.Error, cancellationToken));
        });
        return command;
    }

    private sealed record Request(string InputPath, AdapterConvention To, string OutputPath, AdapterArchitecture? Architecture, bool Json);

    private static int Run(Request request, TextWriter output, TextWriter error, CancellationToken cancellationToken)
    {
        if (!File.Exists(request.InputPath))
        {
            error.WriteLine($"convert: {request.InputPath}: no such file");
            return ConvertFailed;
        }
        var options = new ConvertOptions { Architecture = request.Architecture };
        ConvertResult converted;
        try
        {
            var interactive = !request.Json && ReferenceEquals(output, Console.Out) && !Console.IsOutputRedirected;
            if (interactive)
            {
                ConvertResult? result = null;
                AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(output) })
                    .Status()
                    .Start($"converting {Path.GetFileName(request.InputPath)}", _ => result = AdapterConverter.Convert(request.InputPath, request.To, request.OutputPath, options, cancellationToken));
                converted = result!;
            }
            else
            {
                converted = AdapterConverter.Convert(request.InputPath, request.To, request.OutputPath, options, cancellationToken);
            }
        }
        catch (AdapterConvertException e)
        {
            error.WriteLine($"convert: {e.Message}");
            return ConvertFailed;
        }

        if (request.Json)
        {
            WriteJson(converted, output);
            return 0;
        }
        output.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"converted {converted.ModulesIn} modules ({converted.From}) to {converted.ModulesOut} {Name(converted.To)} modules, " +
            $"{converted.TensorsCopied} tensors copied and {converted.TensorsBuilt} built, {converted.BytesWritten:N0} bytes → {converted.OutputPath}"));
        if (converted.ConfigPath is { } config)
        {
            output.WriteLine($"wrote {config}");
        }
        foreach (var grown in converted.RankGrown)
        {
            output.WriteLine($"fused q/k/v, the rank grew: {grown}");
        }
        if (converted.NonFiniteTensors.Count > 0)
        {
            error.WriteLine($"convert: warning: {converted.NonFiniteTensors.Count} tensor(s) hold NaN/Inf, carried as they were (merge refuses them): {string.Join(", ", converted.NonFiniteTensors.Take(5))}");
        }
        return 0;
    }

    private static string Name(AdapterConvention convention) => convention.ToString().ToLowerInvariant();

    private static void WriteJson(ConvertResult converted, TextWriter output)
    {
        using var stream = new MemoryStream();
        using (var writer = new Utf8JsonWriter(stream, new JsonWriterOptions { Indented = true }))
        {
            writer.WriteStartObject();
            writer.WriteString("output", converted.OutputPath);
            if (converted.ConfigPath is { } config)
            {
                writer.WriteString("config", config);
            }
            writer.WriteString("from", converted.From);
            writer.WriteString("to", Name(converted.To));
            writer.WriteString("architecture", converted.Architecture switch
            {
                AdapterArchitecture.SD15 => "sd15", AdapterArchitecture.SDXL => "sdxl", AdapterArchitecture.Flux1 => "flux1", _ => null,
            });
            writer.WriteNumber("modules_in", converted.ModulesIn);
            writer.WriteNumber("modules_out", converted.ModulesOut);
            writer.WriteNumber("tensors_copied", converted.TensorsCopied);
            writer.WriteNumber("tensors_built", converted.TensorsBuilt);
            writer.WriteStartArray("rank_grown");
            foreach (var grown in converted.RankGrown)
            {
                writer.WriteStringValue(grown);
            }
            writer.WriteEndArray();
            writer.WriteStartArray("non_finite_tensors");
            foreach (var name in converted.NonFiniteTensors)
            {
                writer.WriteStringValue(name);
            }
            writer.WriteEndArray();
            writer.WriteString("source_sha256", converted.SourceSha256);
            writer.WriteNumber("bytes", converted.BytesWritten);
            writer.WriteNumber("seconds", Math.Round(converted.Elapsed.TotalSeconds, 3));
            writer.WriteEndObject();
        }
        output.WriteLine(System.Text.Encoding.UTF8.GetString(stream.ToArray()));
    }
}
