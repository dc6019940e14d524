using LLama.Native;
using LoraDeploy.Lora.Gguf;
using LoraDeploy.Lora.Tests.Support;
using LoraDeploy.Serving.LlamaCpp;

namespace LoraDeploy.Tests.Serving;

/// <summary>
/// Adapters on the engine: they change the output, scale 0 and no adapter are the base model exactly, contexts never
/// serve one adapter set's KV cache to another, prefix reuse matches a cold run, unloading waits for users.
/// Exact comparisons run with an F32 KV cache and no flash attention (see <see cref="LlamaCppEngineOptions"/>).
/// </summary>
public sealed class LlamaCppEngineTests : IDisposable
{
    private readonly LlamaCppTestKit _kit = new();

    public void Dispose() => _kit.Dispose();

    [Fact]
    public async Task Adapter_changes_output_scale_zero_and_no_adapter_are_the_base()
    {
        await using var engine = _kit.Engine();
        Assert.IsType<LoraLoadResult.Loaded>(engine.LoadAdapter("x", _kit.Adapter("x", seed: 11)));

        var baseline = await _kit.Distributions(engine, []);
        var withX = await _kit.Distributions(engine, [new("x", 1f)]);
        var scaleZero = await _kit.Distributions(engine, [new("x", 0f)]);
        var half = await _kit.Distributions(engine, [new("x", 0.5f)]);
        var cleared = await _kit.Distributions(engine, []);

        Assert.NotEqual(baseline[0], withX[0]);
        Assert.NotEqual(withX[0], half[0]);
        Assert.Equal(baseline, scaleZero);
        Assert.Equal(baseline, cleared);
        Assert.Equal(withX, await _kit.Distributions(engine, [new("x", 1f)]));
    }

    [Fact]
    public async Task Two_adapters_at_once_differ_from_each_alone()
    {
        await using var engine = _kit.Engine();
        engine.LoadAdapter("x", _kit.Adapter("x", seed: 11));
        engine.LoadAdapter("y", _kit.Adapter("y", seed: 12));

        var x = await _kit.Distributions(engine, [new("x", 1f)]);
        var y = await _kit.Distributions(engine, [new("y", 1f)]);
        var both = await _kit.Distributions(engine, [new("x", 1f), new("y", 1f)]);
        var bothReordered = await _kit.Distributions(engine, [new("y", 1f), new("x", 1f)]);

        Assert.NotEqual(x[0], both[0]);
        Assert.NotEqual(y[0], both[0]);
        Assert.Equal(both, bothReordered);
    }

    [Fact]
    public async Task Two_adapters_on_two_contexts_concurrently_equal_sequential_runs()
    {
        await using var engine = _kit.Engine(slots: 2);
        engine.LoadAdapter("x", _kit.Adapter("x", seed: 11));
        engine.LoadAdapter("y", _kit.Adapter("y", seed: 12));
        var x = await _kit.Distributions(engine, [new("x", 1f)], maxTokens: 8);
        var y = await _kit.Distributions(engine, [new("y", 1f)], maxTokens: 8);

        for (var round = 0; round < 3; round++)
        {
            var concurrentX = Task.Run(() => _kit.Distributions(engine, [new("x", 1f)], maxTokens: 8));
            var concurrentY = Task.Run(() => _kit.Distributions(engine, [new("y", 1f)], maxTokens: 8));
            Assert.Equal(x, await concurrentX);
            Assert.Equal(y, await concurrentY);
        }
    }

    [Fact]
    public async Task Switching_the_adapter_set_on_a_context_clears_its_kv_cache()
    {
        var y = _kit.Adapter("y", seed: 12);
        List<float[]> fresh;
        await using (var cold = _kit.Engine(slots: 1))
        {
            cold.LoadAdapter("y", y);
            fresh = await _kit.Distributions(cold, [new("y", 1f)]);
        }

        // One slot: the same context first caches the prompt computed with X, then serves the same prompt with Y.
        await using var engine = _kit.Engine(slots: 1);
        engine.LoadAdapter("x", _kit.Adapter("x", seed: 11));
        engine.LoadAdapter("y", y);
        await _kit.Distributions(engine, [new("x", 1f)]);
        Assert.Equal(fresh, await _kit.Distributions(engine, [new("y", 1f)]));
    }

