using System.Collections.Concurrent;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using LoraDeploy.Auth;
using LoraDeploy.Inference;
using LoraDeploy.Tests.Dashboard;
using LoraDeploy.Tests.Pipeline;
using LoraDeploy.Tests.Serving;
using LoraDeploy.Workers;
using Microsoft.AspNetCore.Http;

namespace LoraDeploy.Tests.Cli;

/// <summary>
/// The real <c>loradeploy generate</c> against a real server whose <see cref="FakeWorker"/> answers the image progress
/// stream (or plain JSON): files written from the data URLs, progress shown, the seed printed, errors as one line.
/// </summary>
public sealed class GenerateCommandTests : IAsyncLifetime
{
    private const string Pool = PipelineHarness.Flux;
    private static readonly byte[] Png1 = [0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A, .. RandomNumberGenerator.GetBytes(300)];
    private static readonly byte[] Png2 = [0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A, .. RandomNumberGenerator.GetBytes(200)];

    private LoraDeployServer _server = null!;
    private FakeWorker _worker = null!;
    private TestUser _user = null!;
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "loradeploy-tests", "generate-" + Guid.NewGuid().ToString("N"));
    private readonly ConcurrentQueue<JsonElement> _bodies = new();

    public async ValueTask InitializeAsync()
    {
        Directory.CreateDirectory(_dir);
        _server = await LoraDeployServer.StartAsync(settings: ServingCoreTests.PoolSettings());
        var token = await _server.QueryAsync(db => WorkerTokens.CreateAsync(db, "gpu-box", DateTime.UtcNow, CancellationToken.None));
        _worker = await FakeWorker.StartAsync(_server.BaseUrl, token, "w1", Pool);
        _user = await _server.CreateUserAsync("painter");
        // Routable once registered: wait for it, so a test's first request does not meet a 503.
        var deadline = DateTime.UtcNow.AddSeconds(10);
        _worker.Answer = async http => await http.Response.WriteAsync("{}");
        while ((await _user.Client.PostJsonAsync($"/v1/inference/{Pool}", new { prompt = "warm-up" })).StatusCode == System.Net.HttpStatusCode.ServiceUnavailable)
        {
            Assert.True(DateTime.UtcNow < deadline, "the worker never became routable");
            await Task.Delay(50);
        }
    }

    public async ValueTask DisposeAsync()
    {
        await _worker.DisposeAsync();
        await _server.DisposeAsync();
        Directory.Delete(_dir, recursive: true);
    }

    private Task<CliResult> GenerateAsync(params string[] args) =>
        LoraDeployExe.RunAsync(["generate", .. args, "--server", _server.BaseUrl.ToString(), "--token", _user.Token]);

    private static string DataUrl(byte[] png) => "data:image/png;base64," + Convert.ToBase64String(png);

    private static string Answer(params byte[][] images) => JsonSerializer.Serialize(new
    {
        images = images.Select(DataUrl).ToArray(),
        nsfw_content_detected = images.Select(_ => false).ToArray(),
        seed = 987654321,
        request_id = "req-1",
        inference_status = new { status = "succeeded", runtime_ms = 12 },
    });

    /// <summary>A worker that streams progress steps, then the result (or an error).</summary>
    private Func<HttpContext, Task> Streaming(int steps, string? result, (int Status, string Message)? error = null) => async http =>
    {
        using var body = await JsonDocument.ParseAsync(http.Request.Body);
        _bodies.Enqueue(body.RootElement.Clone());
        for (var step = 1; step <= steps; step++)
        {
            await ImageProgressStream.WriteProgressAsync(http.Response, step, steps, http.RequestAborted);
        }
        if (error is { } e)
        {
            await ImageProgressStream.WriteErrorAsync(http.Response, e.Status, e.Message, http.RequestAborted);
            return;
        }
        await ImageProgressStream.WriteResultAsync(http.Response, Encoding.UTF8.GetBytes(result!), http.RequestAborted);
    };

    [Fact]
    public async Task Streamed_progress_then_two_images_written_as_numbered_files_and_the_seed_printed()
    {
        _worker.Answer = Streaming(4, Answer(Png1, Png2));
        var output = Path.Combine(_dir, "out.png");

        var result = await GenerateAsync("--base", Pool, "a red fox", "-o", output, "-n", "2", "--seed", "42", "--steps", "4",
            "--scale", "0.7", "--width", "512", "--height", "768", "--negative", "blurry");

        Assert.True(result.ExitCode == 0, result.ToString());
        Assert.Equal(Png1, await File.ReadAllBytesAsync(Path.Combine(_dir, "out-1.png")));
        Assert.Equal(Png2, await File.ReadAllBytesAsync(Path.Combine(_dir, "out-2.png")));
        Assert.False(File.Exists(output));
        var lines = result.StdOut.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        Assert.Equal(["step 1/4", "step 2/4", "step 3/4", "step 4/4"], lines.Where(l => l.StartsWith("step ", StringComparison.Ordinal)));
        Assert.Contains(lines, l => l.StartsWith($"wrote {Path.Combine(_dir, "out-1.png")}", StringComparison.Ordinal));
        Assert.Equal("seed 987654321", lines[^1]);
        Assert.Equal("", result.StdErr);

        var sent = Assert.Single(_bodies);
        Assert.Equal("a red fox", sent.GetProperty("prompt").GetString());
        Assert.True(sent.GetProperty("stream").GetBoolean());
        Assert.Equal(42, sent.GetProperty("seed").GetInt64());
        Assert.Equal(4, sent.GetProperty("num_inference_steps").GetInt32());
        Assert.Equal(0.7, sent.GetProperty("lora_scale").GetDouble(), 6);
        Assert.Equal(512, sent.GetProperty("width").GetInt32());
        Assert.Equal(768, sent.GetProperty("height").GetInt32());
        Assert.Equal("blurry", sent.GetProperty("negative_prompt").GetString());
        Assert.Equal(2, sent.GetProperty("num_images").GetInt32());
    }

    [Fact]
    public async Task On_a_terminal_the_progress_is_a_bar_that_ends_at_the_last_step()
    {
        _worker.Answer = Streaming(5, Answer(Png1));
        var output = Path.Combine(_dir, "tty.png");

        // A pseudo-terminal (script): the live bar a user sees, not the plain lines of a pipe.
        var args = new[] { "generate", "--base", Pool, "a red fox", "-o", output, "--server", _server.BaseUrl.ToString(), "--token", _user.Token };
        var quoted = string.Join(' ', args.Select(a => "'" + a.Replace("'", "'\\''", StringComparison.Ordinal) + "'"));
        var start = LoraDeployExe.StartInfo([]);
        start.FileName = "script";
        start.ArgumentList.Clear();
        foreach (var arg in new[] { "-qec", $"stty cols 120 2>/dev/null; dotnet '{LoraDeployExe.DllPath}' {quoted}", "/dev/null" })
        {
            start.ArgumentList.Add(arg);
        }
        start.Environment["TERM"] = "xterm-256color";
        using var process = System.Diagnostics.Process.Start(start)!;
        process.StandardInput.Close();
        var screen = process.StandardOutput.ReadToEndAsync();
        await process.WaitForExitAsync(new CancellationTokenSource(TimeSpan.FromSeconds(120)).Token);

        Assert.True(process.ExitCode == 0, await screen);
        Assert.Contains("sampling 5/5", await screen);
        Assert.Contains("100%", await screen);
        Assert.Contains("seed 987654321", await screen);
        Assert.Equal(Png1, await File.ReadAllBytesAsync(output));
    }

    [Fact]
    public async Task A_plain_json_answer_writes_the_one_image_under_the_given_name()
    {
        _worker.Answer = async http => await http.Response.WriteAsync(Answer(Png1));
        var output = Path.Combine(_dir, "single.png");

        var result = await GenerateAsync("--base", Pool, "a red fox", "-o", output);

        Assert.True(result.ExitCode == 0, result.ToString());
        Assert.Equal(Png1, await File.ReadAllBytesAsync(output));
        Assert.DoesNotContain("step", result.StdOut);
        Assert.EndsWith("seed 987654321", result.StdOut.Trim());
    }

    [Fact]
    public async Task Json_output_lists_the_files_and_the_seed_only()
    {
        _worker.Answer = Streaming(2, Answer(Png1));
        var output = Path.Combine(_dir, "j.png");

        var result = await GenerateAsync("--base", Pool, "a red fox", "-o", output, "--json");

        Assert.True(result.ExitCode == 0, result.ToString());
        var json = JsonDocument.Parse(result.StdOut).RootElement;
        Assert.Equal(output, json.GetProperty("files")[0].GetString());
        Assert.Equal(987654321, json.GetProperty("seed").GetInt64());
        Assert.Equal("req-1", json.GetProperty("request_id").GetString());
    }

    [Fact]
    public async Task An_error_event_after_progress_prints_the_servers_message_and_exits_1()
    {
        _worker.Answer = Streaming(2, null, (503, "ComfyUI stopped answering; the job was cancelled"));
        var output = Path.Combine(_dir, "never.png");

        var result = await GenerateAsync("--base", Pool, "a red fox", "-o", output);

        Assert.Equal(1, result.ExitCode);
        Assert.Equal("error: generation failed (503): ComfyUI stopped answering; the job was cancelled", result.StdErr.Trim());
        Assert.False(File.Exists(output));
    }

    [Fact]
    public async Task A_stream_that_ends_without_a_result_is_an_error()
    {
        _worker.Answer = async http =>
        {
            await ImageProgressStream.WriteProgressAsync(http.Response, 1, 3, http.RequestAborted);
        };

        var result = await GenerateAsync("--base", Pool, "a red fox", "-o", Path.Combine(_dir, "cut.png"));

        Assert.Equal(1, result.ExitCode);
        Assert.Contains("without a result", result.StdErr);
    }

    [Fact]
    public async Task Server_refusals_print_its_message_and_exit_1()
    {
        _worker.Answer = Streaming(1, Answer(Png1));

        var invalid = await GenerateAsync("--base", Pool, "a red fox", "-o", Path.Combine(_dir, "x.png"), "--steps", "999");
        Assert.Equal(1, invalid.ExitCode);
        Assert.Contains("num_inference_steps must be an integer from 1 to 150", invalid.StdErr);

        var unknown = await GenerateAsync("nobody/nothing", "a red fox", "-o", Path.Combine(_dir, "y.png"));
        Assert.Equal(1, unknown.ExitCode);
        Assert.StartsWith("error: not found: ", unknown.StdErr);
        Assert.Contains("nobody/nothing", unknown.StdErr);
        Assert.Empty(_bodies);
    }

    [Theory]
    [InlineData("missing -o FILE", "owner/name", "a cat")]
    [InlineData("give owner/name and a prompt", "owner/name", "-o", "x.png")]
    [InlineData("with --base give only the prompt", "owner/name", "a cat", "--base", "b/m", "-o", "x.png")]
    [InlineData("the model must be owner/name, got 'justname'", "justname", "a cat", "-o", "x.png")]
    [InlineData("--seed must be a whole number, got 'abc'", "owner/name", "a cat", "-o", "x.png", "--seed", "abc")]
    [InlineData("--scale must be a number, got 'strong'", "owner/name", "a cat", "-o", "x.png", "--scale", "strong")]
    [InlineData("-n must be a whole number, got 'two'", "owner/name", "a cat", "-o", "x.png", "-n", "two")]
    public async Task Usage_errors_exit_2_with_one_line(string message, params string[] args)
    {
        // Nothing listens here: a usage error must be caught before any request.
        var result = await LoraDeployExe.RunAsync(["generate", .. args, "--server", $"http://127.0.0.1:{ServerProcess.FreePort()}"]);

        Assert.Equal(2, result.ExitCode);
        Assert.Equal("", result.StdOut);
        Assert.Contains(message, Assert.Single(result.StdErr.Split('\n', StringSplitOptions.RemoveEmptyEntries)));
    }
}
