using LoraDeploy.Lora.Merge;
using LoraDeploy.Lora.Tests.Support;
using static LoraDeploy.Lora.Tests.Merge.MergeFixtures;

namespace LoraDeploy.Lora.Tests.Merge;

/// <summary>
/// Every network type merged by the library against a plain-loop F64 reference written here from the formulas in
/// lora-formats.md §4 (not from the library's row-wise code), on a small SD-style F32 base with kohya names.
/// </summary>
public sealed class MergeExactnessTests : IDisposable
{
    private const string ToQ = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight";
    private const string Conv = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight";
    private const string ConvBias = "model.diffusion_model.input_blocks.1.0.in_layers.2.bias";
    private const string ProjIn = "model.diffusion_model.input_blocks.4.1.proj_in.weight";
    private const string TextQ = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight";
    private const string KohyaToQ = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q";
    private const string KohyaConv = "lora_unet_input_blocks_1_0_in_layers_2";
    private const string KohyaProjIn = "lora_unet_input_blocks_4_1_proj_in";
    private const string KohyaTextQ = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";

    private readonly string _dir = TempFiles.Directory();
    private readonly Random _random = new(17);
    private readonly Dictionary<string, TestTensor> _base = new(StringComparer.Ordinal);
    private readonly string _basePath;

    public MergeExactnessTests()
    {
        foreach (var (name, shape) in new (string, long[])[]
        {
            (ToQ, [12, 10]), (Conv, [8, 6, 3, 3]), (ConvBias, [8]), (ProjIn, [10, 10, 1, 1]), (TextQ, [6, 6]),
            ("first_stage_model.decoder.conv_in.weight", [4, 3, 3, 3]), ("model.diffusion_model.out.2.bias", [4]),
        })
        {
            _base[name] = Random(_random, name, shape);
        }
        _basePath = Write(Path.Combine(_dir, "base.safetensors"), _base.Values);
    }

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void Lora_linear_with_alpha_and_strength()
    {
        var down = Random(_random, KohyaToQ + ".lora_down.weight", [3, 10]);
        var up = Random(_random, KohyaToQ + ".lora_up.weight", [12, 3]);
        var merged = Merge([down, up, Scalar(KohyaToQ + ".alpha", 1.5)], 0.7);
        AssertClose(Add(_base[ToQ], MatMul(up, down), 0.7 * 1.5 / 3), merged[ToQ].Values, "to_q");
    }

    [Fact]
    public void Lora_without_alpha_has_scale_one()
    {
        var down = Random(_random, KohyaToQ + ".lora_down.weight", [4, 10]);
        var up = Random(_random, KohyaToQ + ".lora_up.weight", [12, 4]);
        var merged = Merge([down, up], 1.0);
        AssertClose(Add(_base[ToQ], MatMul(up, down), 1.0), merged[ToQ].Values, "to_q");
    }

    [Fact]
    public void Locon_conv_3x3()
    {
        var down = Random(_random, KohyaConv + ".lora_down.weight", [2, 6, 3, 3]);
        var up = Random(_random, KohyaConv + ".lora_up.weight", [8, 2, 1, 1]);
        var merged = Merge([down, up, Scalar(KohyaConv + ".alpha", 1)], 1.3);
        // ΔW[o,i,k,l] = Σ_m up[o,m]·down[m,i,k,l]
        var delta = new double[8 * 6 * 9];
        for (var o = 0; o < 8; o++)
        {
            for (var i = 0; i < 6; i++)
            {
                for (var k = 0; k < 3; k++)
                {
                    for (var l = 0; l < 3; l++)
                    {
                        double sum = 0;
                        for (var m = 0; m < 2; m++)
                        {
                            sum += up[o, m, 0, 0] * down[m, i, k, l];
                        }
                        delta[((o * 6 + i) * 3 + k) * 3 + l] = sum;
                    }
                }
            }
        }
        AssertClose(Add(_base[Conv], delta, 1.3 * 1 / 2.0), merged[Conv].Values, "conv");
        Assert.Equal(Bytes(_base[ConvBias]), merged[ConvBias].Bytes);
    }