    [Fact]
    public async Task Prefix_reuse_gives_the_same_logprobs_and_tokens_as_a_cold_run()
    {
        const string Short = "hello world the";
        const string Long = "hello world the a is of and to in hello";
        var x = _kit.Adapter("x", seed: 11);
        List<float[]> cold;
        await using (var coldEngine = _kit.Engine(slots: 1))
        {
            coldEngine.LoadAdapter("x", x);
            cold = await _kit.Distributions(coldEngine, [new("x", 1f)], prompt: Long, maxTokens: 6);
        }

        await using var engine = _kit.Engine(slots: 1);
        engine.LoadAdapter("x", x);
        await _kit.Distributions(engine, [new("x", 1f)], prompt: Short, maxTokens: 6);
        Assert.Equal(cold, await _kit.Distributions(engine, [new("x", 1f)], prompt: Long, maxTokens: 6));
        // The same prompt again: everything but the last prompt token comes from the cache.
        Assert.Equal(cold, await _kit.Distributions(engine, [new("x", 1f)], prompt: Long, maxTokens: 6));
        // A shorter prompt after a longer one: the cached tail is removed.
        await using var shortCold = _kit.Engine(slots: 1);
        shortCold.LoadAdapter("x", x);
        Assert.Equal(
            await _kit.Distributions(shortCold, [new("x", 1f)], prompt: Short, maxTokens: 6),
            await _kit.Distributions(engine, [new("x", 1f)], prompt: Short, maxTokens: 6));
    }

    [Fact]
    public async Task Unload_waits_for_a_request_using_the_adapter_and_refuses_new_ones()
    {
        await using var engine = _kit.Engine(slots: 2);
        engine.LoadAdapter("x", _kit.Adapter("x", seed: 11));
        var expected = await _kit.Collect(engine, _kit.Request([new("x", 1f)], maxTokens: 12));

        await using var running = engine.GenerateAsync(_kit.Request([new("x", 1f)], maxTokens: 12)).GetAsyncEnumerator();
        Assert.True(await running.MoveNextAsync());
        var chunks = new List<LlamaCppChunk> { running.Current };

        var unload = engine.UnloadAdapterAsync("x");
        Assert.False(unload.IsCompleted);
        Assert.DoesNotContain("x", engine.ResidentAdapters);
        var refused = await Assert.ThrowsAsync<LlamaCppRequestException>(() => _kit.Collect(engine, _kit.Request([new("x", 1f)])));
        Assert.Equal(LlamaCppErrorKind.UnknownAdapter, refused.Kind);
        // Another context keeps serving meanwhile.
        await _kit.Collect(engine, _kit.Request([], maxTokens: 2));

        while (await running.MoveNextAsync())
        {
            chunks.Add(running.Current);
        }
        Assert.Equal(Texts(expected), Texts(chunks));
        Assert.True(await unload);
        Assert.Empty(engine.ResidentAdapters);
        // Trap 2: no context may keep a pointer to the freed adapter.
        Assert.DoesNotContain(engine.AppliedAdapterSets(), k => k.Contains("x#", StringComparison.Ordinal));
        Assert.False(await engine.UnloadAdapterAsync("x"));
    }

