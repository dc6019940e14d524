using System.Net;
using System.Net.Http.Json;
using System.Text.Json;
using LoraDeploy.Lora.Tests.Support;
using LoraDeploy.Tests.Simulator;

namespace LoraDeploy.Tests.Serving;

/// <summary>
/// The whole product on one machine, through the real llama.cpp engine: <c>serve</c>'s in-process worker loads a
/// generated tiny Llama; <c>POST /lora-model</c> imports a PEFT adapter from the (simulated) Hub; the deploy reaches
/// <c>running</c>; OpenAI chat and completions answer with the adapter applied.
/// </summary>
public sealed class LlmEndToEndTests : IAsyncLifetime
{
    private const string Pool = LoraModelImportTests.Pool;
    private readonly string _dir = Directory.CreateTempSubdirectory("llm-e2e-").FullName;
    private HuggingFaceSimulator _hub = null!;
    private LoraDeployServer _server = null!;
    private TestUser _user = null!;
    private TinyLlama _model = null!;

    public async ValueTask InitializeAsync()
    {
        _hub = await HuggingFaceSimulator.StartAsync();
        _model = new TinyLlama().Generate();
        var settings = LoraModelImportTests.LlmPoolSettings(_hub, _model.WriteGguf(Path.Combine(_dir, "tiny.gguf")));
        settings["Workers:Embedded"] = "true";
        settings["Workers:HeartbeatSeconds"] = "1";
        settings[$"BaseModels:{Pool}:Defaults:context_size"] = "256";
        settings[$"BaseModels:{Pool}:Defaults:threads"] = "1";
        _server = await LoraDeployServer.StartAsync(TestDatabase.Sqlite, settings);
        _user = await _server.CreateUserAsync("llm");
    }

    public async ValueTask DisposeAsync()
    {
        await _server.DisposeAsync();
        await _hub.DisposeAsync();
        Directory.Delete(_dir, recursive: true);
    }

    private async Task<string> DeployAsync(string name, int seed)
    {
        var fixture = new PeftAdapterFixture { Seed = seed, Std = 1.5f };
        _hub.AddAdapter($"alice/{name}", fixture.Generate(_model).Safetensors().ToBytes(), config: fixture.ConfigJson());
        var created = await (await _user.Client.PostJsonAsync("/lora-model",
            new { hf_model_name = $"alice/{name}", lora_model_name = name, base_model_name = Pool })).ExpectAsync(HttpStatusCode.OK);
        var id = created.GetProperty("deploy_id").GetString()!;
        var deadline = DateTime.UtcNow.AddSeconds(60);
        while (true)
        {
            var deploy = await (await _user.Client.GetAsync($"/deploy/{id}")).ExpectAsync(HttpStatusCode.OK);
            var status = deploy.GetProperty("status").GetString();
            Assert.NotEqual("failed", status);
            if (status == "running")
            {
                Assert.Equal(1, deploy.GetProperty("instances").GetProperty("running").GetInt32());
                return id;
            }
            Assert.True(DateTime.UtcNow < deadline, $"never running: {deploy}");
            await Task.Delay(100);
        }
    }

    private async Task<JsonElement> ChatAsync(string model, TestUser? user = null, HttpStatusCode expect = HttpStatusCode.OK)
    {
        var response = await (user ?? _user).Client.PostJsonAsync("/v1/openai/chat/completions", new
        {
            model,
            messages = new[] { new { role = "user", content = "hello world" } },
            max_tokens = 8,
            temperature = 0,
        });
        return await response.ExpectAsync(expect);
    }

    [Fact]
    public async Task A_hugging_face_adapter_runs_and_answers_chat_with_the_adapter_applied()
    {
        await DeployAsync("chatty", seed: 3);
        var owner = _user.Name;
        var withAdapter = await ChatAsync($"{owner}/chatty");
        Assert.Equal("chat.completion", withAdapter.GetProperty("object").GetString());
        var choice = withAdapter.GetProperty("choices")[0];
        Assert.Equal("assistant", choice.GetProperty("message").GetProperty("role").GetString());
        var usage = withAdapter.GetProperty("usage");
        Assert.InRange(usage.GetProperty("completion_tokens").GetInt32(), 1, 8);
        Assert.True(usage.GetProperty("prompt_tokens").GetInt32() > 0);
        Assert.Equal(usage.GetProperty("prompt_tokens").GetInt32() + usage.GetProperty("completion_tokens").GetInt32(), usage.GetProperty("total_tokens").GetInt32());
        Assert.Contains(choice.GetProperty("finish_reason").GetString(), new[] { "stop", "length" });

        // Greedy decoding is deterministic, and the adapter changes what the base model says.
        Assert.Equal(choice.GetProperty("message").GetProperty("content").GetString(),
            (await ChatAsync($"{owner}/chatty")).GetProperty("choices")[0].GetProperty("message").GetProperty("content").GetString());
        var baseAnswer = await ChatAsync(Pool);
        Assert.NotEqual(TokensOf(withAdapter), TokensOf(baseAnswer));

        // A private adapter is invisible to another user; the base model serves everybody.
        var stranger = await _server.CreateUserAsync("stranger");
        await ChatAsync($"{owner}/chatty", stranger, HttpStatusCode.NotFound);
        await ChatAsync(Pool, stranger);
    }

