using System.Buffers.Binary;
using System.CommandLine;
using System.Text.Json;
using LoraDeploy.Cli;
using LoraDeploy.Lora.Safetensors;
using LoraDeploy.Lora.Tests.Support;

namespace LoraDeploy.Tests.Cli;

public sealed class ConvertCommandTests : IDisposable
{
    private const string Module = "lora_unet_down_blocks_0_attentions_0_proj_out";
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "loradeploy-convert-cli-tests", Guid.NewGuid().ToString("n"));
    private readonly string _lora;

    public ConvertCommandTests()
    {
        Directory.CreateDirectory(_dir);
        _lora = new SafetensorsWriter()
            .Metadata("ss_network_dim", "1")
            .Tensor(Module + ".lora_down.weight", "F32", [1, 2], F32(1, 2))
            .Tensor(Module + ".lora_up.weight", "F32", [2, 1], F32(3, 4))
            .Tensor(Module + ".alpha", "F32", [], F32(0.5f))
            .WriteTo(Path.Combine(_dir, "style.safetensors"));
    }

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public async Task Converts_to_peft_writes_the_config_beside_and_prints_a_json_summary()
    {
        Directory.CreateDirectory(Path.Combine(_dir, "peft"));
        var output = Path.Combine(_dir, "peft", "adapter_model.safetensors");

        var (exitCode, stdout, stderr) = await Convert(_lora, "--to", "peft", "-o", output, "--json");

        Assert.True(exitCode == 0, stderr);
        using var summary = JsonDocument.Parse(stdout);
        var root = summary.RootElement;
        Assert.Equal(output, root.GetProperty("output").GetString());
        Assert.Equal(Path.Combine(_dir, "peft", "adapter_config.json"), root.GetProperty("config").GetString());
        Assert.Equal("kohya", root.GetProperty("from").GetString());
        Assert.Equal("peft", root.GetProperty("to").GetString());
        Assert.Equal("sd15", root.GetProperty("architecture").GetString());
        Assert.Equal(1, root.GetProperty("modules_in").GetInt32());
        Assert.Equal(2, root.GetProperty("tensors_copied").GetInt32());
        Assert.Equal(new FileInfo(output).Length, root.GetProperty("bytes").GetInt64());
        Assert.Equal(64, root.GetProperty("source_sha256").GetString()!.Length);

        using var header = SafetensorsReader.ReadFile(output);
        Assert.True(header.TryGetTensor("base_model.model.down_blocks.0.attentions.0.proj_out.lora_B.weight", out _));
        Assert.Equal("1", header.Metadata["ss_network_dim"]);
        using var config = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(_dir, "peft", "adapter_config.json")));
        Assert.Equal(0.5, config.RootElement.GetProperty("lora_alpha").GetDouble());
        Assert.Equal(1, config.RootElement.GetProperty("r").GetInt32());
    }

    [Fact]
    public async Task The_plain_summary_names_the_output_and_a_fused_rank()
    {
        var diffusers = new SafetensorsWriter();
        foreach (var part in new[] { "to_q", "to_k", "to_v" })
        {
            diffusers.Tensor($"transformer.transformer_blocks.0.attn.{part}.lora_A.weight", "F32", [1, 2], F32(1, 2))
                .Tensor($"transformer.transformer_blocks.0.attn.{part}.lora_B.weight", "F32", [2, 1], F32(3, 4));
        }
        var input = diffusers.WriteTo(Path.Combine(_dir, "flux.safetensors"));
        var output = Path.Combine(_dir, "flux-kohya.safetensors");

        var (exitCode, stdout, stderr) = await Convert(input, "--to", "kohya", "-o", output);

        Assert.True(exitCode == 0, stderr);
        Assert.StartsWith("converted 3 modules (diffusers) to 1 kohya modules, 0 tensors copied and 2 built", stdout);
        Assert.Contains(output, stdout);
        Assert.Contains("fused q/k/v, the rank grew: double_blocks.0.img_attn.qkv: rank 1+1+1 → 3", stdout);
        using var header = SafetensorsReader.ReadFile(output);
        Assert.True(header.TryGetTensor("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight", out var up));
        Assert.Equal([6L, 3], up.Shape);
    }

    [Fact]
    public async Task A_refused_conversion_exits_2_with_the_reason_and_writes_nothing()
    {
        var loha = new SafetensorsWriter()
            .Tensor(Module + ".hada_w1_a", "F32", [2, 1], F32(1, 2)).Tensor(Module + ".hada_w1_b", "F32", [1, 2], F32(1, 2))
            .Tensor(Module + ".hada_w2_a", "F32", [2, 1], F32(1, 2)).Tensor(Module + ".hada_w2_b", "F32", [1, 2], F32(1, 2))
            .WriteTo(Path.Combine(_dir, "loha.safetensors"));
        var output = Path.Combine(_dir, "out.safetensors");

        var (exitCode, stdout, stderr) = await Convert(loha, "--to", "diffusers", "-o", output, "--json");

        Assert.Equal(ConvertCommand.ConvertFailed, exitCode);
        Assert.Equal("", stdout);
        Assert.Contains($"convert: cannot convert to diffusers: 1 module(s) have no exact form there: '{Module}' is LoHa, which the diffusers convention has no form for", stderr);
        Assert.False(File.Exists(output));
        Assert.False(File.Exists(output + ".part"));
    }

    [Fact]
    public async Task A_missing_file_and_bad_options_are_named()
    {
        var missing = Path.Combine(_dir, "nope.safetensors");
        var (noFile, _, noFileError) = await Convert(missing, "--to", "kohya", "-o", Path.Combine(_dir, "out.safetensors"));
        Assert.Equal(ConvertCommand.ConvertFailed, noFile);
        Assert.Equal($"convert: {missing}: no such file", noFileError.Trim());

        var (badTo, _, badToError) = await Convert(_lora, "--to", "onnx", "-o", Path.Combine(_dir, "out.safetensors"));
        Assert.NotEqual(0, badTo);
        Assert.Contains("onnx", badToError);

        var (noOutput, _, noOutputError) = await Convert(_lora, "--to", "kohya");
        Assert.NotEqual(0, noOutput);
        Assert.Contains("--output", noOutputError);
    }

    private static async Task<(int ExitCode, string Output, string Error)> Convert(params string[] args)
    {
        var root = new RootCommand { ConvertCommand.Create() };
        var output = new StringWriter();
        var error = new StringWriter();
        var exitCode = await root.Parse(["convert", .. args]).InvokeAsync(new InvocationConfiguration { Output = output, Error = error }, TestContext.Current.CancellationToken);
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
}