    [Fact]
    public async Task Unload_then_load_again_serves_the_adapter_as_before()
    {
        await using var engine = _kit.Engine(slots: 1);
        var path = _kit.Adapter("x", seed: 11);
        engine.LoadAdapter("x", path);
        var first = await _kit.Distributions(engine, [new("x", 1f)]);

        Assert.Equal(["x#1=1"], engine.AppliedAdapterSets());
        Assert.True(await engine.UnloadAdapterAsync("x"));
        Assert.Equal([""], engine.AppliedAdapterSets());
        var baseline = await _kit.Distributions(engine, []);
        Assert.NotEqual(first, baseline);

        Assert.IsType<LoraLoadResult.Loaded>(engine.LoadAdapter("x", path));
        Assert.Equal(["x"], engine.ResidentAdapters);
        Assert.Equal(first, await _kit.Distributions(engine, [new("x", 1f)]));
        // Loading the same id from the same file again is a no-op; from another file it is refused.
        Assert.IsType<LoraLoadResult.Loaded>(engine.LoadAdapter("x", path));
        Assert.IsType<LoraLoadResult.Refused>(engine.LoadAdapter("x", _kit.Adapter("other", seed: 13)));
    }

    [Fact]
    public async Task An_id_reloaded_from_another_file_serves_the_new_weights()
    {
        var other = _kit.Adapter("other", seed: 13);
        List<float[]> expected;
        await using (var cold = _kit.Engine(slots: 1))
        {
            cold.LoadAdapter("x", other);
            expected = await _kit.Distributions(cold, [new("x", 1f)]);
        }

        await using var engine = _kit.Engine(slots: 1);
        engine.LoadAdapter("x", _kit.Adapter("x", seed: 11));
        await _kit.Distributions(engine, [new("x", 1f)]);
        await engine.UnloadAdapterAsync("x");
        engine.LoadAdapter("x", other);
        Assert.Equal(expected, await _kit.Distributions(engine, [new("x", 1f)]));
    }

    [Fact]
    public async Task A_request_naming_an_adapter_that_is_not_loaded_is_refused()
    {
        await using var engine = _kit.Engine();
        var e = await Assert.ThrowsAsync<LlamaCppRequestException>(() => _kit.Collect(engine, _kit.Request([new("nope", 1f)])));
        Assert.Equal(LlamaCppErrorKind.UnknownAdapter, e.Kind);
        Assert.Contains("'nope'", e.Message);
    }

    [Fact]
    public async Task A_request_goes_to_the_context_holding_its_set_else_the_least_recently_used_one()
    {
        await using var engine = _kit.Engine(slots: 2);
        engine.LoadAdapter("x", _kit.Adapter("x", seed: 11));
        engine.LoadAdapter("y", _kit.Adapter("y", seed: 12));
        engine.LoadAdapter("z", _kit.Adapter("z", seed: 13));

        await _kit.Collect(engine, _kit.Request([new("x", 1f)]));
        await _kit.Collect(engine, _kit.Request([new("y", 1f)]));
        await _kit.Collect(engine, _kit.Request([new("x", 1f)]));
        await _kit.Collect(engine, _kit.Request([new("y", 1f)]));
        Assert.Equal(["x#1=1", "y#2=1"], engine.AppliedAdapterSets());

        // x was used longest ago: z takes its context.
        await _kit.Collect(engine, _kit.Request([new("x", 1f)]));
        await _kit.Collect(engine, _kit.Request([new("y", 1f)]));
        await _kit.Collect(engine, _kit.Request([new("z", 0.5f)]));
        Assert.Equal(["z#3=0.5", "y#2=1"], engine.AppliedAdapterSets());
    }

    [Fact]
    public async Task A_base_model_llama_cpp_cannot_load_fails_with_its_reason()
    {
        var broken = Path.Combine(_kit.Dir, "broken.gguf");
        var bytes = await File.ReadAllBytesAsync(_kit.ModelPath);
        await File.WriteAllBytesAsync(broken, bytes[..(bytes.Length / 2)]);

        var e = Assert.Throws<LlamaCppEngineException>(() => LlamaCppEngine.Load(new LlamaCppEngineOptions { ModelPath = broken }));
        Assert.Contains("could not load the base model", e.Message);
        Assert.DoesNotContain("no reason given", e.Message);

        var slots = Assert.Throws<ArgumentException>(() => LlamaCppEngine.Load(new LlamaCppEngineOptions { ModelPath = _kit.ModelPath, Slots = 0 }));
        Assert.StartsWith("Slots", slots.Message);
        Assert.Throws<FileNotFoundException>(() => LlamaCppEngine.Load(new LlamaCppEngineOptions { ModelPath = broken + ".missing" }));
    }

