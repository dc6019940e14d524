using LoraDeploy.Serving.LlamaCpp;

namespace LoraDeploy.Tests.Serving;

/// <summary>The generation API on the tiny Llama: prompts, stops, limits, sampling determinism, logprobs, echo, cancellation.</summary>
public sealed class LlamaCppGenerationTests : IDisposable
{
    private const int Bos = 1;
    private const int ImStart = 259;
    private const int ByteBase = 3;

    private readonly LlamaCppTestKit _kit = new();

    public void Dispose() => _kit.Dispose();

    [Fact]
    public async Task A_token_id_prompt_is_used_exactly_without_bos_and_a_text_prompt_gets_bos()
    {
        await using var engine = _kit.Engine();
        var text = engine.Tokenize("hello world");
        Assert.True(engine.Model.AddsBos);
        Assert.Equal(Bos, text[0]);

        int[] ids = [262, 263, 262];
        var chunks = await _kit.Collect(engine, Echo(new LlamaCppPrompt.Tokens(ids)));
        Assert.Equal(ids, Prompt(chunks).Select(c => c.Token!.Id));
        Assert.Equal(3, Finish(chunks).Usage!.PromptTokens);

        var fromText = await _kit.Collect(engine, Echo(new LlamaCppPrompt.Text("hello world")));
        Assert.Equal(text, Prompt(fromText).Select(c => c.Token!.Id));
        Assert.Equal(" hello world", string.Concat(Prompt(fromText).Select(c => c.Text)));
    }

    [Fact]
    public async Task Token_ids_outside_the_vocabulary_are_refused()
    {
        await using var engine = _kit.Engine();
        var e = await Assert.ThrowsAsync<LlamaCppRequestException>(() => _kit.Collect(engine, Echo(new LlamaCppPrompt.Tokens([5, 320]))));
        Assert.Equal(LlamaCppErrorKind.InvalidRequest, e.Kind);
        Assert.Contains("prompt token 1 is 320", e.Message);
    }

    [Fact]
    public async Task Chat_messages_are_rendered_with_the_ggufs_chat_template()
    {
        await using var engine = _kit.Engine();
        var chunks = await _kit.Collect(engine, Echo(new LlamaCppPrompt.Chat([new("system", "be brief"), new("user", "hello")])));

        var expected = engine.Tokenize("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n");
        Assert.Equal(expected, Prompt(chunks).Select(c => c.Token!.Id));
        Assert.Equal(3, expected.Count(id => id == ImStart));
        Assert.Equal(1, expected.Count(id => id == Bos));
    }

    [Fact]
    public async Task Chat_messages_on_a_model_without_a_chat_template_are_refused()
    {
        // Same file with the template key renamed (same length, so the GGUF stays valid): no template any more.
        var bytes = await File.ReadAllBytesAsync(_kit.ModelPath);
        var key = System.Text.Encoding.UTF8.GetBytes("tokenizer.chat_template");
        var at = bytes.AsSpan().IndexOf(key);
        Assert.True(at > 0);
        bytes[at + key.Length - 1] = (byte)'X';
        var path = Path.Combine(_kit.Dir, "no-template.gguf");
        await File.WriteAllBytesAsync(path, bytes);

        await using var engine = LlamaCppEngine.Load(new LlamaCppEngineOptions { ModelPath = path, ContextSize = 64, Threads = 2 });
        Assert.Null(engine.Model.ChatTemplate);
        var e = await Assert.ThrowsAsync<LlamaCppRequestException>(() =>
            _kit.Collect(engine, Greedy(2) with { Prompt = new LlamaCppPrompt.Chat([new("user", "hello")]) }));
        Assert.Equal(LlamaCppErrorKind.NoChatTemplate, e.Kind);
        Assert.Contains("no chat template", e.Message);
        Assert.Equal("length", Finish(await _kit.Collect(engine, Greedy(2))).FinishReason);
    }

