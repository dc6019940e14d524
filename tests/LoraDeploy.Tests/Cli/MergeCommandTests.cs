using System.Buffers.Binary;
using System.CommandLine;
using System.Text.Json;
using LoraDeploy.Cli;
using LoraDeploy.Lora.Gguf;
using LoraDeploy.Lora.Safetensors;
using LoraDeploy.Lora.Tests.Support;

namespace LoraDeploy.Tests.Cli;

public sealed class MergeCommandTests : IDisposable
{
    private const string Weight = "model.diffusion_model.input_blocks.4.1.proj_out.weight";
    private const string Module = "lora_unet_input_blocks_4_1_proj_out";
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "loradeploy-merge-cli-tests", Guid.NewGuid().ToString("n"));
    private readonly string _base;
    private readonly string _lora;

    public MergeCommandTests()
    {
        Directory.CreateDirectory(_dir);
        _base = new SafetensorsWriter()
            .Metadata("modelspec.title", "tiny base")
            .Tensor(Weight, "F32", [2, 2], F32(1, 2, 3, 4))
            .Tensor("first_stage_model.decoder.conv_in.weight", "F32", [3], F32(5, 6, 7))
            .WriteTo(Path.Combine(_dir, "base.safetensors"));
        // ΔW = up·down = [3, 4]ᵀ·[1, 2] = [[3, 6], [4, 8]]; alpha 1 / rank 1.
        _lora = new SafetensorsWriter()
            .Tensor(Module + ".lora_down.weight", "F32", [1, 2], F32(1, 2))
            .Tensor(Module + ".lora_up.weight", "F32", [2, 1], F32(3, 4))
            .Tensor(Module + ".alpha", "F32", [], F32(1))
            .WriteTo(Path.Combine(_dir, "style.safetensors"));
    }

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public async Task Merges_two_adapters_with_strengths_and_prints_a_json_summary()
    {
        var output = Path.Combine(_dir, "merged.safetensors");

        var (exitCode, stdout, stderr) = await Merge("--base", _base, "--lora", _lora + ":0.5", "--lora", _lora, "-o", output, "--json");

        Assert.True(exitCode == 0, stderr);
        Assert.Equal([1 + 1.5f * 3, 2 + 1.5f * 6, 3 + 1.5f * 4, 4 + 1.5f * 8], ReadF32(output, Weight));
        Assert.Equal([5f, 6f, 7f], ReadF32(output, "first_stage_model.decoder.conv_in.weight"));
        using var summary = JsonDocument.Parse(stdout);
        var root = summary.RootElement;
        Assert.Equal(output, root.GetProperty("output").GetString());
        Assert.Equal(1, root.GetProperty("tensors_merged").GetInt32());
        Assert.Equal(1, root.GetProperty("tensors_copied").GetInt32());
        Assert.Equal(2, root.GetProperty("modules_applied").GetInt32());
        Assert.Equal(new FileInfo(output).Length, root.GetProperty("bytes").GetInt64());
        Assert.True(root.GetProperty("seconds").GetDouble() >= 0);
        var adapters = root.GetProperty("adapters").EnumerateArray().ToList();
        Assert.Equal([0.5, 1.0], adapters.Select(a => a.GetProperty("strength").GetDouble()));
        Assert.All(adapters, a => Assert.Equal("style.safetensors", a.GetProperty("file").GetString()));
    }

    [Fact]
    public async Task Dtype_option_writes_bf16_and_the_plain_summary_names_the_output()
    {
        var output = Path.Combine(_dir, "merged-bf16.safetensors");

        var (exitCode, stdout, stderr) = await Merge("--base", _base, "--lora", _lora, "-o", output, "--dtype", "bf16");

        Assert.True(exitCode == 0, stderr);
        Assert.StartsWith("merged 1 modules from 1 adapter(s) into 1 tensors (1 copied)", stdout);
        Assert.Contains(output, stdout);
        using var header = SafetensorsReader.ReadFile(output);
        Assert.All(header.Tensors, t => Assert.Equal("BF16", t.Dtype));
        Assert.Equal("tiny base", header.Metadata["modelspec.title"]);
        Assert.Contains("\"sha256\"", header.Metadata["loradeploy.merge"]);
    }

    [Fact]
    public async Task A_missing_adapter_file_is_named()
    {
        var missing = Path.Combine(_dir, "nope.safetensors");

        var (exitCode, _, stderr) = await Merge("--base", _base, "--lora", missing + ":0.7", "-o", Path.Combine(_dir, "out.safetensors"));

        Assert.Equal(MergeCommand.MergeFailed, exitCode);
        Assert.Equal($"merge: --lora {missing}:0.7: no such file", stderr.Trim());
    }

    [Fact]
    public async Task A_refused_merge_exits_2_with_the_reason_and_writes_nothing()
    {
        var wrong = new SafetensorsWriter()
            .Tensor(Module + ".lora_down.weight", "F32", [1, 3], F32(1, 2, 3))
            .Tensor(Module + ".lora_up.weight", "F32", [2, 1], F32(3, 4))
            .WriteTo(Path.Combine(_dir, "wrong.safetensors"));
        var output = Path.Combine(_dir, "out.safetensors");

        var (exitCode, stdout, stderr) = await Merge("--base", _base, "--lora", wrong, "-o", output, "--json");

        Assert.Equal(MergeCommand.MergeFailed, exitCode);
        Assert.Equal("", stdout);
        Assert.Contains($"merge: cannot merge: 1 module(s) do not fit the base tensor: wrong.safetensors: {Module} → {Weight}: the adapter's LoRA delta is [2, 3], the base tensor [2, 2]", stderr);
        Assert.False(File.Exists(output));
    }

    [Fact]
    public async Task Required_options_and_dtype_values_are_checked()
    {
        var (noLora, _, noLoraError) = await Merge("--base", _base, "-o", Path.Combine(_dir, "out.safetensors"));
        Assert.NotEqual(0, noLora);
        Assert.Contains("--lora", noLoraError);

        var (badDtype, _, badDtypeError) = await Merge("--base", _base, "--lora", _lora, "-o", Path.Combine(_dir, "out.safetensors"), "--dtype", "f8");
        Assert.NotEqual(0, badDtype);
        Assert.Contains("f8", badDtypeError);
    }

    [Fact]
    public void A_colon_suffix_that_is_not_a_number_belongs_to_the_file_name()
    {
        var odd = Path.Combine(_dir, "v1:final.safetensors");
        File.Copy(_lora, odd);

        Assert.Equal(odd, MergeCommand.ParseLora(odd)!.Path);
        Assert.Equal(1.0, MergeCommand.ParseLora(odd)!.Strength);
        Assert.Equal(-0.25, MergeCommand.ParseLora(odd + ":-0.25")!.Strength);
        Assert.Null(MergeCommand.ParseLora(odd + ":x"));
    }

    [Fact]
    public async Task A_gguf_base_is_merged_as_gguf_with_the_json_summary()
    {
        var model = new TinyLlama { Hidden = 32, Heads = 4, KvHeads = 2, FeedForward = 48, VocabSize = 270 }.Generate();
        var basePath = model.WriteGguf(Path.Combine(_dir, "base.gguf"));
        var (_, adapter) = new PeftAdapterFixture { Targets = ["q_proj", "down_proj"] }.Generate(model).WriteTo(Path.Combine(_dir, "adapter"));
        var output = Path.Combine(_dir, "merged.gguf");

        var (exitCode, stdout, stderr) = await Merge("--base", basePath, "--lora", adapter + ":0.7", "-o", output, "--json");

        Assert.True(exitCode == 0, stderr);
        var merged = GgufReader.ReadFile(output);
        Assert.Equal("llama", merged.Architecture);
        Assert.Contains("\"strength\":0.7", merged.GetString("loradeploy.merge"));
        using var summary = JsonDocument.Parse(stdout);
        Assert.Equal(4, summary.RootElement.GetProperty("tensors_merged").GetInt32());
        Assert.Equal(GgufReader.ReadFile(basePath).Tensors.Count - 4, summary.RootElement.GetProperty("tensors_copied").GetInt32());
        Assert.Equal(new FileInfo(output).Length, summary.RootElement.GetProperty("bytes").GetInt64());
    }

    [Fact]
    public async Task A_llama_cpp_lora_gguf_merges_into_a_gguf_base_like_the_peft_adapter_it_came_from()
    {
        var model = new TinyLlama { Hidden = 32, Heads = 4, KvHeads = 2, FeedForward = 48, VocabSize = 270 }.Generate();
        var basePath = model.WriteGguf(Path.Combine(_dir, "base.gguf"));
        var (config, adapter) = new PeftAdapterFixture { Targets = ["q_proj", "down_proj"] }.Generate(model).WriteTo(Path.Combine(_dir, "adapter"));
        var lora = Path.Combine(_dir, "my-lora.gguf");
        LoraDeploy.Lora.Peft.PeftLoraConverter.Convert(LoraDeploy.Lora.Peft.PeftAdapterConfig.ReadFile(config), adapter, LoraDeploy.Lora.Peft.LlamaCppBaseModel.ReadFile(basePath), lora);
        var fromGguf = Path.Combine(_dir, "from-gguf.gguf");
        var fromPeft = Path.Combine(_dir, "from-peft.gguf");

        var (exitCode, stdout, stderr) = await Merge("--base", basePath, "--lora", lora + ":0.7", "-o", fromGguf, "--json");
        await Merge("--base", basePath, "--lora", adapter + ":0.7", "-o", fromPeft);

        Assert.True(exitCode == 0, stderr);
        using var summary = JsonDocument.Parse(stdout);
        Assert.Equal(4, summary.RootElement.GetProperty("tensors_merged").GetInt32());
        Assert.Equal("my-lora.gguf", summary.RootElement.GetProperty("adapters")[0].GetProperty("file").GetString());
        var (a, b) = (GgufReader.ReadFile(fromGguf), GgufReader.ReadFile(fromPeft));
        Assert.Equal(b.FileLength - b.DataOffset, a.FileLength - a.DataOffset);
        Assert.True(Data(fromGguf, a).AsSpan().SequenceEqual(Data(fromPeft, b)), "the tensors differ from the PEFT adapter's merge");
    }

    /// <summary>The data section: every tensor's bytes.</summary>
    private static byte[] Data(string path, GgufFile gguf)
    {
        var bytes = File.ReadAllBytes(path);
        return bytes[(int)gguf.DataOffset..];
    }

    [Fact]
    public async Task A_gguf_base_refuses_dtype_and_writes_nothing()
    {
        var model = new TinyLlama { Hidden = 32, Heads = 4, KvHeads = 2, FeedForward = 48, VocabSize = 270 }.Generate();
        var basePath = model.WriteGguf(Path.Combine(_dir, "base.gguf"));
        var (_, adapter) = new PeftAdapterFixture { Targets = ["q_proj"] }.Generate(model).WriteTo(Path.Combine(_dir, "adapter"));
        var output = Path.Combine(_dir, "merged.gguf");

        var (exitCode, _, stderr) = await Merge("--base", basePath, "--lora", adapter, "-o", output, "--dtype", "f16");

        Assert.Equal(MergeCommand.MergeFailed, exitCode);
        Assert.Equal("merge: a GGUF base keeps each tensor's own type; --dtype F16 is for safetensors bases", stderr.Trim());
        Assert.False(File.Exists(output));
    }

    private static async Task<(int ExitCode, string Output, string Error)> Merge(params string[] args)
    {
        var root = new RootCommand { MergeCommand.Create() };
        var output = new StringWriter();
        var error = new StringWriter();
        var exitCode = await root.Parse(["merge", .. args]).InvokeAsync(new InvocationConfiguration { Output = output, Error = error }, TestContext.Current.CancellationToken);
        return (exitCode, output.ToString(), error.ToString());
    }

    private static byte[] F32(params float[] values)
    {
        var bytes = new byte[values.Length * 4];
        for (var i = 0; i < values.Length; i++)
        {
            BinaryPrimitives.WriteSingleLittleEndian(bytes.AsSpan(i * 4), values[i]);
        }
        return bytes;
    }

    private static float[] ReadF32(string path, string name)
    {
        using var header = SafetensorsReader.ReadFile(path);
        using var file = File.OpenRead(path);
        header.TryGetTensor(name, out var tensor);
        var bytes = new byte[tensor.ByteLength];
        header.ReadTensor(file, name, bytes);
        return [.. Enumerable.Range(0, bytes.Length / 4).Select(i => BinaryPrimitives.ReadSingleLittleEndian(bytes.AsSpan(i * 4)))];
    }
}