    [Fact]
    public void Locon_tucker_lora_mid()
    {
        var down = Random(_random, KohyaConv + ".lora_down.weight", [3, 6, 1, 1]);
        var mid = Random(_random, KohyaConv + ".lora_mid.weight", [3, 3, 3, 3]);
        var up = Random(_random, KohyaConv + ".lora_up.weight", [8, 3, 1, 1]);
        var merged = Merge([down, mid, up, Scalar(KohyaConv + ".alpha", 2)], 0.9);
        var delta = new double[8 * 6 * 9];
        for (var o = 0; o < 8; o++)
        {
            for (var i = 0; i < 6; i++)
            {
                for (var k = 0; k < 3; k++)
                {
                    for (var l = 0; l < 3; l++)
                    {
                        double sum = 0;
                        for (var m = 0; m < 3; m++)
                        {
                            for (var n = 0; n < 3; n++)
                            {
                                sum += mid[m, n, k, l] * up[o, m, 0, 0] * down[n, i, 0, 0];
                            }
                        }
                        delta[((o * 6 + i) * 3 + k) * 3 + l] = sum;
                    }
                }
            }
        }
        AssertClose(Add(_base[Conv], delta, 0.9 * 2 / 3.0), merged[Conv].Values, "conv");
    }

    [Fact]
    public void Linear_lora_onto_a_1x1_conv()
    {
        var down = Random(_random, KohyaProjIn + ".lora_down.weight", [2, 10]);
        var up = Random(_random, KohyaProjIn + ".lora_up.weight", [10, 2]);
        var merged = Merge([down, up, Scalar(KohyaProjIn + ".alpha", 2)], 1);
        AssertClose(Add(_base[ProjIn], MatMul(up, down), 1), merged[ProjIn].Values, "proj_in");
    }

    [Fact]
    public void Loha_linear()
    {
        var w1a = Random(_random, KohyaToQ + ".hada_w1_a", [12, 4]);
        var w1b = Random(_random, KohyaToQ + ".hada_w1_b", [4, 10]);
        var w2a = Random(_random, KohyaToQ + ".hada_w2_a", [12, 4]);
        var w2b = Random(_random, KohyaToQ + ".hada_w2_b", [4, 10]);
        var merged = Merge([w1a, w1b, w2a, w2b, Scalar(KohyaToQ + ".alpha", 2)], 0.6);
        var delta = Hadamard(MatMul(w1a, w1b), MatMul(w2a, w2b));
        AssertClose(Add(_base[ToQ], delta, 0.6 * 2 / 4), merged[ToQ].Values, "to_q");
    }

    [Fact]
    public void Loha_conv_flattened()
    {
        var w1a = Random(_random, KohyaConv + ".hada_w1_a", [8, 2]);
        var w1b = Random(_random, KohyaConv + ".hada_w1_b", [2, 54]);
        var w2a = Random(_random, KohyaConv + ".hada_w2_a", [8, 2]);
        var w2b = Random(_random, KohyaConv + ".hada_w2_b", [2, 54]);
        var merged = Merge([w1a, w1b, w2a, w2b, Scalar(KohyaConv + ".alpha", 1)], 1);
        AssertClose(Add(_base[Conv], Hadamard(MatMul(w1a, w1b), MatMul(w2a, w2b)), 0.5), merged[Conv].Values, "conv");
    }

    [Fact]
    public void Loha_tucker_conv()
    {
        var t1 = Random(_random, KohyaConv + ".hada_t1", [2, 2, 3, 3]);
        var t2 = Random(_random, KohyaConv + ".hada_t2", [2, 2, 3, 3]);
        var w1a = Random(_random, KohyaConv + ".hada_w1_a", [2, 8]);
        var w1b = Random(_random, KohyaConv + ".hada_w1_b", [2, 6]);
        var w2a = Random(_random, KohyaConv + ".hada_w2_a", [2, 8]);
        var w2b = Random(_random, KohyaConv + ".hada_w2_b", [2, 6]);
        var merged = Merge([t1, t2, w1a, w1b, w2a, w2b, Scalar(KohyaConv + ".alpha", 1)], 0.8);
        var delta = Hadamard(TuckerEinsum(t1, w1b, w1a), TuckerEinsum(t2, w2b, w2a));
        AssertClose(Add(_base[Conv], delta, 0.8 * 1 / 2.0), merged[Conv].Values, "conv");
    }