    [Fact]
    public async Task Completions_stream_as_sse_chunks_ending_in_done()
    {
        await DeployAsync("streamy", seed: 4);
        using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/completions")
        {
            Content = JsonContent.Create(new { model = $"{_user.Name}/streamy", prompt = "hello", max_tokens = 6, temperature = 0, stream = true }),
        };
        using var response = await _user.Client.SendAsync(request, HttpCompletionOption.ResponseHeadersRead);
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        Assert.Equal("text/event-stream", response.Content.Headers.ContentType?.MediaType);
        var events = (await response.Content.ReadAsStringAsync()).Split("\n\n", StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal("data: [DONE]", events[^1]);
        var chunks = events[..^1].Select(e => JsonDocument.Parse(e["data: ".Length..]).RootElement).ToList();
        Assert.All(chunks, c => Assert.Equal("text_completion", c.GetProperty("object").GetString()));
        Assert.NotNull(chunks[^1].GetProperty("choices")[0].GetProperty("finish_reason").GetString());

        Assert.True(response.Headers.TransferEncodingChunked); // a stream has no length

        using var wholeResponse = await _user.Client.PostJsonAsync("/v1/completions",
            new { model = $"{_user.Name}/streamy", prompt = "hello", max_tokens = 6, temperature = 0 });
        // A whole answer comes through with the worker's Content-Length: one write, no chunk framing.
        Assert.NotEqual(true, wholeResponse.Headers.TransferEncodingChunked);
        var whole = await wholeResponse.ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(whole.GetProperty("choices")[0].GetProperty("text").GetString(),
            string.Concat(chunks.Select(c => c.GetProperty("choices")[0].GetProperty("text").GetString())));
    }

    [Fact]
    public async Task Two_adapters_serve_concurrently_each_as_it_does_alone()
    {
        await DeployAsync("left", seed: 5);
        await DeployAsync("right", seed: 6);
        var owner = _user.Name;
        var alone = (TokensOf(await ChatAsync($"{owner}/left")), TokensOf(await ChatAsync($"{owner}/right")));
        var together = await Task.WhenAll(Enumerable.Range(0, 6).Select(i => ChatAsync(i % 2 == 0 ? $"{owner}/left" : $"{owner}/right")));
        for (var i = 0; i < together.Length; i++)
        {
            Assert.Equal(i % 2 == 0 ? alone.Item1 : alone.Item2, TokensOf(together[i]));
        }
        Assert.NotEqual(alone.Item1, alone.Item2);
    }

    [Fact]
    public async Task Logprobs_echo_token_id_prompts_and_the_native_body_come_through_the_gateway()
    {
        await DeployAsync("probed", seed: 7);
        var model = $"{_user.Name}/probed";

        // A token-id prompt is used exactly: three tokens, no BOS added; echo returns them first, the very first without a logprob.
        var completion = await (await _user.Client.PostJsonAsync("/v1/openai/completions",
            new { model, prompt = new[] { 267, 290, 297 }, max_tokens = 2, temperature = 0, echo = true, logprobs = 2 })).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(3, completion.GetProperty("usage").GetProperty("prompt_tokens").GetInt32());
        var logprobs = completion.GetProperty("choices")[0].GetProperty("logprobs");
        var generated = completion.GetProperty("usage").GetProperty("completion_tokens").GetInt32();
        Assert.Equal(3 + generated, logprobs.GetProperty("tokens").GetArrayLength());
        Assert.Equal(JsonValueKind.Null, logprobs.GetProperty("token_logprobs")[0].ValueKind);
        Assert.All(logprobs.GetProperty("token_logprobs").EnumerateArray().Skip(1), lp => Assert.True(lp.GetDouble() <= 0));
        Assert.All(logprobs.GetProperty("top_logprobs").EnumerateArray().Skip(1), top => Assert.InRange(top.EnumerateObject().Count(), 1, 2));

        var chat = await (await _user.Client.PostJsonAsync("/v1/chat/completions", new
        {
            model, messages = new[] { new { role = "user", content = "hi" } }, max_tokens = 3, temperature = 0, logprobs = true, top_logprobs = 3,
        })).ExpectAsync(HttpStatusCode.OK);
        var content = chat.GetProperty("choices")[0].GetProperty("logprobs").GetProperty("content");
        Assert.True(content.GetArrayLength() > 0);
        Assert.All(content.EnumerateArray(), t => Assert.Equal(3, t.GetProperty("top_logprobs").GetArrayLength()));

        var native = await (await _user.Client.PostJsonAsync($"/v1/inference/{model}", new { input = "hello", max_new_tokens = 3, temperature = 0 }))
            .ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(JsonValueKind.String, native.GetProperty("results")[0].GetProperty("generated_text").ValueKind);
        Assert.True(native.GetProperty("num_input_tokens").GetInt32() > 0);
        Assert.Equal("succeeded", native.GetProperty("inference_status").GetProperty("status").GetString());

        // What the engine refuses comes back as a 4xx naming it, not a crash: a prompt longer than the context.
        var tooLong = await _user.Client.PostJsonAsync("/v1/completions", new { model, prompt = Enumerable.Repeat(267, 400).ToArray(), max_tokens = 1 });
        Assert.Equal(HttpStatusCode.UnprocessableEntity, tooLong.StatusCode);
        Assert.Contains("context", (await tooLong.Content.ReadAsStringAsync()), StringComparison.OrdinalIgnoreCase);
    }

    /// <summary>The CLI's side of serving: <c>create --hf</c>, <c>status</c> with instances, <c>workers</c>.</summary>
    [Fact]
    public async Task Create_hf_follows_the_import_status_shows_instances_and_workers_lists_the_worker()
    {
        var user = await _server.CreateUserAsync("cli");
        var fixture = new PeftAdapterFixture();
        _hub.AddAdapter("alice/cli-lora", fixture.Generate(_model).Safetensors().ToBytes(), config: fixture.ConfigJson());
        var server = _server.BaseUrl.ToString();

        var created = await LoraDeploy.Tests.Dashboard.LoraDeployExe.RunAsync(
            ["create", "--hf", "alice/cli-lora", "--name", "cli-lora", "--server", server, "--token", user.Token, "--json"]);
        Assert.True(created.ExitCode == 0, created.ToString());
        var deploy = JsonDocument.Parse(created.StdOut).RootElement;
        Assert.Equal("text-generation", deploy.GetProperty("task").GetString()); // base chosen: the only LLM pool

        var deadline = DateTime.UtcNow.AddSeconds(60);
        while ((await (await user.Client.GetAsync($"/deploy/{deploy.GetProperty("deploy_id").GetString()}")).ExpectAsync(HttpStatusCode.OK))
               .GetProperty("status").GetString() != "running")
        {
            Assert.True(DateTime.UtcNow < deadline, "never running");
            await Task.Delay(100);
        }
        var status = await LoraDeploy.Tests.Dashboard.LoraDeployExe.RunAsync(["status", "cli-lora", "--server", server, "--token", user.Token]);
        Assert.True(status.ExitCode == 0, status.ToString());
        Assert.Contains("1 running, 0 pending", status.StdOut);

        var usage = await LoraDeploy.Tests.Dashboard.LoraDeployExe.RunAsync(
            ["create", "--hf", "a/b", "--civitai", "https://civitai.com/models/1", "--name", "x", "--server", server, "--token", user.Token]);
        Assert.Equal(2, usage.ExitCode);
        Assert.Contains("exactly one of --civitai URL, --file PATH or --hf REPO", usage.StdErr);

        var admin = await _server.QueryAsync(db => LoraDeploy.Auth.ApiTokens.CreateForUserAsync(db, "root", isAdmin: true, "test", DateTime.UtcNow, CancellationToken.None));
        var workers = await LoraDeploy.Tests.Dashboard.LoraDeployExe.RunAsync(["workers", "--server", server, "--token", admin]);
        Assert.True(workers.ExitCode == 0, workers.ToString());
        Assert.Contains("llamacpp", workers.StdOut);
        Assert.Contains(LoraModelImportTests.Pool, workers.StdOut);
        var refused = await LoraDeploy.Tests.Dashboard.LoraDeployExe.RunAsync(["workers", "--server", server, "--token", user.Token]);
        Assert.NotEqual(0, refused.ExitCode);
    }

    private static string TokensOf(JsonElement chat) => chat.GetProperty("choices")[0].GetProperty("message").GetProperty("content").GetString()!;
}