    [Fact]
    public async Task Stop_strings_spanning_tokens_end_generation_before_the_stop_text()
    {
        await using var engine = _kit.Engine();
        var free = await _kit.Collect(engine, Greedy(32));
        var completion = free.Where(c => c.Kind == LlamaCppChunkKind.Completion).ToList();
        var full = Text(free);
        // The stop: the last character of one token's text and the first of the next one.
        var j = Enumerable.Range(4, completion.Count - 5).First(i => completion[i].Text.Length > 0 && completion[i + 1].Text.Length > 0);
        var stop = completion[j].Text[^1..] + completion[j + 1].Text[..1];

        var stopped = await _kit.Collect(engine, Greedy(32) with { Stop = ["never appears \u2603", stop] });

        Assert.Equal(full[..full.IndexOf(stop, StringComparison.Ordinal)], Text(stopped));
        Assert.Equal("stop", Finish(stopped).FinishReason);
        Assert.All(stopped, c => Assert.DoesNotContain(stop, c.Text));
        Assert.True(Finish(stopped).Usage!.CompletionTokens <= j + 2);

        // Text held back because it might start a stop string comes out when generation ends otherwise (here the
        // free run ends with an end-of-generation token).
        var partial = await _kit.Collect(engine, Greedy(32) with { Stop = [full[^1..] + "\u2603"] });
        Assert.Equal(full, Text(partial));
        Assert.Equal(full[^1..], Finish(partial).Text);
        Assert.Equal(Finish(free).FinishReason, Finish(partial).FinishReason);
    }

    [Fact]
    public async Task Max_tokens_ends_with_length_and_is_clipped_to_the_context()
    {
        await using var engine = _kit.Engine();
        var promptTokens = engine.Tokenize(LlamaCppTestKit.Prompt).Count;
        var chunks = await _kit.Collect(engine, Greedy(5));
        Assert.Equal(5, chunks.Count(c => c.Kind == LlamaCppChunkKind.Completion));
        Assert.Equal("length", Finish(chunks).FinishReason);
        Assert.Equal(new LlamaCppUsage(promptTokens, 5), Finish(chunks).Usage);

        await using var small = _kit.Engine(contextSize: 24);
        var clipped = await _kit.Collect(small, Greedy(1000));
        Assert.Equal("length", Finish(clipped).FinishReason);
        Assert.Equal(new LlamaCppUsage(promptTokens, 24 - promptTokens), Finish(clipped).Usage);

        var none = await _kit.Collect(engine, Greedy(0));
        Assert.Equal(new LlamaCppUsage(promptTokens, 0), Finish(none).Usage);
        Assert.Single(none);
    }

    [Fact]
    public async Task A_prompt_longer_than_the_context_is_refused_and_the_engine_keeps_serving()
    {
        await using var engine = _kit.Engine(contextSize: 16);
        var e = await Assert.ThrowsAsync<LlamaCppRequestException>(() =>
            _kit.Collect(engine, Greedy(4) with { Prompt = new LlamaCppPrompt.Tokens(Enumerable.Repeat(262, 16).ToArray()) }));
        Assert.Equal(LlamaCppErrorKind.PromptTooLong, e.Kind);
        Assert.Contains("16 tokens but the context holds 16", e.Message);

        Assert.Equal("length", Finish(await _kit.Collect(engine, Greedy(4))).FinishReason);
    }

    [Fact]
    public async Task Temperature_zero_is_deterministic_and_picks_the_most_likely_token()
    {
        await using var engine = _kit.Engine();
        var first = await _kit.Collect(engine, Greedy(16) with { Logprobs = 1 });
        var second = await _kit.Collect(engine, Greedy(16) with { Logprobs = 1 });
        Assert.Equal(Ids(first), Ids(second));
        Assert.All(first.Where(c => c.Kind == LlamaCppChunkKind.Completion),
            c => Assert.Equal(c.Token!.TopLogprobs![0].Id, c.Token.Id));
    }

