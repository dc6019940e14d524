using LoraDeploy.Lora.Merge;
using LoraDeploy.Lora.Tests.Support;
using static LoraDeploy.Lora.Tests.Merge.MergeFixtures;

namespace LoraDeploy.Lora.Tests.Merge;

/// <summary>
/// Plain LoRA merges run a few rows at a time on every core (the writer's row-chunk path). Tensors here span several
/// chunks, with rows and fused slices that fall on neither the chunks' nor the kernel's 4-row boundaries, and two
/// adapters on one tensor. The result must be bit for bit what the same F32 fused multiply-adds give in plain loops
/// written here, and an error must name the first bad element of the whole tensor, whichever chunk finds it.
/// </summary>
public sealed class MergeInRowChunksTests : IDisposable
{
    private const string ProjIn = "model.diffusion_model.input_blocks.4.1.proj_in.weight";
    private const string KohyaProjIn = "lora_unet_input_blocks_4_1_proj_in";
    private readonly string _dir = TempFiles.Directory();
    private readonly Random _random = new(17);

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Theory]
    [InlineData("F32")]
    [InlineData("BF16")]
    [InlineData("F16")]
    public void A_tensor_of_several_chunks_gets_the_bits_of_plain_fused_multiply_add_loops(string dtype)
    {
        // 203 rows of 700: chunks of 92 rows (92, 92, 19), a last kernel block of 3 rows, 12 columns past the vectors.
        var weight = Representable(Random(_random, ProjIn, [203, 700]), dtype);
        var basePath = Write(Path.Combine(_dir, "base.safetensors"), [weight], dtype);
        var first = Lora("first", KohyaProjIn, rows: 203, rest: 700, rank: 8, alpha: 4);
        var second = Lora("second", KohyaProjIn, rows: 203, rest: 700, rank: 3, alpha: null);

        var output = Path.Combine(_dir, "out.safetensors");
        LoraMerger.Merge(basePath, [new MergeAdapter(first.Path, 0.7), new MergeAdapter(second.Path, -1.3)], output);

        var expected = Array.ConvertAll(weight.Values, v => (float)v);
        Apply(expected, 700, rowStart: 0, first.Up, first.Down, 8, (float)(0.7 * 0.5));
        Apply(expected, 700, rowStart: 0, second.Up, second.Down, 3, (float)(-1.3 * 1.0));
        Assert.Equal(Array.ConvertAll(expected, v => MergeOutputTests.RoundTo(dtype, v)), Read(output, out _)[ProjIn].Values);
    }

    [Fact]
    public void Slices_of_a_fused_tensor_that_straddle_chunks_get_the_bits_of_plain_loops_and_the_rows_between_stay_as_they_were()
    {
        // SDXL's second text encoder fuses q, k, v into in_proj_weight [3·302, 302]: chunks of 216 rows, so q's rows end
        // inside the second chunk and v's (from row 604, not a multiple of 4) start inside the third and end in the fifth.
        const string fused = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight";
        var weight = Random(_random, fused, [906, 302]);
        var basePath = Write(Path.Combine(_dir, "base.safetensors"), [weight]);
        var tensors = new List<TestTensor>();
        var expected = Array.ConvertAll(weight.Values, v => (float)v);
        foreach (var (part, rowStart) in new[] { ("q", 0), ("v", 604) })
        {
            var module = $"lora_te2_text_model_encoder_layers_0_self_attn_{part}_proj";
            var down = Random(_random, module + ".lora_down.weight", [4, 302]);
            var up = Random(_random, module + ".lora_up.weight", [302, 4]);
            tensors.AddRange([down, up, Scalar(module + ".alpha", 2)]);
            Apply(expected, 302, rowStart, up, down, 4, (float)(0.9 * 0.5));
        }
        var adapter = Write(Path.Combine(_dir, "adapter.safetensors"), tensors);

        var output = Path.Combine(_dir, "out.safetensors");
        LoraMerger.Merge(basePath, [new MergeAdapter(adapter, 0.9)], output);

        var merged = Read(output, out _)[fused].Values;
        Assert.Equal(Array.ConvertAll(expected, v => (double)v), merged);
        Assert.Equal(weight.Values[(302 * 302)..(604 * 302)], merged[(302 * 302)..(604 * 302)]); // k: untouched
    }

    [Fact]
    public void Values_that_become_infinite_in_several_chunks_are_reported_at_the_first_element_of_the_tensor()
    {
        // ΔW[150, 5] and ΔW[190, 5] are 1e40, past F32: rows 150 and 190 lie in the second and third chunks.
        var weight = Random(_random, ProjIn, [203, 700]);
        var basePath = Write(Path.Combine(_dir, "base.safetensors"), [weight]);
        var down = Random(_random, KohyaProjIn + ".lora_down.weight", [2, 700]);
        var up = Random(_random, KohyaProjIn + ".lora_up.weight", [203, 2]);
        down.Values[5] = 1e20;
        up.Values[150 * 2] = 1e20;
        up.Values[190 * 2] = 1e20;
        var adapter = Write(Path.Combine(_dir, "adapter.safetensors"), [down, up]);
        var output = Path.Combine(_dir, "out.safetensors");

        var e = Assert.Throws<LoraMergeException>(() => LoraMerger.Merge(basePath, [new MergeAdapter(adapter)], output));

        Assert.StartsWith($"merging into '{ProjIn}' gives ∞ at element {150 * 700 + 5} (base value {(float)weight.Values[150 * 700 + 5]})", e.Message.Replace("Infinity", "∞"));
        Assert.False(File.Exists(output));
        Assert.False(File.Exists(output + ".part"));
    }

    private (string Path, TestTensor Up, TestTensor Down) Lora(string name, string module, long rows, long rest, int rank, double? alpha)
    {
        var down = Random(_random, module + ".lora_down.weight", [rank, rest]);
        var up = Random(_random, module + ".lora_up.weight", [rows, rank]);
        TestTensor[] tensors = alpha is { } a ? [down, up, Scalar(module + ".alpha", a)] : [down, up];
        return (Write(Path.Combine(_dir, name + ".safetensors"), tensors), up, down);
    }

    /// <summary>w[rowStart + o, j] += c·Σₘ up[o, m]·down[m, j]: each sum in F32 from zero with a fused multiply-add per term, then one more into w.</summary>
    private static void Apply(float[] weights, int rest, int rowStart, TestTensor up, TestTensor down, int rank, float c)
    {
        var rows = up.Values.Length / rank;
        for (var o = 0; o < rows; o++)
        {
            for (var j = 0; j < rest; j++)
            {
                var sum = 0f;
                for (var m = 0; m < rank; m++)
                {
                    sum = MathF.FusedMultiplyAdd((float)up.Values[o * rank + m], (float)down.Values[m * rest + j], sum);
                }
                ref var w = ref weights[(rowStart + o) * rest + j];
                w = MathF.FusedMultiplyAdd(c, sum, w);
            }
        }
    }
}
