using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using LoraDeploy.Inference;
using Spectre.Console;

namespace LoraDeploy.Cli.Client;

/// <summary>
/// <c>loradeploy generate owner/name "prompt" -o out.png</c>: one native text-to-image request with
/// <c>"stream": true</c>, a progress bar fed by the <see cref="ImageProgressStream"/> events, the result's PNGs
/// written to disk (<c>out.png</c>, or <c>out-1.png</c>, <c>out-2.png</c>… for several) and the seed used printed.
/// </summary>
internal static class GenerateCommand
{
    public static Command Create()
    {
        var common = new CommonOptions();
        var model = new Argument<string?>("MODEL") { Description = "owner/lora_name (leave out with --base).", Arity = ArgumentArity.ZeroOrOne };
        var prompt = new Argument<string?>("PROMPT") { Description = "What to draw.", Arity = ArgumentArity.ZeroOrOne };
        var output = new Option<string?>("--output", "-o") { Description = "PNG file to write; with several images FILE-1.png, FILE-2.png…", HelpName = "FILE" };
        var scale = new Option<string?>("--scale") { Description = "LoRA strength (lora_scale, default 1).", HelpName = "S" };
        var seed = new Option<string?>("--seed") { Description = "Seed for a reproducible image (random when left out).", HelpName = "N" };
        var steps = new Option<string?>("--steps") { Description = "Sampling steps (num_inference_steps).", HelpName = "N" };
        var width = new Option<string?>("--width") { Description = "Image width in pixels (a multiple of 8).", HelpName = "W" };
        var height = new Option<string?>("--height") { Description = "Image height in pixels (a multiple of 8).", HelpName = "H" };
        var negative = new Option<string?>("--negative") { Description = "Negative prompt.", HelpName = "TEXT" };
        var count = new Option<string?>("--count", "-n") { Description = "Images to generate (1-4).", HelpName = "COUNT" };
        var baseModel = new Option<string?>("--base") { Description = "Generate with a base model and no LoRA, e.g. black-forest-labs/FLUX-1-dev.", HelpName = "BASE_MODEL" };

        var command = new Command("generate", "Generate images with an image LoRA (or a base model), showing the sampling progress.");
        command.Arguments.Add(model);
        command.Arguments.Add(prompt);
        foreach (var o in new Option[] { output, scale, seed, steps, width, height, negative, count, baseModel })
        {
            command.Options.Add(o);
        }
        common.AddTo(command);

        command.SetAction(DeployCommands.Run(common, async (r, ctx, _, console, ct) =>
        {
            // With --base the one positional word is the prompt.
            var words = new[] { r.GetValue(model), r.GetValue(prompt) }.Where(static w => w is not null).Select(static w => w!).ToList();
            var based = r.GetValue(baseModel)?.Trim();
            string target, text;
            if (!string.IsNullOrEmpty(based))
            {
                if (words.Count != 1)
                {
                    throw new ClientException("with --base give only the prompt, not owner/name too", ExitCodes.Usage);
                }
                (target, text) = (based, words[0]);
            }
            else if (words.Count == 2)
            {
                (target, text) = (words[0].Trim(), words[1]);
            }
            else
            {
                throw new ClientException("give owner/name and a prompt (or --base BASE_MODEL and a prompt)", ExitCodes.Usage);
            }
            var parts = target.Split('/');
            if (parts.Length != 2 || parts.Any(static p => p.Length == 0))
            {
                throw new ClientException($"the model must be owner/name, got '{target}'", ExitCodes.Usage);
            }
            if (string.IsNullOrWhiteSpace(text))
            {
                throw new ClientException("the prompt is empty", ExitCodes.Usage);
            }
            var file = r.GetValue(output) is { Length: > 0 } o ? o : throw new ClientException("missing -o FILE (where to write the PNG)", ExitCodes.Usage);

            var body = new JsonObject { ["prompt"] = text, ["stream"] = true };
            AddNumber(body, "lora_scale", r.GetValue(scale), "--scale", integer: false);
            AddNumber(body, "seed", r.GetValue(seed), "--seed", integer: true);
            AddNumber(body, "num_inference_steps", r.GetValue(steps), "--steps", integer: true);
            AddNumber(body, "width", r.GetValue(width), "--width", integer: true);
            AddNumber(body, "height", r.GetValue(height), "--height", integer: true);
            AddNumber(body, "num_images", r.GetValue(count), "-n", integer: true);
            if (r.GetValue(negative) is { } n)
            {
                body["negative_prompt"] = n;
            }

            // No client-side limit: the server bounds a request (Workers:RequestTimeoutSeconds → 504); Ctrl+C stops it.
            using var client = ctx.CreateClient(Timeout.InfiniteTimeSpan);
            var path = $"v1/inference/{Uri.EscapeDataString(parts[0])}/{Uri.EscapeDataString(parts[1])}";
            using var response = await client.PostStreamingAsync(path, body, ct).ConfigureAwait(false);
            var answer = response.Content.Headers.ContentType?.MediaType == ImageProgressStream.ContentType
                ? await FollowAsync(response, console, quiet: ctx.Json, ct).ConfigureAwait(false)
                : await ReadJsonAsync(response, ct).ConfigureAwait(false);

            var files = await WriteImagesAsync(answer, file, ct).ConfigureAwait(false);
            var seedUsed = answer.TryGetProperty("seed", out var s) ? s.ToString() : "";
            if (ctx.Json)
            {
                var summary = new JsonObject
                {
                    ["files"] = new JsonArray([.. files.Select(static f => (JsonNode?)JsonValue.Create(f.Path))]),
                    ["seed"] = answer.TryGetProperty("seed", out var js) ? JsonNode.Parse(js.GetRawText()) : null,
                    ["request_id"] = answer.Str("request_id"),
                };
                console.Out.WriteLine(summary.ToJsonString());
                return ExitCodes.Ok;
            }
            foreach (var (written, size) in files)
            {
                console.Line($"wrote {written} ({Json.Bytes(size)})");
            }
            console.Line($"seed {(seedUsed.Length > 0 ? seedUsed : "not reported")}");
            return ExitCodes.Ok;
        }));
        return command;
    }