    [Fact]
    public void Lokr_full_factors_ignore_alpha()
    {
        var w1 = Random(_random, KohyaToQ + ".lokr_w1", [3, 2]);
        var w2 = Random(_random, KohyaToQ + ".lokr_w2", [4, 5]);
        var merged = Merge([w1, w2, Scalar(KohyaToQ + ".alpha", 7)], 0.5);
        AssertClose(Add(_base[ToQ], Kron(w1, w2), 0.5), merged[ToQ].Values, "to_q");
    }

    [Fact]
    public void Lokr_factorised_w1_and_w2()
    {
        var w1a = Random(_random, KohyaToQ + ".lokr_w1_a", [2, 1]);
        var w1b = Random(_random, KohyaToQ + ".lokr_w1_b", [1, 5]);
        var w2a = Random(_random, KohyaToQ + ".lokr_w2_a", [6, 1]);
        var w2b = Random(_random, KohyaToQ + ".lokr_w2_b", [1, 2]);
        var merged = Merge([w1a, w1b, w2a, w2b, Scalar(KohyaToQ + ".alpha", 3)], 1.1);
        var w1 = new TestTensor("w1", [2, 5], MatMul(w1a, w1b));
        var w2 = new TestTensor("w2", [6, 2], MatMul(w2a, w2b));
        AssertClose(Add(_base[ToQ], Kron(w1, w2), 1.1 * 3 / 1), merged[ToQ].Values, "to_q");
    }

    [Fact]
    public void Lokr_conv_with_4d_w2()
    {
        var w1 = Random(_random, KohyaConv + ".lokr_w1", [2, 3]);
        var w2a = Random(_random, KohyaConv + ".lokr_w2_a", [4, 2]);
        var w2b = Random(_random, KohyaConv + ".lokr_w2_b", [2, 18]);
        var merged = Merge([w1, w2a, w2b, Scalar(KohyaConv + ".alpha", 1)], 1);
        var w2 = new TestTensor("w2", [4, 2, 3, 3], MatMul(w2a, w2b));
        AssertClose(Add(_base[Conv], Kron(w1, w2), 0.5), merged[Conv].Values, "conv");
    }

    [Fact]
    public void Lokr_tucker_w2()
    {
        var w1 = Random(_random, KohyaConv + ".lokr_w1", [2, 3]);
        var t2 = Random(_random, KohyaConv + ".lokr_t2", [2, 2, 3, 3]);
        var w2a = Random(_random, KohyaConv + ".lokr_w2_a", [2, 4]);
        var w2b = Random(_random, KohyaConv + ".lokr_w2_b", [2, 2]);
        var merged = Merge([w1, t2, w2a, w2b, Scalar(KohyaConv + ".alpha", 1)], 1);
        var w2 = new TestTensor("w2", [4, 2, 3, 3], TuckerEinsum(t2, w2b, w2a));
        AssertClose(Add(_base[Conv], Kron(w1, w2), 0.5), merged[Conv].Values, "conv");
    }

    [Fact]
    public void Dora_scale_on_the_output_axis_follows_lycoris()
    {
        var down = Random(_random, KohyaToQ + ".lora_down.weight", [3, 10]);
        var up = Random(_random, KohyaToQ + ".lora_up.weight", [12, 3]);
        var magnitude = Random(_random, KohyaToQ + ".dora_scale", [12, 1], 3);
        var merged = Merge([down, up, magnitude, Scalar(KohyaToQ + ".alpha", 3)], 0.6);
        var expected = DoraLycoris(_base[ToQ], MatMul(up, down), 1.0, magnitude.Values, outputAxis: true, strength: 0.6);
        AssertClose(expected, merged[ToQ].Values, "to_q");
    }

