using System.Buffers.Binary;
using System.Globalization;
using System.IO.Compression;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json.Nodes;

namespace LoraDeploy.Tests.Simulator;

/// <summary>SaveImage: deterministic RGB PNGs named and placed like <c>folder_paths.get_save_image_path</c> does.</summary>
public sealed partial class ComfyUiSimulator
{
    private JsonObject SaveImages(Job job, string saveId)
    {
        var prompt = job.Prompt;
        var inputs = (JsonObject)((JsonObject)prompt[saveId]!)["inputs"]!;
        var prefix = PyStr(inputs["filename_prefix"]);
        var sampler = Upstream(prompt, inputs["images"], "KSampler");
        var samplerInputs = sampler is null ? [] : (JsonObject)((JsonObject)prompt[sampler]!)["inputs"]!;
        var latent = sampler is null ? null : Upstream(prompt, samplerInputs["latent_image"], "EmptyLatentImage", "EmptySD3LatentImage");
        var latentInputs = latent is null ? new JsonObject { ["width"] = 512, ["height"] = 512 } : (JsonObject)((JsonObject)prompt[latent]!)["inputs"]!;
        // The VAE decodes width//8 latent pixels back to 8 image pixels each.
        var width = Math.Max(8, (int)PyInt(latentInputs["width"]) / 8 * 8);
        var height = Math.Max(8, (int)PyInt(latentInputs["height"]) / 8 * 8);
        var batch = latentInputs["batch_size"] is null ? 1 : (int)PyInt(latentInputs["batch_size"]);

        var key = new StringBuilder();
        if (sampler is not null)
        {
            foreach (var name in new[] { "seed", "steps", "cfg", "sampler_name", "scheduler", "denoise" })
            {
                key.Append(name).Append('=').Append(samplerInputs[name]?.ToJsonString()).Append('\n');
            }
            var text = Upstream(prompt, samplerInputs["positive"], "CLIPTextEncode");
            key.Append("positive=").Append(text is null ? "" : PyStr(((JsonObject)prompt[text]!)["inputs"]!["text"])).Append('\n');
            foreach (var ancestor in Ancestors(prompt, sampler).Order(StringComparer.Ordinal))
            {
                var node = (JsonObject)prompt[ancestor]!;
                var a = (JsonObject)node["inputs"]!;
                switch (node["class_type"]!.ToString())
                {
                    case "LoraLoader" when StrengthOf(a["strength_model"]) != 0 || StrengthOf(a["strength_clip"]) != 0:
                        key.Append(CultureInfo.InvariantCulture, $"lora={a["lora_name"]}:{StrengthOf(a["strength_model"]):R}:{StrengthOf(a["strength_clip"]):R}\n");
                        break;
                    case "LoraLoaderModelOnly" when StrengthOf(a["strength_model"]) != 0:
                        key.Append(CultureInfo.InvariantCulture, $"lora={a["lora_name"]}:{StrengthOf(a["strength_model"]):R}\n");
                        break;
                    case "CheckpointLoaderSimple":
                        key.Append(CultureInfo.InvariantCulture, $"checkpoint={a["ckpt_name"]}\n");
                        break;
                    case "UNETLoader":
                        key.Append(CultureInfo.InvariantCulture, $"unet={a["unet_name"]}\n");
                        break;
                }
            }
        }
        key.Append(CultureInfo.InvariantCulture, $"size={width}x{height}\n");

        var (folder, filename, counter, subfolder) = SavePath(prefix.Replace("%width%", width.ToString(CultureInfo.InvariantCulture), StringComparison.Ordinal)
            .Replace("%height%", height.ToString(CultureInfo.InvariantCulture), StringComparison.Ordinal));
        var images = new JsonArray();
        for (var index = 0; index < batch; index++)
        {
            var file = $"{filename.Replace("%batch_num%", index.ToString(CultureInfo.InvariantCulture), StringComparison.Ordinal)}_{counter:D5}_.png";
            File.WriteAllBytes(Path.Combine(folder, file), RenderPng(key + $"batch={index}", width, height));
            images.Add(new JsonObject { ["filename"] = file, ["subfolder"] = subfolder, ["type"] = "output" });
            counter++;
        }
        return new JsonObject { ["images"] = images };
    }

    /// <summary>Follows <paramref name="link"/> up the graph to the first node of one of <paramref name="classes"/>.</summary>
    private static string? Upstream(JsonObject prompt, JsonNode? link, params string[] classes)
    {
        var seen = new HashSet<string>(StringComparer.Ordinal);
        var queue = new Queue<JsonNode?>([link]);
        while (queue.TryDequeue(out var current))
        {
            if (current is not JsonArray { Count: 2 } l || l[0]?.ToString() is not { } id || prompt[id] is not JsonObject node || !seen.Add(id))
            {
                continue;
            }
            if (classes.Contains(node["class_type"]?.ToString()))
            {
                return id;
            }
            foreach (var (_, value) in node["inputs"] as JsonObject ?? [])
            {
                queue.Enqueue(value);
            }
        }
        return null;
    }

