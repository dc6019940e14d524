using System.Buffers.Binary;
using System.CommandLine;
using System.Text;
using System.Text.Json;
using LoraDeploy.Cli;

namespace LoraDeploy.Tests.Cli;

public sealed class InspectCommandTests : IDisposable
{
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "loradeploy-inspect-tests", Guid.NewGuid().ToString("n"));

    public InspectCommandTests() => Directory.CreateDirectory(_dir);

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static async Task<(int ExitCode, string Output, string Error)> Inspect(params string[] args)
    {
        var root = new RootCommand { InspectCommand.Create() };
        var output = new StringWriter();
        var error = new StringWriter();
        var exitCode = await root.Parse(["inspect", .. args]).InvokeAsync(new InvocationConfiguration { Output = output, Error = error }, TestContext.Current.CancellationToken);
        return (exitCode, output.ToString(), error.ToString());
    }

    /// <summary>Writes a minimal safetensors file: tensors (name, dtype, shape) with zeroed data.</summary>
    private string Write(string name, IEnumerable<(string Name, string Dtype, long[] Shape)> tensors, Dictionary<string, string>? metadata = null)
    {
        var header = new Dictionary<string, object>();
        if (metadata is not null)
        {
            header["__metadata__"] = metadata;
        }
        long offset = 0;
        foreach (var (tensorName, dtype, shape) in tensors)
        {
            var bytes = shape.Aggregate(1L, (a, b) => a * b) * (dtype == "F32" ? 4 : 2);
            header[tensorName] = new { dtype, shape, data_offsets = new[] { offset, offset + bytes } };
            offset += bytes;
        }
        var json = JsonSerializer.SerializeToUtf8Bytes(header);
        var path = Path.Combine(_dir, name);
        using var file = File.Create(path);
        Span<byte> prefix = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(prefix, (ulong)json.Length);
        file.Write(prefix);
        file.Write(json);
        file.SetLength(8 + json.Length + offset);
        return path;
    }

    private static IEnumerable<(string, string, long[])> Lora(string module, int rank, long inDim, long outDim) =>
    [
        (module + ".lora_down.weight", "F16", [rank, inDim]),
        (module + ".lora_up.weight", "F16", [outDim, rank]),
        (module + ".alpha", "F16", []),
    ];

    private string SdxlLora() => Write("sdxl.safetensors",
        [
            .. Lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 8, 2048, 640),
            .. Lora("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 8, 1280, 1280),
        ],
        new() { ["ss_output_name"] = "xl_test", ["ss_base_model_version"] = "sdxl_base_v1-0" });

    [Fact]
    public async Task Adapter_prints_a_summary_table()
    {
        var (exitCode, output, error) = await Inspect(SdxlLora());

        Assert.Equal(0, exitCode);
        Assert.Empty(error);
        Assert.Contains("SDXL (sdxl)", output, StringComparison.Ordinal);
        Assert.Contains("kohya", output, StringComparison.Ordinal);
        Assert.Contains("xl_test", output, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Json_has_the_documented_shape()
    {
        var path = SdxlLora();
        var (exitCode, output, _) = await Inspect(path, "--json");

        Assert.Equal(0, exitCode);
        using var doc = JsonDocument.Parse(output);
        var root = doc.RootElement;
        Assert.Equal("sdxl", root.GetProperty("architecture").GetString());
        Assert.Equal("SDXL", root.GetProperty("architecture_display").GetString());
        Assert.Equal("lora", root.GetProperty("network").GetString());
        Assert.Equal("kohya", root.GetProperty("format").GetString());
        Assert.Equal(2, root.GetProperty("module_count").GetInt32());
        Assert.Equal(8, root.GetProperty("rank_max").GetInt32());
        Assert.True(root.GetProperty("is_adapter").GetBoolean());
        Assert.True(root.GetProperty("applicable").GetBoolean());
        Assert.Equal(JsonValueKind.Null, root.GetProperty("not_applicable_reason").ValueKind);
        Assert.Equal(["text_encoder_2", "unet"], root.GetProperty("targets").EnumerateArray().Select(e => e.GetString()));
        Assert.Equal("xl_test", root.GetProperty("metadata").GetProperty("ss_output_name").GetString());
        var sha = Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(File.ReadAllBytes(path)));
        Assert.Equal(sha, root.GetProperty("file_sha256").GetString());
        Assert.Equal(64, root.GetProperty("data_sha256").GetString()!.Length);
    }

    [Fact]
    public async Task Malformed_file_exits_2_with_one_line_on_stderr()
    {
        var path = Path.Combine(_dir, "bad.safetensors");
        var bytes = new byte[64];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, 40); // header length fits, but no JSON follows
        await File.WriteAllBytesAsync(path, bytes, TestContext.Current.CancellationToken);

        var (exitCode, output, error) = await Inspect(path, "--json");

        Assert.Equal(2, exitCode);
        Assert.Empty(output);
        Assert.Single(error.TrimEnd().Split('\n'));
        Assert.Contains("not a valid safetensors file", error, StringComparison.Ordinal);
    }

    public static TheoryData<string, byte[], string> OtherKinds => new()
    {
        // torch.save's legacy format: pickle protocol 2.
        { "legacy.ckpt", [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19], "is a PickleTensor (pickle) file, which can run code when loaded; only safetensors are read" },
        // torch.save's zip format: the first entry is archive/data.pkl.
        { "model.pt", [.. "PK\x03\x04"u8, .. new byte[26], .. "archive/data.pkl"u8, 0x80, 0x02], "is a PyTorch checkpoint (a zip with a pickle inside), which can run code when loaded" },
        { "lora.zip", [.. "PK\x03\x04"u8, .. new byte[26], .. "my-lora.safetensors"u8], "is a zip archive; unpack it" },
        { "lora.safetensors", [.. "\n<!DOCTYPE html><html><head><title>Sign in</title>"u8], "is an HTML page, not a safetensors file" },
        { "adapter.gguf", [.. "GGUF"u8, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], "is a GGUF file (llama.cpp's format), not a safetensors file" },
    };

    [Theory]
    [MemberData(nameof(OtherKinds))]
    public async Task A_file_of_another_kind_is_named_in_one_line(string name, byte[] content, string expected)
    {
        var path = Path.Combine(_dir, name);
        await File.WriteAllBytesAsync(path, [.. content, .. new byte[256]], TestContext.Current.CancellationToken);

        var (exitCode, output, error) = await Inspect(path);

        Assert.Equal(2, exitCode);
        Assert.Empty(output);
        var line = Assert.Single(error.TrimEnd().Split('\n'));
        Assert.Contains($"{path} {expected}", line, StringComparison.Ordinal);
        Assert.DoesNotContain("header length", line, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Full_checkpoint_exits_2()
    {
        var path = Write("model.safetensors",
        [
            ("model.diffusion_model.input_blocks.0.0.weight", "F16", [320, 4, 3, 3]),
            ("model.diffusion_model.out.2.weight", "F16", [4, 320, 3, 3]),
        ]);

        var (exitCode, output, error) = await Inspect(path);

        Assert.Equal(2, exitCode);
        Assert.Empty(output);
        Assert.Contains("not a LoRA-family adapter", error, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Missing_file_exits_2()
    {
        var (exitCode, _, error) = await Inspect(Path.Combine(_dir, "nope.safetensors"));

        Assert.Equal(2, exitCode);
        Assert.NotEmpty(error);
    }
}
