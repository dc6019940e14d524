using System.Buffers.Binary;
using System.Globalization;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json.Nodes;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.Logging;

namespace LoraDeploy.Tests.Dashboard;

/// <summary>
/// Just enough of CivitAI (see shared/reference/civitai-api.md §2, §4) for the client and dashboard end-to-end
/// tests: one published FLUX.1 kohya LoRA (model 123, version 456), and a version (999) that does not exist.
/// The download is a 307 to a storage URL that refuses Authorization and streams slowly enough to watch.
/// Replace with the shared CivitaiSimulator once it is on main.
/// </summary>
public sealed class MiniCivitai : IAsyncDisposable
{
    public const int ModelId = 123;
    public const int VersionId = 456;
    public const int MissingVersionId = 999;

    private readonly WebApplication _app;

    private MiniCivitai(WebApplication app, byte[] file)
    {
        _app = app;
        File = file;
        Sha256 = Convert.ToHexStringLower(SHA256.HashData(file));
    }

    public Uri BaseUrl { get; private set; } = null!;

    /// <summary>The adapter file served for version 456: a valid safetensors FLUX.1 kohya LoRA of zeros.</summary>
    public byte[] File { get; }

    public string Sha256 { get; }

    /// <summary>The URL a user pastes: CivitAI's own host; the server resolves it through <see cref="BaseUrl"/>.</summary>
    public static string GoodUrl => $"https://civitai.com/models/{ModelId}?modelVersionId={VersionId}";

    public static string MissingUrl => $"https://civitai.com/models/{ModelId}?modelVersionId={MissingVersionId}";

    /// <summary>Delay between 64 KiB chunks of the download, so a watcher sees <c>downloading</c>.</summary>
    public TimeSpan ChunkDelay { get; set; } = TimeSpan.FromMilliseconds(8);

    public static async Task<MiniCivitai> StartAsync()
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.WebHost.UseUrls("http://127.0.0.1:0");
        builder.Logging.ClearProviders();
        var app = builder.Build();
        var civitai = new MiniCivitai(app, BuildFluxKohyaLora(rank: 2));
        civitai.Map(app);
        await app.StartAsync();
        civitai.BaseUrl = new Uri(app.Urls.First().TrimEnd('/') + "/");
        return civitai;
    }

    private void Map(WebApplication app)
    {
        app.MapGet("/api/v1/model-versions/{id}", (string id, HttpContext http) =>
            id == VersionId.ToString(CultureInfo.InvariantCulture)
                ? Json(Version(Host(http)))
                : Results.Json(new { error = $"No model version with id {id}" }, statusCode: 404));

        app.MapGet("/api/v1/models/{id}", (string id, HttpContext http) =>
        {
            if (id != ModelId.ToString(CultureInfo.InvariantCulture))
            {
                return Results.Json(new { error = $"No model with id {id}" }, statusCode: 404);
            }
            var version = Version(Host(http));
            version.Remove("model");
            return Json(new JsonObject
            {
                ["id"] = ModelId, ["name"] = "Pixel sprites", ["type"] = "LORA", ["nsfw"] = false, ["poi"] = false,
                ["modelVersions"] = new JsonArray(version),
            });
        });

        app.MapGet("/api/download/models/{id}", (string id, HttpContext http) =>
            id == VersionId.ToString(CultureInfo.InvariantCulture)
                ? Results.Redirect($"{Host(http)}/storage/{VersionId}/pixel-sprites.safetensors?sig=ok", permanent: false, preserveMethod: true)
                : Results.Json(new { error = "File not found" }, statusCode: 404));

        app.MapGet("/storage/{id}/{name}", async (HttpContext http, CancellationToken ct) =>
        {
            if (http.Request.Headers.Authorization.Count > 0)
            {
                http.Response.StatusCode = 400;
                await http.Response.WriteAsync("Authorization is not allowed on storage links", ct);
                return;
            }
            long start = 0;
            var range = http.Request.Headers.Range.ToString();
            if (range.StartsWith("bytes=", StringComparison.Ordinal) && range.EndsWith('-')
                && long.TryParse(range.AsSpan(6, range.Length - 7), NumberStyles.None, CultureInfo.InvariantCulture, out var from)
                && from < File.Length)
            {
                start = from;
                http.Response.StatusCode = 206;
                http.Response.Headers.ContentRange = $"bytes {from}-{File.Length - 1}/{File.Length}";
            }
            http.Response.ContentType = "application/octet-stream";
            http.Response.ContentLength = File.Length - start;
            http.Response.Headers.ContentDisposition = "attachment; filename=\"pixel-sprites.safetensors\"";
            for (var offset = start; offset < File.Length; offset += 64 * 1024)
            {
                var count = (int)Math.Min(64 * 1024, File.Length - offset);
                await http.Response.Body.WriteAsync(File.AsMemory((int)offset, count), ct);
                await http.Response.Body.FlushAsync(ct);
                await Task.Delay(ChunkDelay, ct);
            }
        });
    }

    private static string Host(HttpContext http) => $"{http.Request.Scheme}://{http.Request.Host}";

    private static IResult Json(JsonObject body) => Results.Content(body.ToJsonString(), "application/json; charset=utf-8");

    private JsonObject Version(string host) => new()
    {
        ["id"] = VersionId,
        ["modelId"] = ModelId,
        ["name"] = "v1.0",
        ["description"] = null,
        ["baseModel"] = "Flux.1 D",
        ["baseModelType"] = "Standard",
        ["air"] = $"urn:air:flux1:lora:civitai:{ModelId}@{VersionId}",
        ["status"] = "Published",
        ["availability"] = "Public",
        ["nsfwLevel"] = 1,
        ["createdAt"] = "2026-01-02T03:04:05.000Z",
        ["updatedAt"] = "2026-01-02T03:04:05.000Z",
        ["publishedAt"] = "2026-01-02T03:04:05.000Z",
        ["uploadType"] = "Created",
        ["usageControl"] = "Download",
        ["trainedWords"] = new JsonArray("pxlsprite"),
        ["stats"] = new JsonObject { ["downloadCount"] = 10, ["thumbsUpCount"] = 2 },
        ["model"] = new JsonObject { ["name"] = "Pixel sprites", ["type"] = "LORA", ["nsfw"] = false, ["poi"] = false },
        ["files"] = new JsonArray(new JsonObject
        {
            ["id"] = 789,
            ["name"] = "pixel-sprites.safetensors",
            ["type"] = "Model",
            ["sizeKB"] = File.Length / 1024.0,
            ["primary"] = true,
            ["metadata"] = new JsonObject { ["format"] = "SafeTensor", ["size"] = null, ["fp"] = "fp16" },
            ["pickleScanResult"] = "Success",
            ["virusScanResult"] = "Success",
            ["hashes"] = new JsonObject
            {
                ["SHA256"] = Sha256.ToUpperInvariant(),
                ["AutoV2"] = Sha256[..10].ToUpperInvariant(),
            },
            ["downloadUrl"] = $"{host}/api/download/models/{VersionId}",
        }),
        ["images"] = new JsonArray(),
        ["downloadUrl"] = $"{host}/api/download/models/{VersionId}",
    };

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

    public async ValueTask DisposeAsync() => await _app.DisposeAsync();
}