    private static HashSet<string> Ancestors(JsonObject prompt, string id)
    {
        var seen = new HashSet<string>(StringComparer.Ordinal);
        var stack = new Stack<string>([id]);
        while (stack.TryPop(out var current))
        {
            foreach (var (_, value) in (JsonObject)((JsonObject)prompt[current]!)["inputs"]!)
            {
                if (value is JsonArray { Count: 2 } l && l[0]?.ToString() is { } source && prompt.ContainsKey(source) && seen.Add(source))
                {
                    stack.Push(source);
                }
            }
        }
        return seen;
    }

    /// <summary><c>get_save_image_path</c>: the prefix may name a subfolder, never one outside the output folder; the counter continues after existing files.</summary>
    private (string Folder, string Filename, int Counter, string Subfolder) SavePath(string prefix)
    {
        var full = Path.GetFullPath(Path.Combine(OutputRoot, prefix.TrimEnd('/')));
        var folder = Path.GetDirectoryName(full)!;
        if (folder != OutputRoot && !folder.StartsWith(OutputRoot + Path.DirectorySeparatorChar, StringComparison.Ordinal))
        {
            throw new PythonError("Exception",
                $"**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: {folder}\n         output_dir: {OutputRoot}\n");
        }
        var filename = Path.GetFileName(full);
        var subfolder = Path.GetRelativePath(OutputRoot, folder);
        Directory.CreateDirectory(folder);
        var counter = 1 + Directory.EnumerateFiles(folder).Select(Path.GetFileName).Select(f =>
        {
            if (f!.Length <= filename.Length || !f.StartsWith(filename, StringComparison.Ordinal) || f[filename.Length] != '_')
            {
                return 0;
            }
            return int.TryParse(f[(filename.Length + 1)..].Split('_')[0], NumberStyles.None, CultureInfo.InvariantCulture, out var n) ? n : 0;
        }).DefaultIfEmpty(0).Max();
        return (folder, filename, counter, subfolder == "." ? "" : subfolder);
    }

    /// <summary>A cheap picture fully determined by <paramref name="key"/>: a banded vertical gradient between two colours with a stripe.</summary>
    internal static byte[] RenderPng(string key, int width, int height)
    {
        var h = SHA256.HashData(Encoding.UTF8.GetBytes(key));
        var stripeStart = h[9] * width / 256;
        var stripeEnd = stripeStart + Math.Max(1, width / 8);
        var row = new byte[1 + width * 3];
        var raw = new MemoryStream(height * row.Length);
        var band = -1;
        for (var y = 0; y < height; y++)
        {
            var b = y * 16 / height;
            if (b != band)
            {
                band = b;
                for (var x = 0; x < width; x++)
                {
                    var stripe = x >= stripeStart && x < stripeEnd;
                    for (var c = 0; c < 3; c++)
                    {
                        row[1 + x * 3 + c] = stripe ? h[6 + c] : (byte)(h[c] + (h[3 + c] - h[c]) * band / 15);
                    }
                }
            }
            raw.Write(row); // filter type 0 (None) leads every scanline
        }
        return EncodePng(width, height, raw.ToArray());
    }

    /// <summary>An 8-bit RGB PNG: signature, IHDR, one zlib IDAT of the filtered scanlines, IEND.</summary>
    internal static byte[] EncodePng(int width, int height, byte[] scanlines)
    {
        var png = new MemoryStream();
        png.Write([0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A]);
        var header = new byte[13];
        BinaryPrimitives.WriteInt32BigEndian(header, width);
        BinaryPrimitives.WriteInt32BigEndian(header.AsSpan(4), height);
        header[8] = 8; // bit depth
        header[9] = 2; // colour type RGB
        Chunk(png, "IHDR", header);
        var compressed = new MemoryStream();
        using (var z = new ZLibStream(compressed, CompressionLevel.Fastest, leaveOpen: true))
        {
            z.Write(scanlines);
        }
        Chunk(png, "IDAT", compressed.ToArray());
        Chunk(png, "IEND", []);
        return png.ToArray();
    }

    private static void Chunk(Stream png, string type, byte[] data)
    {
        Span<byte> word = stackalloc byte[4];
        BinaryPrimitives.WriteInt32BigEndian(word, data.Length);
        png.Write(word);
        var typed = new byte[4 + data.Length];
        Encoding.ASCII.GetBytes(type, typed);
        data.CopyTo(typed, 4);
        png.Write(typed);
        BinaryPrimitives.WriteUInt32BigEndian(word, Crc32(typed));
        png.Write(word);
    }

    private static readonly uint[] CrcTable = Enumerable.Range(0, 256).Select(n =>
    {
        var c = (uint)n;
        for (var k = 0; k < 8; k++)
        {
            c = (c & 1) != 0 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        }
        return c;
    }).ToArray();

    /// <summary>The CRC-32 PNG chunks carry (ISO 3309, over chunk type and data).</summary>
    internal static uint Crc32(ReadOnlySpan<byte> data)
    {
        var c = 0xFFFFFFFFu;
        foreach (var b in data)
        {
            c = CrcTable[(c ^ b) & 0xFF] ^ (c >> 8);
        }
        return c ^ 0xFFFFFFFFu;
    }
}