    [Fact]
    public void Dora_scale_on_the_input_axis_of_a_conv()
    {
        var down = Random(_random, KohyaConv + ".lora_down.weight", [2, 6, 3, 3]);
        var up = Random(_random, KohyaConv + ".lora_up.weight", [8, 2, 1, 1]);
        var magnitude = Random(_random, KohyaConv + ".dora_scale", [1, 6, 1, 1], 3);
        var merged = Merge([down, up, magnitude], 1.4);
        var expected = DoraLycoris(_base[Conv], MatMul(up, down), 1.0, magnitude.Values, outputAxis: false, strength: 1.4);
        AssertClose(expected, merged[Conv].Values, "conv");
    }

    [Fact]
    public void Full_diff_and_diff_b()
    {
        var diff = Random(_random, KohyaConv + ".diff", [8, 6, 3, 3]);
        var diffB = Random(_random, KohyaConv + ".diff_b", [8]);
        var merged = Merge([diff, diffB], 0.25);
        AssertClose(Add(_base[Conv], diff.Values, 0.25), merged[Conv].Values, "conv");
        AssertClose(Add(_base[ConvBias], diffB.Values, 0.25), merged[ConvBias].Values, "conv bias");
    }

    [Fact]
    public void Two_adapters_apply_in_order_to_unet_and_text_encoder()
    {
        var down = Random(_random, KohyaToQ + ".lora_down.weight", [2, 10]);
        var up = Random(_random, KohyaToQ + ".lora_up.weight", [12, 2]);
        var teDown = Random(_random, KohyaTextQ + ".lora_down.weight", [2, 6]);
        var teUp = Random(_random, KohyaTextQ + ".lora_up.weight", [6, 2]);
        var first = Write(Path.Combine(_dir, "first.safetensors"), [down, up, teDown, teUp, Scalar(KohyaToQ + ".alpha", 1), Scalar(KohyaTextQ + ".alpha", 2)]);
        var w1 = Random(_random, KohyaToQ + ".lokr_w1", [3, 2]);
        var w2 = Random(_random, KohyaToQ + ".lokr_w2", [4, 5]);
        var second = Write(Path.Combine(_dir, "second.safetensors"), [w1, w2], "F16");
        var f16w1 = Representable(w1, "F16");
        var f16w2 = Representable(w2, "F16");

        var output = Path.Combine(_dir, "out.safetensors");
        var result = LoraMerger.Merge(_basePath, [new MergeAdapter(first, 0.5), new MergeAdapter(second, -0.3)], output);

        var merged = Read(output, out _);
        var afterFirst = Add(_base[ToQ], MatMul(up, down), 0.5 * 0.5);
        AssertClose(Add(_base[ToQ] with { Values = afterFirst }, Kron(f16w1, f16w2), -0.3), merged[ToQ].Values, "to_q");
        AssertClose(Add(_base[TextQ], MatMul(teUp, teDown), 0.5 * 1), merged[TextQ].Values, "text q");
        Assert.Equal(2, result.TensorsMerged);
        Assert.Equal(5, result.TensorsCopied);
        Assert.Equal(3, result.ModulesApplied);
    }

    private Dictionary<string, (string Dtype, long[] Shape, double[] Values, byte[] Bytes)> Merge(TestTensor[] adapter, double strength)
    {
        var adapterPath = Write(Path.Combine(_dir, "adapter.safetensors"), adapter);
        var output = Path.Combine(_dir, "out.safetensors");
        var result = LoraMerger.Merge(_basePath, [new MergeAdapter(adapterPath, strength)], output);
        Assert.Equal(1, result.ModulesApplied);
        var merged = Read(output, out _);
        // Whatever was not merged is byte-identical.
        foreach (var (name, tensor) in _base)
        {
            if (name is not (ToQ or Conv or ConvBias or ProjIn or TextQ))
            {
                Assert.Equal(Bytes(tensor), merged[name].Bytes);
            }
        }
        return merged;
    }

    private static byte[] Bytes(TestTensor tensor) => Encode(tensor.Values, "F32");

    internal static double[] Add(TestTensor weight, double[] delta, double coefficient)
    {
        Assert.Equal(weight.Count, delta.Length);
        return [.. weight.Values.Select((w, i) => w + coefficient * delta[i])];
    }

