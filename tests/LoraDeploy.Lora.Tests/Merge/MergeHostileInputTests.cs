using System.Diagnostics;
using LoraDeploy.Lora.Merge;
using LoraDeploy.Lora.Tests.Support;
using static LoraDeploy.Lora.Tests.Merge.MergeFixtures;

namespace LoraDeploy.Lora.Tests.Merge;

/// <summary>Inputs a merge must refuse, and output failures: each gives a clear error and leaves no output file.</summary>
public sealed class MergeHostileInputTests : IDisposable
{
    private const string ToQ = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight";
    private const string ToK = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight";
    private const string KohyaToQ = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q";
    private const string KohyaToK = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k";
    private readonly string _dir = TempFiles.Directory();
    private readonly Random _random = new(9);
    private readonly string _basePath;
    private readonly string _output;

    public MergeHostileInputTests()
    {
        _basePath = Write(Path.Combine(_dir, "base.safetensors"),
            [Random(_random, ToQ, [12, 10]), Random(_random, ToK, [12, 10]), Random(_random, "first_stage_model.encoder.conv_in.weight", [64, 3, 3, 3])],
            "F16");
        _output = Path.Combine(_dir, "out.safetensors");
    }

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void Shape_mismatches_are_listed()
    {
        var adapter = Adapter(
            Random(_random, KohyaToQ + ".lora_down.weight", [2, 9]), Random(_random, KohyaToQ + ".lora_up.weight", [12, 2]),
            Random(_random, KohyaToK + ".lora_down.weight", [2, 10]), Random(_random, KohyaToK + ".lora_up.weight", [11, 2]));

        var e = Refused(adapter);
        Assert.Contains("2 module(s) do not fit the base tensor", e.Message);
        Assert.Contains($"{KohyaToQ} → {ToQ}: the adapter's LoRA delta is [12, 9], the base tensor [12, 10]", e.Message);
        Assert.Contains($"{KohyaToK} → {ToK}: the adapter's LoRA delta is [11, 10], the base tensor [12, 10]", e.Message);
    }

    [Fact]
    public void Modules_without_a_base_tensor_are_an_error_not_skipped()
    {
        var adapter = Adapter(
            Random(_random, KohyaToQ + ".lora_down.weight", [2, 10]), Random(_random, KohyaToQ + ".lora_up.weight", [12, 2]),
            Random(_random, "lora_unet_output_blocks_9_1_proj_in.lora_down.weight", [2, 10]), Random(_random, "lora_unet_output_blocks_9_1_proj_in.lora_up.weight", [12, 2]),
            Random(_random, "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", [2, 10]), Random(_random, "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", [12, 2]));

        var e = Refused(adapter);
        Assert.Contains("2 adapter module(s) match no tensor of base.safetensors: adapter.safetensors: lora_unet_output_blocks_9_1_proj_in, adapter.safetensors: lora_te2_text_model_encoder_layers_0_mlp_fc1", e.Message);
    }

    [Theory]
    [InlineData(double.NaN, "NaN")]
    [InlineData(double.PositiveInfinity, "Infinity")]
    public void Nan_or_inf_in_an_adapter_is_refused(double bad, string shown)
    {
        var up = Random(_random, KohyaToQ + ".lora_up.weight", [12, 2]);
        up.Values[13] = bad;
        var adapter = Adapter(Random(_random, KohyaToQ + ".lora_down.weight", [2, 10]), up);

        var e = Refused(adapter);
        Assert.Contains($"tensor '{KohyaToQ}.lora_up.weight' holds {shown} at element 13", e.Message);
    }

    [Fact]
    public void A_base_that_is_not_safetensors_is_refused()
    {
        var notSafetensors = Path.Combine(_dir, "model.ckpt");
        File.WriteAllBytes(notSafetensors, [0x50, 0x4B, 0x03, 0x04, .. new byte[64]]);
        var adapter = Adapter(Random(_random, KohyaToQ + ".lora_down.weight", [2, 10]), Random(_random, KohyaToQ + ".lora_up.weight", [12, 2]));

        var e = Assert.Throws<LoraMergeException>(() => LoraMerger.Merge(notSafetensors, [new MergeAdapter(adapter)], _output));
        Assert.StartsWith($"base {notSafetensors} is not a valid safetensors file: header length", e.Message);
        Assert.False(File.Exists(_output));
    }

    [Fact]
    public void Unsupported_network_types_and_unpaired_factors_are_named()
    {
        var adapter = Adapter(
            Random(_random, KohyaToQ + ".lora_down.weight", [2, 10]),
            Random(_random, KohyaToK + ".on_input", []), Random(_random, KohyaToK + ".weight", [12]));

        var e = Refused(adapter);
        Assert.Contains($"tensor '{KohyaToK}.on_input' is a OnInput parameter, a network type merge does not support", e.Message);
        Assert.Contains($"module '{KohyaToQ}' has '{KohyaToQ}.lora_down.weight' but no up tensor", e.Message);
    }

    [Fact]
    public void A_diffusers_adapter_whose_config_is_only_in_its_metadata_is_refused_not_merged_at_alpha_r()
    {
        const string module = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q";
        var adapter = Write(Path.Combine(_dir, "pytorch_lora_weights.safetensors"),
            [Random(_random, module + ".lora_A.weight", [2, 10]), Random(_random, module + ".lora_B.weight", [12, 2])],
            metadata: new Dictionary<string, string> { ["lora_adapter_metadata"] = """{"r": 2, "lora_alpha": 8}""" });

        var e = Refused(adapter);
        Assert.Contains("carries its LoRA config in __metadata__ 'lora_adapter_metadata' (diffusers), which merge does not read yet", e.Message);
    }

