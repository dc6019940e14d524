using LLama;
using LLama.Common;
using LLama.Native;
using LoraDeploy.Lora.Tests.Support;
using LoraDeploy.Serving.LlamaCpp;
using Microsoft.Extensions.Logging.Abstractions;

namespace LoraDeploy.Tests.Serving;

/// <summary>The generated tiny Llama loads in the shipped llama.cpp and decodes to finite, seed-dependent logits.</summary>
public sealed class TinyLlamaSmokeTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("tinyllama-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void Generated_model_loads_tokenizes_and_decodes()
    {
        var path = new TinyLlama().Generate().WriteGguf(Path.Combine(_dir, "tiny.gguf"));
        var first = Logits(path, "hello world");
        Assert.Equal(320, first.Length);
        Assert.All(first, v => Assert.True(float.IsFinite(v)));
        Assert.Equal(first, Logits(path, "hello world"));

        var other = new TinyLlama { Seed = 2 }.Generate().WriteGguf(Path.Combine(_dir, "other.gguf"));
        Assert.NotEqual(first, Logits(other, "hello world"));
    }

    private static float[] Logits(string path, string text)
    {
        var parameters = new ModelParams(path) { ContextSize = 256, GpuLayerCount = 0 };
        using var quiet = LlamaNativeLog.Begin(NullLogger.Instance);
        using var weights = LLamaWeights.LoadFromFile(parameters);
        using var context = weights.CreateContext(parameters);
        var tokens = context.Tokenize(text, addBos: true, special: false);
        var batch = new LLamaBatch();
        for (var i = 0; i < tokens.Length; i++)
        {
            batch.Add(tokens[i], i, LLamaSeqId.Zero, i == tokens.Length - 1);
        }
        Assert.Equal(DecodeResult.Ok, context.NativeHandle.Decode(batch));
        return context.NativeHandle.GetLogitsIth(batch.TokenCount - 1).ToArray();
    }
}
