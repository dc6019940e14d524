using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text.Json;
using LoraDeploy.Lora.Merge;
using LoraDeploy.Lora.Tests.Support;
using static LoraDeploy.Lora.Tests.Merge.MergeFixtures;

namespace LoraDeploy.Lora.Tests.Merge;

/// <summary>The merged file itself: dtypes and their rounding, byte-identical copies, layout, metadata and the merge record.</summary>
public sealed class MergeOutputTests : IDisposable
{
    private const string Module = "lora_unet_input_blocks_4_1_proj_out";
    private const string Weight = "model.diffusion_model.input_blocks.4.1.proj_out.weight";
    private readonly string _dir = TempFiles.Directory();
    private readonly Random _random = new(3);

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Theory]
    [InlineData("F16")]
    [InlineData("BF16")]
    [InlineData("F32")]
    public void A_half_precision_base_is_merged_in_f32_and_rounded_to_nearest_even(string dtype)
    {
        var weight = Representable(Random(_random, Weight, [64, 32]), dtype);
        var untouched = Representable(Random(_random, "model.diffusion_model.out.0.weight", [7, 3]), dtype);
        var positions = new TestTensor("cond_stage_model.transformer.text_model.embeddings.position_ids", [1, 5], [0, 1, 2, 3, 4]);
        var basePath = new SafetensorsWriter()
            .Tensor(weight.Name, dtype, weight.Shape, Encode(weight.Values, dtype))
            .Tensor(positions.Name, "I64", positions.Shape, [.. positions.Values.SelectMany(v => BitConverter.GetBytes((long)v))])
            .Tensor(untouched.Name, dtype, untouched.Shape, Encode(untouched.Values, dtype))
            .WriteTo(Path.Combine(_dir, "base.safetensors"));
        // Factors on a 2⁻⁸ grid and c = 0.75·4/8 = 0.375: ΔW's F32 sums are exact, so the F32 value before the last
        // rounding is the exact one rounded once, and the rounding to the dtype is all this test sees.
        var down = OnGrid(Random(_random, Module + ".lora_down.weight", [8, 32]));
        var up = OnGrid(Random(_random, Module + ".lora_up.weight", [64, 8]));
        var adapter = Write(Path.Combine(_dir, "adapter.safetensors"), [down, up, Scalar(Module + ".alpha", 4)]);

        var output = Path.Combine(_dir, "out.safetensors");
        LoraMerger.Merge(basePath, [new MergeAdapter(adapter, 0.75)], output);

        var merged = Read(output, out _);
        Assert.Equal(dtype, merged[Weight].Dtype);
        var exact = MergeExactnessTests.Add(weight, MergeExactnessTests.MatMul(up, down), 0.75 * 4 / 8);
        // The library rounds once to F32, then to the dtype; the reference does the same from the exact F64 value.
        var expected = exact.Select(v => RoundTo(dtype, (float)v)).ToArray();
        Assert.Equal(expected, merged[Weight].Values);
        Assert.Equal(Encode(untouched.Values, dtype), merged[untouched.Name].Bytes);
        Assert.Equal("I64", merged[positions.Name].Dtype);
        Assert.Equal(positions.Values.SelectMany(v => BitConverter.GetBytes((long)v)).ToArray(), merged[positions.Name].Bytes);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void Untouched_tensors_larger_than_the_copy_buffer_are_byte_identical_around_a_merged_one(bool direct)
    {
        var (basePath, bytes) = LargeBase(_dir);
        var output = Path.Combine(_dir, "out.safetensors");
        var result = LoraMerger.Merge(basePath, [new MergeAdapter(SmallAdapter())], output, Output(direct));

        Assert.Equal(1, result.TensorsMerged);
        AssertUntouchedCopied(bytes, output);
    }

    [Fact]
    public void A_base_on_another_file_system_is_copied_in_user_space_byte_for_byte()
    {
        // The kernel copies only within one file system (EXDEV across): the merge must carry on with its own copy.
        // Into a plain FileStream, as where O_DIRECT is not available, since only there does the kernel copy.
        Assert.SkipUnless(Directory.Exists("/dev/shm") && OperatingSystem.IsLinux(), "needs a tmpfs at /dev/shm beside the temp folder");
        var shm = Path.Combine("/dev/shm", "loradeploy-lora-tests-" + Guid.NewGuid().ToString("n"));
        Directory.CreateDirectory(shm);
        try
        {
            var (basePath, bytes) = LargeBase(shm);
            var output = Path.Combine(_dir, "out.safetensors");
            LoraMerger.Merge(basePath, [new MergeAdapter(SmallAdapter())], output, Output(direct: false));

            AssertUntouchedCopied(bytes, output);
        }
        finally
        {
            Directory.Delete(shm, recursive: true);
        }
    }

    /// <summary>A base whose untouched tensors (5 MiB and 3 MiB + 2 bytes, F16 and I8) sit before and after a merged one.</summary>
    private (string Path, Dictionary<string, byte[]> Untouched) LargeBase(string dir)
    {
        var before = new byte[5 << 20];
        var after = new byte[(3 << 20) + 2];
        _random.NextBytes(before);
        _random.NextBytes(after);
        var weight = Random(_random, Weight, [64, 32]);
        var path = new SafetensorsWriter()
            .Tensor("first_stage_model.decoder.conv_in.weight", "F16", [before.Length / 2], before)
            .Tensor(weight.Name, "F32", weight.Shape, Encode(weight.Values, "F32"))
            .Tensor("model.diffusion_model.out.0.weight", "I8", [after.Length], after)
            .WriteTo(Path.Combine(dir, "base.safetensors"));
        return (path, new() { ["first_stage_model.decoder.conv_in.weight"] = before, ["model.diffusion_model.out.0.weight"] = after });
    }

    /// <summary>
    /// Direct: the merge's own output (O_DIRECT where the file system allows it). Not: a plain FileStream, the output
    /// where O_DIRECT is not available, into which untouched tensors are copied in the kernel (copy_file_range).
    /// </summary>
    private static MergeOptions? Output(bool direct) =>
        direct ? null : new MergeOptions { OpenOutput = path => new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.None, bufferSize: 1 << 20) };

    private string SmallAdapter() => Write(Path.Combine(_dir, "adapter.safetensors"),
        [Random(_random, Module + ".lora_down.weight", [4, 32]), Random(_random, Module + ".lora_up.weight", [64, 4])]);

    private static void AssertUntouchedCopied(Dictionary<string, byte[]> untouched, string output)
    {
        var merged = Read(output, out _);
        foreach (var (name, bytes) in untouched)
        {
            Assert.True(bytes.AsSpan().SequenceEqual(merged[name].Bytes), $"{name} is not byte-identical");
        }
    }

    [Theory]
    [InlineData("BF16")]
    [InlineData("F16")]
    [InlineData("F32")]
    public void Tensors_read_ahead_while_the_one_before_merges_come_out_as_merged_one_by_one(string dtype)
    {
        // Three merged tensors in a row, small beside the untouched one (plain LoRA, so each goes through the row-chunk
        // path; read-ahead is left to whole-tensor merges such as DoRA's); factors on a 2⁻⁸ grid and c = 0.5 so the
        // result is exactly the rounded sum.
        (string Module, string Weight, long Rows)[] targets =
        [
            ("lora_unet_input_blocks_4_1_proj_in", "model.diffusion_model.input_blocks.4.1.proj_in.weight", 24),
            ("lora_unet_input_blocks_4_1_proj_out", Weight, 40),
            ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", 16),
        ];
        var writer = new SafetensorsWriter();
        var untouched = Representable(Random(_random, "first_stage_model.decoder.conv_in.weight", [64, 64]), dtype);
        writer.Tensor(untouched.Name, dtype, untouched.Shape, Encode(untouched.Values, dtype));
        var adapter = new List<TestTensor>();
        var expected = new Dictionary<string, double[]>();
        foreach (var (module, name, rows) in targets)
        {
            var weight = Representable(Random(_random, name, [rows, 32]), dtype);
            writer.Tensor(weight.Name, dtype, weight.Shape, Encode(weight.Values, dtype));
            var down = OnGrid(Random(_random, module + ".lora_down.weight", [4, 32]));
            var up = OnGrid(Random(_random, module + ".lora_up.weight", [rows, 4]));
            adapter.AddRange([down, up]);
            expected[name] = [.. MergeExactnessTests.Add(weight, MergeExactnessTests.MatMul(up, down), 0.5).Select(v => RoundTo(dtype, (float)v))];
        }
        var basePath = writer.WriteTo(Path.Combine(_dir, "base.safetensors"));
        var adapterPath = Write(Path.Combine(_dir, "adapter.safetensors"), [.. adapter]);

        var output = Path.Combine(_dir, "out.safetensors");
        var result = LoraMerger.Merge(basePath, [new MergeAdapter(adapterPath, 0.5)], output);

        Assert.Equal(3, result.TensorsMerged);
        var merged = Read(output, out _);
        foreach (var (name, values) in expected)
        {
            Assert.Equal(values, merged[name].Values);
        }
        Assert.Equal(Encode(untouched.Values, dtype), merged[untouched.Name].Bytes);
    }

    [Theory]
    [InlineData(MergeDtype.F16, "F16")]
    [InlineData(MergeDtype.BF16, "BF16")]
    public void Output_dtype_converts_every_float_tensor(MergeDtype option, string dtype)
    {
        var weight = Random(_random, Weight, [16, 16], 100);
        var other = Random(_random, "model.diffusion_model.out.0.weight", [5, 3], 1e-3);
        var basePath = Write(Path.Combine(_dir, "base.safetensors"), [weight, other]);
        var adapter = Write(Path.Combine(_dir, "adapter.safetensors"),
            [Random(_random, Module + ".lora_down.weight", [2, 16]), Random(_random, Module + ".lora_up.weight", [16, 2])]);

        var output = Path.Combine(_dir, "out.safetensors");
        var result = LoraMerger.Merge(basePath, [new MergeAdapter(adapter)], output, new MergeOptions { OutputDtype = option });

        var merged = Read(output, out _);
        Assert.All(merged.Values, t => Assert.Equal(dtype, t.Dtype));
        Assert.Equal(other.Values.Select(v => RoundTo(dtype, (float)v)).ToArray(), merged[other.Name].Values);
        Assert.Equal(1, result.TensorsConverted);
        Assert.Equal(new FileInfo(output).Length, result.BytesWritten);
    }

    [Fact]
    public void Rounding_ties_go_to_even_and_overflow_is_refused()
    {
        // Values exactly halfway between two F16 / BF16 neighbours, and the largest finite values.
        float[] values = [1 + 1f / 2048, 1 + 3f / 2048, -(1 + 1f / 2048), 65504f, 1 + 1f / 256, 1 + 3f / 256, 2049f, 2051f];
        var f16 = new byte[values.Length * 2];
        Assert.Equal(-1, FloatCodec.Encode(values, "F16", f16));
        var halves = Enumerable.Range(0, values.Length).Select(i => (float)BinaryPrimitives.ReadHalfLittleEndian(f16.AsSpan(i * 2))).ToArray();
        Assert.Equal([1f, 1 + 2f / 1024, -1f, 65504f, 1 + 1f / 256, 1 + 3f / 256, 2048f, 2052f], halves);
        Assert.Equal(values.Select(v => RoundTo("F16", v)).ToArray(), halves.Select(h => (double)h).ToArray());

        var bf16 = new byte[values.Length * 2];
        Assert.Equal(-1, FloatCodec.Encode(values, "BF16", bf16));
        var brains = Enumerable.Range(0, values.Length).Select(i => BitConverter.UInt32BitsToSingle((uint)BinaryPrimitives.ReadUInt16LittleEndian(bf16.AsSpan(i * 2)) << 16)).ToArray();
        Assert.Equal(1f, brains[4]); // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: even is 1
        Assert.Equal(1 + 2f / 128, brains[5]); // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6
        Assert.Equal(values.Select(v => RoundTo("BF16", v)).ToArray(), brains.Select(b => (double)b).ToArray());

        Assert.Equal(1, FloatCodec.Encode([1f, 70000f], "F16", new byte[4]));
        Assert.Equal(0, FloatCodec.Encode([float.MaxValue], "BF16", new byte[2]));
        Assert.Equal(-1, FloatCodec.Encode([float.PositiveInfinity], "BF16", new byte[2]));
    }

    [Fact]
    public void Metadata_is_kept_with_a_merge_record_and_stale_hashes_dropped()
    {
        var weight = Random(_random, Weight, [8, 8]);
        var basePath = Write(Path.Combine(_dir, "base.safetensors"), [weight], metadata: new Dictionary<string, string>
        {
            ["modelspec.architecture"] = "stable-diffusion-xl-v1-base",
            ["modelspec.hash_sha256"] = "0xabc",
            ["loradeploy.merge"] = """[{"file":"earlier.safetensors","sha256":"00","strength":1,"modules":3}]""",
        });
        var adapter = Write(Path.Combine(_dir, "style.safetensors"),
            [Random(_random, Module + ".lora_down.weight", [2, 8]), Random(_random, Module + ".lora_up.weight", [8, 2])]);

        var output = Path.Combine(_dir, "out.safetensors");
        var result = LoraMerger.Merge(basePath, [new MergeAdapter(adapter, 0.8)], output);

        Read(output, out var metadata);
        Assert.Equal("stable-diffusion-xl-v1-base", metadata["modelspec.architecture"]);
        Assert.False(metadata.ContainsKey("modelspec.hash_sha256"));
        using var record = JsonDocument.Parse(metadata[LoraMerger.MergeRecordKey]);
        var entries = record.RootElement.EnumerateArray().ToList();
        Assert.Equal(2, entries.Count);
        Assert.Equal("earlier.safetensors", entries[0].GetProperty("file").GetString());
        Assert.Equal("style.safetensors", entries[1].GetProperty("file").GetString());
        Assert.Equal(Convert.ToHexStringLower(SHA256.HashData(File.ReadAllBytes(adapter))), entries[1].GetProperty("sha256").GetString());
        Assert.Equal(0.8, entries[1].GetProperty("strength").GetDouble());
        Assert.Equal(1, entries[1].GetProperty("modules").GetInt32());
        Assert.Equal(entries[1].GetProperty("sha256").GetString(), result.Adapters[0].Sha256);
    }

    [Fact]
    public void The_header_is_space_padded_to_8_bytes_and_no_part_file_remains()
    {
        var basePath = Write(Path.Combine(_dir, "base.safetensors"), [Random(_random, Weight, [3, 3]), Random(_random, "x.bias", [3])]);
        var adapter = Write(Path.Combine(_dir, "adapter.safetensors"),
            [Random(_random, Module + ".lora_down.weight", [1, 3]), Random(_random, Module + ".lora_up.weight", [3, 1])]);
        var output = Path.Combine(_dir, "out.safetensors");
        var progress = new List<MergeProgress>();

        LoraMerger.Merge(basePath, [new MergeAdapter(adapter)], output, new MergeOptions { Progress = new SynchronousProgress(progress.Add) });

        var bytes = File.ReadAllBytes(output);
        var headerLength = (long)BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        Assert.Equal(0, headerLength % 8);
        Assert.Equal((byte)'{', bytes[8]);
        Assert.Equal("}", System.Text.Encoding.UTF8.GetString(bytes, 8, (int)headerLength).TrimEnd(' ')[^1..]);
        Assert.False(File.Exists(output + ".part"));
        Assert.Equal([1, 2], progress.Select(p => p.TensorsDone));
        Assert.Equal(bytes.Length, progress[^1].BytesDone);
    }

    /// <summary>The value of <paramref name="value"/> in <paramref name="dtype"/>, rounded to nearest even by searching the neighbours (independent of the codec).</summary>
    internal static double RoundTo(string dtype, float value)
    {
        if (dtype == "F32")
        {
            return value;
        }
        // Enumerate the positive encodings (monotonic in their bits) and pick the nearest; on a tie, the even one.
        Func<int, double> decode = dtype == "F16"
            ? bits => (double)BitConverter.UInt16BitsToHalf((ushort)bits)
            : bits => BitConverter.UInt32BitsToSingle((uint)bits << 16);
        var magnitude = Math.Abs((double)value);
        var largest = dtype == "F16" ? 0x7BFF : 0x7F7F;
        int low = 0, high = largest;
        while (low < high)
        {
            var mid = (low + high + 1) / 2;
            if (decode(mid) <= magnitude)
            {
                low = mid;
            }
            else
            {
                high = mid - 1;
            }
        }
        var below = decode(low);
        var above = low + 1 <= largest ? decode(low + 1) : double.PositiveInfinity;
        double chosen;
        if (below == magnitude)
        {
            chosen = below;
        }
        else if (double.IsPositiveInfinity(above))
        {
            // Past the largest finite value: rounds to infinity beyond half an ulp.
            var ulp = below - decode(low - 1);
            chosen = magnitude >= below + ulp / 2 ? double.PositiveInfinity : below;
        }
        else
        {
            var toBelow = magnitude - below;
            var toAbove = above - magnitude;
            chosen = toBelow < toAbove ? below : toAbove < toBelow ? above : (low % 2 == 0 ? below : above);
        }
        return value < 0 ? -chosen : chosen;
    }

    private static TestTensor OnGrid(TestTensor tensor) => tensor with { Values = Array.ConvertAll(tensor.Values, v => Math.Round(v * 256) / 256) };

    private sealed class SynchronousProgress(Action<MergeProgress> report) : IProgress<MergeProgress>
    {
        public void Report(MergeProgress value) => report(value);
    }
}
