using LoraDeploy.Serving.LlamaCpp;

namespace LoraDeploy.Tests.Serving;

/// <summary>
/// Adapter files llama.cpp refuses come back as refusals carrying llama.cpp's reason, and the process keeps serving.
/// LLamaSharp's own LoadLoraFromFile would hand back a null adapter that segfaults the process on the next decode
/// (reference/serving.md A1.3); these tests run in the test process itself, so a crash fails the whole run.
/// </summary>
public sealed class LlamaCppHostileAdapterTests : IDisposable
{
    private readonly LlamaCppTestKit _kit = new();

    public void Dispose() => _kit.Dispose();

    public static TheoryData<string, string> Cases => new()
    {
        { "wrong-arch", "model arch and LoRA arch mismatch" },
        { "tensor-missing-in-base", "does not exist in base model" },
        { "wrong-shape", "has incorrect shape" },
        { "truncated", "unexpectedly reached end of file" },
        { "not-a-gguf", "invalid magic characters" },
        { "empty", "failed to read magic" },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public async Task A_hostile_adapter_is_refused_with_llama_cpps_reason_and_the_engine_keeps_serving(string kind, string expectedReason)
    {
        var path = Hostile(kind);
        await using var engine = _kit.Engine();
        var baseline = await _kit.Distributions(engine, []);

        var result = engine.LoadAdapter("bad", path);

        var refused = Assert.IsType<LoraLoadResult.Refused>(result);
        Assert.StartsWith("llama.cpp refused the adapter: ", refused.Reason);
        Assert.DoesNotContain("gave no reason", refused.Reason);
        Assert.Contains(expectedReason, refused.Reason);
        Assert.Empty(engine.ResidentAdapters);
        var use = await Assert.ThrowsAsync<LlamaCppRequestException>(() => _kit.Collect(engine, _kit.Request([new("bad", 1f)])));
        Assert.Equal(LlamaCppErrorKind.UnknownAdapter, use.Kind);

        // Still serving: the base decodes as before, and a good adapter loads and applies.
        Assert.Equal(baseline, await _kit.Distributions(engine, []));
        Assert.IsType<LoraLoadResult.Loaded>(engine.LoadAdapter("good", _kit.Adapter("good", seed: 5)));
        Assert.NotEqual(baseline, await _kit.Distributions(engine, [new("good", 1f)]));
    }

    [Fact]
    public async Task A_missing_file_is_refused_without_calling_llama_cpp()
    {
        await using var engine = _kit.Engine();
        var refused = Assert.IsType<LoraLoadResult.Refused>(engine.LoadAdapter("gone", Path.Combine(_kit.Dir, "gone.gguf")));
        Assert.Contains("does not exist", refused.Reason);
    }

    [Fact]
    public async Task The_refusal_reason_belongs_to_its_own_load_when_loads_run_on_several_threads()
    {
        // Two engines: each serializes its own adapter loads, so loads on the two interleave in llama.cpp's log.
        await using var first = _kit.Engine();
        await using var second = _kit.Engine();
        var arch = Hostile("wrong-arch");
        var shape = Hostile("wrong-shape");
        var results = new LoraLoadResult[1000];
        await Task.WhenAll(Enumerable.Range(0, 4).Select(worker => Task.Run(() =>
        {
            for (var i = worker; i < results.Length; i += 4)
            {
                results[i] = (i % 2 == 0 ? first : second).LoadAdapter($"a{i}", i % 2 == 0 ? arch : shape);
            }
        })));
        for (var i = 0; i < results.Length; i++)
        {
            var refused = Assert.IsType<LoraLoadResult.Refused>(results[i]);
            Assert.Contains(i % 2 == 0 ? "arch mismatch" : "incorrect shape", refused.Reason);
            Assert.DoesNotContain(i % 2 == 0 ? "incorrect shape" : "arch mismatch", refused.Reason);
        }
    }

    private string Hostile(string kind)
    {
        var path = Path.Combine(_kit.Dir, kind + ".gguf");
        switch (kind)
        {
            case "wrong-arch":
                File.Move(_kit.Adapter("wrong-arch-src", seed: 3, architecture: "qwen2"), path);
                break;
            case "tensor-missing-in-base":
                File.Move(_kit.Adapter("missing-src", seed: 3, tensorMissingInBase: true), path);
                break;
            case "wrong-shape":
                File.Move(_kit.Adapter("shape-src", seed: 3, wrongShape: true), path);
                break;
            case "truncated":
                var whole = File.ReadAllBytes(_kit.Adapter("whole", seed: 3));
                File.WriteAllBytes(path, whole[..(whole.Length * 2 / 3)]);
                break;
            case "not-a-gguf":
                File.WriteAllText(path, "{\"this\": \"is a safetensors header, not a GGUF\"}");
                break;
            case "empty":
                File.WriteAllBytes(path, []);
                break;
            default:
                throw new ArgumentOutOfRangeException(nameof(kind), kind, null);
        }
        return path;
    }
}
