using System.Buffers.Binary;
using System.Text.Json;

namespace LoraDeploy.Benchmarks;

/// <summary>How the tensors are listed in the header.</summary>
public enum TensorOrder
{
    /// <summary>
    /// As the safetensors library writes every file: sorted by dtype (descending), then by name in ordinal
    /// byte order, data laid out in the same order. All tensors here are F16, so simply by name.
    /// </summary>
    Sorted,

    /// <summary>Module by module (alpha, lora_down, lora_up), as a hand-written file could list them.</summary>
    ModuleOrder,
}

/// <summary>
/// Builds a kohya SDXL LoRA layout (real SAI module names and widths) of exactly 2,000 tensors:
/// 666 modules × (lora_down, lora_up, alpha) plus one module without alpha.
/// </summary>
internal static class KohyaSdxlHeader
{
    public const int TensorCount = 2000;

    /// <summary>Returns the 8-byte prefix + header JSON, and the data section length.</summary>
    public static (byte[] Head, long DataLength) Build(int rank, Func<long, long> scaleWidth, TensorOrder order = TensorOrder.Sorted)
    {
        var list = new List<(string Name, long[] Shape)>(TensorCount);
        foreach (var (name, inDim, outDim) in Modules())
        {
            if (list.Count == TensorCount)
            {
                break;
            }
            list.Add((name + ".alpha", []));
            list.Add((name + ".lora_down.weight", [rank, scaleWidth(inDim)]));
            if (list.Count < TensorCount)
            {
                list.Add((name + ".lora_up.weight", [scaleWidth(outDim), rank]));
            }
        }
        if (order == TensorOrder.Sorted)
        {
            // Names are ASCII, so ordinal string order is the library's UTF-8 byte order.
            list.Sort((a, b) => string.CompareOrdinal(a.Name, b.Name));
        }
        using var json = new MemoryStream();
        long offset = 0;
        using (var writer = new Utf8JsonWriter(json))
        {
            writer.WriteStartObject();
            writer.WriteStartObject("__metadata__");
            writer.WriteString("ss_network_module", "networks.lora");
            writer.WriteString("ss_base_model_version", "sdxl_base_v1-0");
            writer.WriteString("ss_network_dim", rank.ToString(System.Globalization.CultureInfo.InvariantCulture));
            writer.WriteString("ss_tag_frequency", """{"10_benchchar": {"benchchar": 40, "1girl": 38, "solo": 30}}""");
            writer.WriteEndObject();
            void Tensor(string name, long[] shape)
            {
                var bytes = shape.Aggregate(1L, (a, b) => a * b) * 2;
                writer.WriteStartObject(name);
                writer.WriteString("dtype", "F16");
                writer.WriteStartArray("shape");
                foreach (var dim in shape)
                {
                    writer.WriteNumberValue(dim);
                }
                writer.WriteEndArray();
                writer.WriteStartArray("data_offsets");
                writer.WriteNumberValue(offset);
                writer.WriteNumberValue(offset + bytes);
                writer.WriteEndArray();
                writer.WriteEndObject();
                offset += bytes;
            }
            foreach (var (name, shape) in list)
            {
                Tensor(name, shape);
            }
            writer.WriteEndObject();
        }
        var head = new byte[8 + json.Length];
        BinaryPrimitives.WriteUInt64LittleEndian(head, (ulong)json.Length);
        json.ToArray().CopyTo(head, 8);
        return (head, offset);
    }

    private static IEnumerable<(string Name, long In, long Out)> Modules()
    {
        IEnumerable<(string Block, long Width, int Depth)> blocks =
        [
            ("input_blocks_4_1", 640, 2), ("input_blocks_5_1", 640, 2),
            ("input_blocks_7_1", 1280, 10), ("input_blocks_8_1", 1280, 10),
            ("middle_block_1", 1280, 10),
            ("output_blocks_0_1", 1280, 10), ("output_blocks_1_1", 1280, 10), ("output_blocks_2_1", 1280, 10),
            ("output_blocks_3_1", 640, 2), ("output_blocks_4_1", 640, 2), ("output_blocks_5_1", 640, 2),
        ];
        foreach (var (block, c, depth) in blocks)
        {
            for (var t = 0; t < depth; t++)
            {
                var prefix = $"lora_unet_{block}_transformer_blocks_{t}_";
                yield return (prefix + "attn1_to_q", c, c);
                yield return (prefix + "attn1_to_k", c, c);
                yield return (prefix + "attn1_to_v", c, c);
                yield return (prefix + "attn1_to_out_0", c, c);
                yield return (prefix + "attn2_to_q", c, c);
                yield return (prefix + "attn2_to_k", 2048, c);
                yield return (prefix + "attn2_to_v", 2048, c);
                yield return (prefix + "attn2_to_out_0", c, c);
                yield return (prefix + "ff_net_0_proj", c, 8 * c);
                yield return (prefix + "ff_net_2", 4 * c, c);
            }
        }
    }
}