    [Fact]
    public async Task Dispose_waits_for_a_running_request()
    {
        var engine = _kit.Engine(slots: 1);
        var chunks = new List<LlamaCppChunk>();
        await using (var running = engine.GenerateAsync(_kit.Request([], maxTokens: 6)).GetAsyncEnumerator())
        {
            Assert.True(await running.MoveNextAsync());
            var disposing = engine.DisposeAsync().AsTask();
            Assert.False(disposing.IsCompleted);
            await Assert.ThrowsAsync<ObjectDisposedException>(() => _kit.Collect(engine, _kit.Request([])));
            while (await running.MoveNextAsync())
            {
                chunks.Add(running.Current);
            }
            await running.DisposeAsync();
            await disposing;
        }
        Assert.Equal("length", chunks[^1].FinishReason);
    }

    [Fact]
    public async Task The_serving_defaults_f16_kv_cache_and_automatic_flash_attention_generate_with_adapters()
    {
        await using var engine = LlamaCppEngine.Load(new LlamaCppEngineOptions { ModelPath = _kit.ModelPath, ContextSize = 128, Threads = 2 });
        engine.LoadAdapter("x", _kit.Adapter("x", seed: 11));
        var baseline = await _kit.Distributions(engine, []);
        var withX = await _kit.Distributions(engine, [new("x", 1f)]);
        Assert.NotEqual(baseline[0], withX[0]);
        Assert.All(withX[0], v => Assert.True(float.IsFinite(v)));
        Assert.Equal(baseline, await _kit.Distributions(engine, [new("x", 0f)]));
    }

    [Fact]
    public async Task The_dll_resolver_serves_llama_and_leaves_other_libraries_to_default_probing()
    {
        await using var engine = _kit.Engine();
        var assembly = typeof(LlamaCppEngine).Assembly;
        Assert.NotEqual(IntPtr.Zero, LlamaLibraryResolver.Resolve("llama", assembly, null));
        Assert.Equal(IntPtr.Zero, LlamaLibraryResolver.Resolve("libc", assembly, null));
        LlamaLibraryResolver.EnsureRegistered();

        // The blob store's libc imports (fsync of a directory) still bind with our resolver registered.
        var store = new LoraDeploy.Storage.FileSystemBlobStore(Path.Combine(_kit.Dir, "blobs"));
        var bytes = "blob"u8.ToArray();
        var sha = Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(bytes));
        await store.PutAsync(sha, new MemoryStream(bytes));
        Assert.True(store.Exists(sha));
    }

    private static List<string> Texts(IEnumerable<LlamaCppChunk> chunks) => chunks.Select(c => c.Text).ToList();
}

/// <summary>A generated tiny Llama and LoRA adapter GGUFs written by hand (reference/serving.md A4, A3.3).</summary>
internal sealed class LlamaCppTestKit : IDisposable
{
    public const string Prompt = "hello world";

    public LlamaCppTestKit()
    {
        Dir = Directory.CreateTempSubdirectory("llamacpp-engine-").FullName;
        Model = new TinyLlama().Generate();
        ModelPath = Model.WriteGguf(Path.Combine(Dir, "tiny.gguf"));
    }

    public string Dir { get; }
    public TinyLlama Model { get; }
    public string ModelPath { get; }

    public void Dispose() => Directory.Delete(Dir, recursive: true);