    private static void AddNumber(JsonObject body, string field, string? value, string option, bool integer)
    {
        if (value is null)
        {
            return;
        }
        if (integer)
        {
            body[field] = long.TryParse(value, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var whole)
                ? whole
                : throw new ClientException($"{option} must be a whole number, got '{value}'", ExitCodes.Usage);
        }
        else
        {
            body[field] = double.TryParse(value, NumberStyles.Float, CultureInfo.InvariantCulture, out var number) && double.IsFinite(number)
                ? number
                : throw new ClientException($"{option} must be a number, got '{value}'", ExitCodes.Usage);
        }
    }

    /// <summary>Reads the progress stream to its final event: a bar on a terminal, "step i/n" lines elsewhere.</summary>
    private static async Task<JsonElement> FollowAsync(HttpResponseMessage response, ClientOutput output, bool quiet, CancellationToken ct)
    {
        await using var stream = await response.Content.ReadAsStreamAsync(ct).ConfigureAwait(false);
        if (quiet || !output.Interactive)
        {
            return await ReadEventsAsync(stream, p =>
            {
                if (!quiet)
                {
                    output.Line($"step {p.Step}/{p.Steps}");
                }
            }, ct).ConfigureAwait(false);
        }
        JsonElement answer = default;
        await output.Console.Progress()
            .AutoClear(false)
            .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(),
                new ElapsedTimeColumn(), new SpinnerColumn())
            .StartAsync(async progress =>
            {
                var bar = progress.AddTask("sampling", maxValue: 1);
                bar.IsIndeterminate = true;
                answer = await ReadEventsAsync(stream, p =>
                {
                    bar.IsIndeterminate = false;
                    bar.MaxValue = p.Steps;
                    bar.Value = p.Step;
                    bar.Description = $"sampling {p.Step}/{p.Steps}";
                }, ct).ConfigureAwait(false);
                bar.Value = bar.MaxValue;
                bar.StopTask();
            }).ConfigureAwait(false);
        return answer;
    }

    private static async Task<JsonElement> ReadEventsAsync(Stream stream, Action<ImageStreamProgress> onProgress, CancellationToken ct)
    {
        try
        {
            await foreach (var e in ImageProgressStream.ReadAsync(stream, ct).ConfigureAwait(false))
            {
                switch (e)
                {
                    case ImageStreamProgress p:
                        onProgress(p);
                        break;
                    case ImageStreamResult result:
                        return result.Answer;
                    case ImageStreamError error:
                        throw new ClientException($"generation failed ({error.Status}): {ErrorFormatter.Clean(error.Message).ReplaceLineEndings(" ")}");
                }
            }
        }
        catch (InvalidDataException e)
        {
            throw new ClientException($"the server's progress stream is broken: {e.Message}");
        }
        catch (Exception e) when (e is IOException or HttpRequestException)
        {
            throw new ClientException($"the connection was cut before the result: {e.Message}");
        }
        throw new ClientException("the server ended the progress stream without a result");
    }

    private static async Task<JsonElement> ReadJsonAsync(HttpResponseMessage response, CancellationToken ct)
    {
        var text = await response.Content.ReadAsStringAsync(ct).ConfigureAwait(false);
        try
        {
            using var json = JsonDocument.Parse(text);
            return json.RootElement.Clone();
        }
        catch (JsonException)
        {
            throw new ClientException($"the server answered {(int)response.StatusCode} with something that is not JSON");
        }
    }

    /// <summary>Decodes the answer's <c>images</c> (data URLs) and writes them; a bad answer is an error naming the image.</summary>
    private static async Task<List<(string Path, long Size)>> WriteImagesAsync(JsonElement answer, string file, CancellationToken ct)
    {
        if (answer.ValueKind != JsonValueKind.Object || !answer.TryGetProperty("images", out var images)
            || images.ValueKind != JsonValueKind.Array || images.GetArrayLength() == 0)
        {
            throw new ClientException("the answer has no images");
        }
        var decoded = new List<byte[]>();
        var i = 0;
        foreach (var image in images.EnumerateArray())
        {
            var url = image.ValueKind == JsonValueKind.String ? image.GetString()! : "";
            var comma = url.IndexOf(',', StringComparison.Ordinal);
            if (!url.StartsWith("data:image/", StringComparison.Ordinal) || comma < 0 || !url.AsSpan(0, comma).EndsWith(";base64"))
            {
                throw new ClientException($"images[{i}] of the answer is not a base64 image data URL");
            }
            try
            {
                decoded.Add(Convert.FromBase64String(url[(comma + 1)..]));
            }
            catch (FormatException)
            {
                throw new ClientException($"images[{i}] of the answer is not valid base64");
            }
            i++;
        }
        var written = new List<(string, long)>();
        for (var n = 0; n < decoded.Count; n++)
        {
            var path = decoded.Count == 1
                ? file
                : Path.Combine(Path.GetDirectoryName(file) ?? "", $"{Path.GetFileNameWithoutExtension(file)}-{n + 1}{Path.GetExtension(file)}");
            try
            {
                await File.WriteAllBytesAsync(path, decoded[n], ct).ConfigureAwait(false);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                throw new ClientException($"cannot write {path}: {e.Message}");
            }
            written.Add((path, decoded[n].LongLength));
        }
        return written;
    }
}