    /// <summary>[n, r(,1,1)] · [r, rest…] → [n, rest].</summary>
    internal static double[] MatMul(TestTensor left, TestTensor right)
    {
        var n = left.Shape[0];
        var r = left.Shape[1];
        Assert.Equal(r, right.Shape[0]);
        var rest = right.Count / r;
        var result = new double[n * rest];
        for (var i = 0; i < n; i++)
        {
            for (var j = 0; j < rest; j++)
            {
                double sum = 0;
                for (var m = 0; m < r; m++)
                {
                    sum += left.Values[i * r + m] * right.Values[m * rest + j];
                }
                result[i * rest + j] = sum;
            }
        }
        return result;
    }

    private static double[] Hadamard(double[] a, double[] b) => [.. a.Select((x, i) => x * b[i])];

    /// <summary>einsum('ijkl,jr,ip->prkl', t, wb, wa).</summary>
    private static double[] TuckerEinsum(TestTensor t, TestTensor wb, TestTensor wa)
    {
        long ri = t.Shape[0], rj = t.Shape[1], kh = t.Shape[2], kw = t.Shape[3], r = wb.Shape[1], p = wa.Shape[1];
        var result = new double[p * r * kh * kw];
        for (var pi = 0; pi < p; pi++)
        {
            for (var ri2 = 0; ri2 < r; ri2++)
            {
                for (var k = 0; k < kh; k++)
                {
                    for (var l = 0; l < kw; l++)
                    {
                        double sum = 0;
                        for (var i = 0; i < ri; i++)
                        {
                            for (var j = 0; j < rj; j++)
                            {
                                sum += t[i, j, k, l] * wb[j, ri2] * wa[i, pi];
                            }
                        }
                        result[((pi * r + ri2) * kh + k) * kw + l] = sum;
                    }
                }
            }
        }
        return result;
    }

    /// <summary>kron(w1 [a, c], w2 [b, d(, kh, kw)]) → [a·b, c·d(, kh, kw)].</summary>
    private static double[] Kron(TestTensor w1, TestTensor w2)
    {
        long a = w1.Shape[0], c = w1.Shape[1], b = w2.Shape[0], d = w2.Shape[1];
        var kernel = w2.Count / (b * d);
        var result = new double[a * b * c * d * kernel];
        for (var p = 0; p < a; p++)
        {
            for (var q = 0; q < b; q++)
            {
                for (var s = 0; s < c; s++)
                {
                    for (var t = 0; t < d; t++)
                    {
                        for (var x = 0; x < kernel; x++)
                        {
                            var row = p * b + q;
                            var column = s * d + t;
                            result[(row * (c * d) + column) * kernel + x] = w1.Values[p * c + s] * w2.Values[(q * d + t) * kernel + x];
                        }
                    }
                }
            }
        }
        return result;
    }

    /// <summary>LyCORIS: V = W + scale·ΔW; W' = V·(1 + strength·(m/(‖V‖+ε) − 1)), the norm per output row or per input channel.</summary>
    internal static double[] DoraLycoris(TestTensor weight, double[] delta, double scale, double[] magnitude, bool outputAxis, double strength)
    {
        const double eps = 1.1920928955078125e-07;
        long rows = weight.Shape[0], channels = weight.Shape[1];
        var kernel = weight.Count / (rows * channels);
        var v = Add(weight, delta, scale);
        var result = new double[v.Length];
        for (var o = 0; o < rows; o++)
        {
            for (var i = 0; i < channels; i++)
            {
                double squares = 0;
                for (var x = 0; x < (outputAxis ? channels * kernel : rows * kernel); x++)
                {
                    var index = outputAxis ? o * channels * kernel + x : ((x / kernel) * channels + i) * kernel + x % kernel;
                    squares += v[index] * v[index];
                }
                var m = outputAxis ? magnitude[o] : magnitude[i];
                var factor = 1 + strength * (m / (Math.Sqrt(squares) + eps) - 1);
                for (var x = 0; x < kernel; x++)
                {
                    var index = (o * channels + i) * kernel + x;
                    result[index] = v[index] * factor;
                }
            }
        }
        return result;
    }
}