    [Fact]
    public async Task A_fixed_seed_makes_sampling_repeatable()
    {
        await using var engine = _kit.Engine();
        var sampled = Greedy(24) with { Temperature = 1.5f, TopP = 0.95f, Seed = 42 };
        var first = Ids(await _kit.Collect(engine, sampled));
        Assert.Equal(first, Ids(await _kit.Collect(engine, sampled)));
        Assert.NotEqual(first, Ids(await _kit.Collect(engine, sampled with { Seed = 7 })));
        Assert.NotEqual(first, Ids(await _kit.Collect(engine, Greedy(24))));
    }

    [Fact]
    public async Task Logprobs_are_a_distribution_with_sorted_top_alternatives()
    {
        await using var engine = _kit.Engine();
        var vocab = engine.Model.VocabSize;
        var full = await _kit.Collect(engine, Greedy(4) with { Logprobs = vocab, Temperature = 1, Seed = 3 });
        var top5 = await _kit.Collect(engine, Greedy(4) with { Logprobs = 5, Temperature = 1, Seed = 3 });

        foreach (var (all, five) in full.Where(c => c.Kind == LlamaCppChunkKind.Completion)
                     .Zip(top5.Where(c => c.Kind == LlamaCppChunkKind.Completion)))
        {
            var distribution = all.Token!.TopLogprobs!;
            Assert.Equal(vocab, distribution.Count);
            Assert.Equal(1.0, distribution.Sum(t => Math.Exp(t.Logprob)), 1e-4);
            Assert.Equal(distribution.Single(t => t.Id == all.Token.Id).Logprob, all.Token.Logprob);

            var alternatives = five.Token!.TopLogprobs!;
            Assert.Equal(5, alternatives.Count);
            Assert.Equal(distribution.Take(5).Select(t => (t.Id, t.Logprob)), alternatives.Select(t => (t.Id, t.Logprob)));
            Assert.True(alternatives.Zip(alternatives.Skip(1)).All(p => p.First.Logprob >= p.Second.Logprob));
            Assert.All(alternatives, t => Assert.True(t.Logprob <= 0));
            Assert.Equal(all.Token.Id, five.Token.Id);
        }
        Assert.Null(Finish(await _kit.Collect(engine, Greedy(2))).Token);
        Assert.All((await _kit.Collect(engine, Greedy(2))).Where(c => c.Kind == LlamaCppChunkKind.Completion),
            c => Assert.Null(c.Token!.Logprob));
    }

    [Fact]
    public async Task Echo_returns_the_prompt_tokens_with_their_logprobs()
    {
        await using var engine = _kit.Engine();
        var generated = await _kit.Collect(engine, Greedy(1) with { Logprobs = 2 });
        var next = generated.Single(c => c.Kind == LlamaCppChunkKind.Completion).Token!;

        // The prompt followed by the token greedy chose: echo scores that token as the generation did.
        var prompt = engine.Tokenize(LlamaCppTestKit.Prompt).Append(next.Id).ToArray();
        var echoed = await _kit.Collect(engine, Greedy(2) with { Prompt = new LlamaCppPrompt.Tokens(prompt), Echo = true, Logprobs = 2 });

        var echo = Prompt(echoed);
        Assert.Equal(prompt, echo.Select(c => c.Token!.Id));
        Assert.Null(echo[0].Token!.Logprob);
        Assert.All(echo.Skip(1), c => Assert.Equal(2, c.Token!.TopLogprobs!.Count));
        Assert.Equal(next.Logprob!.Value, echo[^1].Token!.Logprob!.Value, 1e-4);
        Assert.Equal(next.TopLogprobs!.Select(t => t.Id), echo[^1].Token!.TopLogprobs!.Select(t => t.Id));
        Assert.Equal(2, echoed.Count(c => c.Kind == LlamaCppChunkKind.Completion));
        Assert.Equal(new LlamaCppUsage(prompt.Length, 2), Finish(echoed).Usage);
    }

