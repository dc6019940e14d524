using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using LoraDeploy.Lora.Safetensors;
using LoraDeploy.Lora.Tests.Support;

namespace LoraDeploy.Lora.Tests;

/// <summary>
/// A header keeps its tensor table in arrays rented from the shared pools and gives them back on Dispose; these
/// tests hold it to never showing another header's data, before or after.
/// </summary>
public sealed class ReaderDisposeTests
{
    private static byte[] File(string headerJson, long dataLength) => SafetensorsWriter.RawFile(headerJson, dataLength);

    // Tensors of one byte per element, U8, in order; names as given (raw JSON keys, already escaped).
    private static byte[] Header(IReadOnlyList<(string Key, long[] Shape)> tensors)
    {
        var json = new StringBuilder("{");
        long offset = 0;
        foreach (var (key, shape) in tensors)
        {
            var size = shape.Aggregate(1L, (a, b) => a * b);
            json.Append(json.Length > 1 ? "," : "")
                .Append($$"""
                    "{{key}}":{"dtype":"U8","shape":[{{string.Join(",", shape)}}],"data_offsets":[{{offset}},{{offset + size}}]}
                    """);
            offset += size;
        }
        return File(json.Append('}').ToString(), offset);
    }

    private static SafetensorsHeader Read(byte[] file) => SafetensorsReader.Read(new MemoryStream(file));

    [Fact]
    public void Every_member_that_reads_the_tensor_table_throws_after_Dispose()
    {
        var file = Header([("a", [2, 3]), ("b", [])]);
        var header = Read(file);
        Assert.Equal(2, header.Tensors.Count);
        header.Dispose();
        header.Dispose();

        Assert.Throws<ObjectDisposedException>(() => header.Tensors);
        Assert.Throws<ObjectDisposedException>(() => header.TensorCount);
        Assert.Throws<ObjectDisposedException>(() => header.TryGetTensor("a", out _));
        Assert.Throws<ObjectDisposedException>(() => header.OpenTensor(new MemoryStream(file), "a"));
        Assert.Throws<ObjectDisposedException>(() => header.ReadTensor(new MemoryStream(file), "a", new byte[6]));
        Assert.Throws<ObjectDisposedException>(() => LoraProber.Probe(header));
        // The layout and the metadata own no pooled memory.
        Assert.Empty(header.Metadata);
        Assert.Equal(file.Length, header.FileLength);
        Assert.Equal(file.Length - 7, header.DataOffset);
    }

    [Fact]
    public void A_header_read_after_another_was_disposed_sees_only_its_own_tensors()
    {
        var first = Read(Header([("first_a", [4]), ("first_b", [1, 2]), ("first_c", [3])]));
        Assert.Equal(3, first.TensorCount);
        first.Dispose();

        // Likely the same pooled arrays, shorter content: nothing of the first may show through.
        var second = Read(Header([("z", [1])]));
        Assert.Equal(1, second.TensorCount);
        var tensor = Assert.Single(second.Tensors);
        Assert.Equal(("z", "U8", 0L, 1L), (tensor.Name, tensor.Dtype, tensor.DataStart, tensor.DataEnd));
        Assert.Equal([1L], tensor.Shape);
        Assert.False(second.TryGetTensor("first_a", out _));
        Assert.Throws<ObjectDisposedException>(() => first.Tensors);
        second.Dispose();
    }

    [Fact]
    public void An_undisposed_header_keeps_its_tensors_while_others_are_read_and_disposed()
    {
        var kept = Read(Header([("kept_a", [5]), ("kept_b", [2, 2])]));
        for (var i = 0; i < 20; i++)
        {
            using var other = Read(Header([($"other_{i}", [7, 1]), ("x", [1])]));
            Assert.Equal(2, other.TensorCount);
        }
        Assert.Equal(["kept_a", "kept_b"], kept.Tensors.Select(t => t.Name));
        Assert.Equal([2L, 2L], kept.Tensors[1].Shape);
        Assert.Equal(5, kept.Tensors[1].DataStart);
    }

    [Fact]
    public void Escaped_names_stay_right_across_reads_and_disposes()
    {
        for (var i = 0; i < 3; i++)
        {
            using var header = Read(Header([(@"\u00e9" + i, [1]), ("plain", [1]), (@"tab\tname", [2])]));
            Assert.Equal(["é" + i, "plain", "tab\tname"], header.Tensors.Select(t => t.Name));
            Assert.True(header.TryGetTensor("tab\tname", out var tab));
            Assert.Equal([2L], tab.Shape);
        }
    }

    [Fact]
    public void Probing_the_same_files_in_turn_with_disposed_headers_gives_the_same_reports()
    {
        var files = new[]
        {
            new SafetensorsWriter()
                .Metadata("ss_network_module", "networks.lora")
                .Lora("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 4, 768, 320, alpha: 2)
                .Lora("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 4, 768, 768, alpha: 2)
                .ToBytes(),
            new SafetensorsWriter()
                .Lora("lora_unet_double_blocks_0_img_attn_qkv", 16, 3072, 9216, alpha: 16, dtype: "BF16")
                .Lora("lora_unet_single_blocks_37_linear1", 16, 3072, 21504, alpha: 16, dtype: "BF16")
                .Lora("lora_unet_single_blocks_37_linear2", 16, 15360, 3072, alpha: 16, dtype: "BF16")
                .ToBytes(),
        };
        string ProbeJson(byte[] file)
        {
            using var stream = new MemoryStream(file);
            using var header = SafetensorsReader.Read(stream);
            return JsonSerializer.Serialize(LoraProber.Probe(header, stream));
        }
        var expected = files.Select(ProbeJson).ToArray();
        Assert.NotEqual(expected[0], expected[1]);
        for (var round = 0; round < 10; round++)
        {
            for (var f = 0; f < files.Length; f++)
            {
                Assert.Equal(expected[f], ProbeJson(files[f]));
            }
        }
    }

    [Fact]
    public void A_header_too_large_to_pool_reads_and_disposes_the_same()
    {
        // Over the reader's 4 MB pooling limit: plain arrays, which Dispose leaves to the GC.
        var tensors = Enumerable.Range(0, 45_000).Select(i => ($"layer_{i:D6}_" + new string('w', 60), new long[] { 1 })).ToList();
        var file = Header(tensors);
        Assert.True(BinaryPrimitives.ReadInt64LittleEndian(file) > 4 * 1024 * 1024);
        var header = Read(file);
        Assert.Equal(45_000, header.TensorCount);
        Assert.True(header.TryGetTensor(tensors[44_999].Item1, out var last));
        Assert.Equal(44_999, last.DataStart);
        header.Dispose();
        Assert.Throws<ObjectDisposedException>(() => header.TensorCount);
    }
}