    [Fact]
    public void A_merge_that_overflows_the_base_dtype_is_refused()
    {
        var up = Random(_random, KohyaToQ + ".lora_up.weight", [12, 2], 200);
        var adapter = Adapter(Random(_random, KohyaToQ + ".lora_down.weight", [2, 10], 200), up);

        var e = Assert.Throws<LoraMergeException>(() => LoraMerger.Merge(_basePath, [new MergeAdapter(adapter, 100)], _output));
        Assert.Contains($"merged tensor '{ToQ}' has", e.Message);
        Assert.Contains("beyond the range of F16", e.Message);
        Assert.False(File.Exists(_output));
        Assert.False(File.Exists(_output + ".part"));
    }

    [Fact]
    public void The_base_itself_is_not_an_output()
    {
        var adapter = Adapter(Random(_random, KohyaToQ + ".lora_down.weight", [2, 10]), Random(_random, KohyaToQ + ".lora_up.weight", [12, 2]));
        var before = File.ReadAllBytes(_basePath);

        var e = Assert.Throws<LoraMergeException>(() => LoraMerger.Merge(_basePath, [new MergeAdapter(adapter)], _basePath));
        Assert.Contains("is the base file", e.Message);
        Assert.Equal(before, File.ReadAllBytes(_basePath));
    }

    [Fact]
    public void A_write_error_deletes_the_part_file_and_keeps_an_earlier_output()
    {
        var adapter = Adapter(Random(_random, KohyaToQ + ".lora_down.weight", [2, 10]), Random(_random, KohyaToQ + ".lora_up.weight", [12, 2]));
        File.WriteAllText(_output, "an earlier merge");
        var options = new MergeOptions
        {
            OpenOutput = path => new FullDiskStream(new FileStream(path, FileMode.Create, FileAccess.Write), capacity: 1000),
        };

        var e = Assert.Throws<LoraMergeException>(() => LoraMerger.Merge(_basePath, [new MergeAdapter(adapter)], _output, options));
        Assert.Equal($"writing {_output} failed: No space left on device (no output was left)", e.Message);
        Assert.IsType<IOException>(e.InnerException);
        Assert.False(File.Exists(_output + ".part"));
        Assert.Equal("an earlier merge", File.ReadAllText(_output));
    }

    [Fact]
    public void A_full_tmpfs_gives_a_clear_error_and_no_half_file()
    {
        var mount = Path.Combine(_dir, "tiny");
        Directory.CreateDirectory(mount);
        if (!Environment.IsPrivilegedProcess || Run("mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", mount) != 0)
        {
            Assert.Skip("mounting a tmpfs needs root; the FullDiskStream test covers the same path");
        }
        try
        {
            var adapter = Adapter(Random(_random, KohyaToQ + ".lora_down.weight", [2, 10]), Random(_random, KohyaToQ + ".lora_up.weight", [12, 2]));
            var output = Path.Combine(mount, "out.safetensors");
            // 64 KB of F16 weights do not fit in 16 KB.
            var basePath = Write(Path.Combine(_dir, "large.safetensors"), [Random(_random, ToQ, [12, 10]), Random(_random, "first_stage_model.decoder.conv_out.weight", [128, 256])], "F16");

            var e = Assert.Throws<LoraMergeException>(() => LoraMerger.Merge(basePath, [new MergeAdapter(adapter)], output));
            Assert.StartsWith($"writing {output} failed: ", e.Message);
            Assert.Contains("space", e.Message, StringComparison.OrdinalIgnoreCase);
            Assert.Empty(Directory.GetFileSystemEntries(mount));
        }
        finally
        {
            Run("umount", mount);
        }
    }

    private string Adapter(params TestTensor[] tensors) => Write(Path.Combine(_dir, "adapter.safetensors"), tensors);

    private LoraMergeException Refused(string adapter)
    {
        var e = Assert.Throws<LoraMergeException>(() => LoraMerger.Merge(_basePath, [new MergeAdapter(adapter)], _output));
        Assert.False(File.Exists(_output));
        Assert.False(File.Exists(_output + ".part"));
        return e;
    }

    private static int Run(string command, params string[] arguments)
    {
        var start = new ProcessStartInfo(command) { RedirectStandardError = true, RedirectStandardOutput = true };
        foreach (var argument in arguments)
        {
            start.ArgumentList.Add(argument);
        }
        try
        {
            using var process = Process.Start(start)!;
            process.WaitForExit();
            return process.ExitCode;
        }
        catch (System.ComponentModel.Win32Exception)
        {
            return -1;
        }
    }

    /// <summary>Writes through until <c>capacity</c> bytes, then fails as a full disk does.</summary>
    internal sealed class FullDiskStream(Stream inner, long capacity) : Stream
    {
        private long _written;

        public override bool CanRead => false;
        public override bool CanSeek => false;
        public override bool CanWrite => true;
        public override long Length => _written;
        public override long Position { get => _written; set => throw new NotSupportedException(); }

        public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));

        public override void Write(ReadOnlySpan<byte> buffer)
        {
            if (_written + buffer.Length > capacity)
            {
                throw new IOException("No space left on device");
            }
            inner.Write(buffer);
            _written += buffer.Length;
        }

        public override void Flush() => inner.Flush();
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException();
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();

        protected override void Dispose(bool disposing)
        {
            if (disposing)
            {
                inner.Dispose();
            }
            base.Dispose(disposing);
        }
    }
}