    public LlamaCppEngine Engine(int slots = 2, uint contextSize = 256) => LlamaCppEngine.Load(new LlamaCppEngineOptions
    {
        ModelPath = ModelPath,
        ContextSize = contextSize,
        Threads = 2,
        Slots = slots,
        KvCacheType = GGMLType.GGML_TYPE_F32,
        FlashAttention = false,
    });

    /// <summary>
    /// A LoRA on every projection of every layer: lora_a ne [in, r], lora_b ne [r, out], random values. Hostile
    /// variants: another architecture, an extra pair for a tensor the base lacks, a lora_a one column too wide.
    /// </summary>
    public string Adapter(string name, int seed, int rank = 4, float alpha = 8f, string architecture = "llama",
        bool tensorMissingInBase = false, bool wrongShape = false)
    {
        var random = new Random(seed);
        var writer = new GgufWriter()
            .Add("general.architecture", architecture)
            .Add("general.type", "adapter")
            .Add("adapter.type", "lora")
            .Add("adapter.lora.alpha", alpha);
        string[] kinds = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];
        for (var layer = 0; layer < Model.Layers; layer++)
        {
            var projections = Model.Projections(layer).ToArray();
            for (var k = 0; k < kinds.Length; k++)
            {
                var (_, inFeatures, outFeatures) = projections[k];
                var aIn = wrongShape && layer == 0 && k == 0 ? inFeatures + 1 : inFeatures;
                Pair(writer, $"blk.{layer}.{kinds[k]}.weight", aIn, outFeatures, rank, random);
            }
        }
        if (tensorMissingInBase)
        {
            Pair(writer, $"blk.{Model.Layers + 7}.attn_q.weight", Model.Hidden, Model.Hidden, rank, random);
        }
        var path = Path.Combine(Dir, name + ".gguf");
        writer.WriteTo(path);
        return path;
    }

    private static void Pair(GgufWriter writer, string weight, int inFeatures, int outFeatures, int rank, Random random)
    {
        writer.AddTensor(weight + ".lora_a", [inFeatures, rank], Values(inFeatures * rank, random));
        writer.AddTensor(weight + ".lora_b", [rank, outFeatures], Values(rank * outFeatures, random));
    }

    private static float[] Values(int count, Random random)
    {
        var values = new float[count];
        for (var i = 0; i < count; i++)
        {
            values[i] = TinyLlama.Normal(random) * 0.5f;
        }
        return values;
    }

    public LlamaCppRequest Request(IReadOnlyList<LlamaCppAdapterUse> adapters, string prompt = Prompt, int maxTokens = 4, int? logprobs = null) => new()
    {
        Prompt = new LlamaCppPrompt.Text(prompt),
        Adapters = adapters,
        MaxTokens = maxTokens,
        Temperature = 0,
        Logprobs = logprobs,
    };

    public async Task<List<LlamaCppChunk>> Collect(LlamaCppEngine engine, LlamaCppRequest request, CancellationToken cancellationToken = default)
    {
        var chunks = new List<LlamaCppChunk>();
        await foreach (var chunk in engine.GenerateAsync(request, cancellationToken))
        {
            chunks.Add(chunk);
        }
        return chunks;
    }

    /// <summary>Greedy generation; for each generated token the full log-probability distribution (log-softmax of the logits), by token id.</summary>
    public async Task<List<float[]>> Distributions(LlamaCppEngine engine, IReadOnlyList<LlamaCppAdapterUse> adapters, string prompt = Prompt, int maxTokens = 4)
    {
        var vocab = engine.Model.VocabSize;
        var chunks = await Collect(engine, Request(adapters, prompt, maxTokens, logprobs: vocab));
        var result = new List<float[]>();
        foreach (var chunk in chunks.Where(c => c.Kind == LlamaCppChunkKind.Completion))
        {
            var distribution = new float[vocab];
            foreach (var top in chunk.Token!.TopLogprobs!)
            {
                distribution[top.Id] = top.Logprob;
            }
            result.Add(distribution);
        }
        Assert.NotEmpty(result);
        return result;
    }
}
