using System.Buffers.Binary;
using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;

namespace LoraDeploy.Tests.Dashboard;

/// <summary>Adapter files for end-to-end tests, made here rather than shipped.</summary>
public static class TestLoras
{
    /// <summary>
    /// A kohya-format FLUX.1 LoRA (the key layout of sd-scripts' FLUX trainer) with F16 zeros: every double
    /// and single block, rank <paramref name="rank"/>.
    /// </summary>
    public static byte[] BuildFluxKohyaLora(int rank)
    {
        var modules = new List<(string Name, int In, int Out)>();
        for (var i = 0; i < 19; i++)
        {
            foreach (var side in new[] { "img", "txt" })
            {
                modules.Add(($"lora_unet_double_blocks_{i}_{side}_attn_qkv", 3072, 9216));
                modules.Add(($"lora_unet_double_blocks_{i}_{side}_attn_proj", 3072, 3072));
                modules.Add(($"lora_unet_double_blocks_{i}_{side}_mlp_0", 3072, 12288));
                modules.Add(($"lora_unet_double_blocks_{i}_{side}_mlp_2", 12288, 3072));
                modules.Add(($"lora_unet_double_blocks_{i}_{side}_mod_lin", 3072, 18432));
            }
        }
        for (var i = 0; i < 38; i++)
        {
            modules.Add(($"lora_unet_single_blocks_{i}_linear1", 3072, 21504));
            modules.Add(($"lora_unet_single_blocks_{i}_linear2", 15360, 3072));
            modules.Add(($"lora_unet_single_blocks_{i}_modulation_lin", 3072, 9216));
        }

        var header = new JsonObject
        {
            ["__metadata__"] = new JsonObject
            {
                ["ss_network_module"] = "networks.lora_flux",
                ["ss_network_dim"] = rank.ToString(CultureInfo.InvariantCulture),
                ["ss_network_alpha"] = rank.ToString(CultureInfo.InvariantCulture),
                ["ss_tag_frequency"] = "{\"img\": {\"pxlsprite\": 12, \"pixel art\": 9}}",
            },
        };
        long offset = 0;
        void Add(string name, params int[] shape)
        {
            long bytes = 2;
            foreach (var d in shape)
            {
                bytes *= d;
            }
            header[name] = new JsonObject
            {
                ["dtype"] = "F16",
                ["shape"] = new JsonArray(shape.Select(static s => (JsonNode)s).ToArray()),
                ["data_offsets"] = new JsonArray(offset, offset + bytes),
            };
            offset += bytes;
        }
        foreach (var (name, @in, @out) in modules.OrderBy(static m => m.Name, StringComparer.Ordinal))
        {
            Add($"{name}.alpha");
            Add($"{name}.lora_down.weight", rank, @in);
            Add($"{name}.lora_up.weight", @out, rank);
        }

        var json = Encoding.UTF8.GetBytes(header.ToJsonString());
        var padded = (json.Length + 7) / 8 * 8;
        var file = new byte[8 + padded + offset];
        BinaryPrimitives.WriteUInt64LittleEndian(file, (ulong)padded);
        json.CopyTo(file, 8);
        file.AsSpan(8 + json.Length, padded - json.Length).Fill((byte)' ');
        // Alphas hold the rank as F16 so alpha/rank = 1; everything else stays zero.
        var alphaBits = BitConverter.HalfToUInt16Bits((Half)rank);
        foreach (var (key, value) in header)
        {
            if (key.EndsWith(".alpha", StringComparison.Ordinal) && value?["data_offsets"] is JsonArray offsets)
            {
                BinaryPrimitives.WriteUInt16LittleEndian(file.AsSpan(8 + padded + (int)offsets[0]!.GetValue<long>()), alphaBits);
            }
        }
        return file;
    }
}