    [Fact]
    public async Task A_utf8_character_split_over_byte_tokens_comes_out_whole()
    {
        await using var engine = _kit.Engine();
        // "é" is C3 A9 and "€" is E2 82 AC: byte-fallback tokens, each alone not valid UTF-8.
        int[] ids = [ByteBase + 'a', ByteBase + 0xC3, ByteBase + 0xA9, ByteBase + 0xE2, ByteBase + 0x82, ByteBase + 0xAC];
        var chunks = Prompt(await _kit.Collect(engine, Echo(new LlamaCppPrompt.Tokens(ids))));

        Assert.Equal(["a", "", "é", "", "", "€"], chunks.Select(c => c.Text));
        Assert.Equal([0xC3], chunks[1].Token!.Bytes);
    }

    [Fact]
    public async Task Cancelling_stops_generation_and_frees_the_context_for_a_waiting_request()
    {
        await using var engine = _kit.Engine(slots: 1);
        using var cancel = new CancellationTokenSource();
        await using var running = engine.GenerateAsync(Greedy(200), cancel.Token).GetAsyncEnumerator(cancel.Token);
        Assert.True(await running.MoveNextAsync());
        Assert.True(await running.MoveNextAsync());

        // The only context is busy: the next request waits for it.
        var waiting = _kit.Collect(engine, Greedy(3));
        Assert.False(waiting.IsCompleted);

        await cancel.CancelAsync();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () => await running.MoveNextAsync());

        Assert.Equal("length", Finish(await waiting).FinishReason);
        await using var already = engine.GenerateAsync(Greedy(3), cancel.Token).GetAsyncEnumerator();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () => await already.MoveNextAsync());
        Assert.Equal("length", Finish(await _kit.Collect(engine, Greedy(3))).FinishReason);
    }

    [Theory]
    [InlineData("temperature")]
    [InlineData("top_p")]
    [InlineData("max_tokens")]
    [InlineData("logprobs")]
    [InlineData("scale")]
    [InlineData("empty")]
    public async Task Invalid_parameters_are_refused_with_the_field_named(string field)
    {
        await using var engine = _kit.Engine();
        var request = field switch
        {
            "temperature" => Greedy(1) with { Temperature = -1 },
            "top_p" => Greedy(1) with { TopP = 0 },
            "max_tokens" => Greedy(1) with { MaxTokens = -1 },
            "logprobs" => Greedy(1) with { Logprobs = 321 },
            "scale" => Greedy(1) with { Adapters = [new("x", float.NaN)] },
            _ => Greedy(1) with { Prompt = new LlamaCppPrompt.Tokens([]) },
        };
        var e = await Assert.ThrowsAsync<LlamaCppRequestException>(() => _kit.Collect(engine, request));
        Assert.Equal(LlamaCppErrorKind.InvalidRequest, e.Kind);
        Assert.Contains(field == "empty" ? "prompt is empty" : field, e.Message);
    }

    private static LlamaCppRequest Greedy(int maxTokens) => new()
    {
        Prompt = new LlamaCppPrompt.Text(LlamaCppTestKit.Prompt),
        MaxTokens = maxTokens,
        Temperature = 0,
    };

    private static LlamaCppRequest Echo(LlamaCppPrompt prompt) => new() { Prompt = prompt, MaxTokens = 0, Echo = true };

    private static List<LlamaCppChunk> Prompt(List<LlamaCppChunk> chunks) => chunks.Where(c => c.Kind == LlamaCppChunkKind.Prompt).ToList();

    private static LlamaCppChunk Finish(List<LlamaCppChunk> chunks) => Assert.Single(chunks, c => c.Kind == LlamaCppChunkKind.Finish);

    private static string Text(List<LlamaCppChunk> chunks) =>
        string.Concat(chunks.Where(c => c.Kind != LlamaCppChunkKind.Prompt).Select(c => c.Text));

    private static List<int> Ids(List<LlamaCppChunk> chunks) =>
        chunks.Where(c => c.Kind == LlamaCppChunkKind.Completion).Select(c => c.Token!.Id).ToList();
}
