using System.Buffers.Binary;
using System.IO.Compression;
using System.Net.WebSockets;
using System.Text;
using System.Text.Json.Nodes;
using System.Threading.Channels;

namespace LoraDeploy.Tests.Simulator;

/// <summary>The API-format graphs of serving.md § B2, small enough to run fast.</summary>
internal static class ComfyGraphs
{
    public static JsonObject Sdxl(string? lora = "style.safetensors", double strength = 1.0, ulong seed = 42, string text = "a red fox",
        string prefix = "loradeploy/req1", int steps = 4, int width = 64, int height = 48, int batch = 1)
    {
        var model = lora is null ? Link("1", 0) : Link("2", 0);
        var clip = lora is null ? Link("1", 1) : Link("2", 1);
        var graph = new JsonObject
        {
            ["1"] = Node("CheckpointLoaderSimple", new() { ["ckpt_name"] = "sd_xl_base_1.0.safetensors" }),
            ["3"] = Node("CLIPTextEncode", new() { ["text"] = text, ["clip"] = clip }),
            ["4"] = Node("CLIPTextEncode", new() { ["text"] = "blurry", ["clip"] = clip.DeepClone() }),
            ["5"] = Node("EmptyLatentImage", new() { ["width"] = width, ["height"] = height, ["batch_size"] = batch }),
            ["6"] = Node("KSampler", new()
            {
                ["model"] = model, ["seed"] = seed, ["steps"] = steps, ["cfg"] = 7.0, ["sampler_name"] = "euler", ["scheduler"] = "normal",
                ["positive"] = Link("3", 0), ["negative"] = Link("4", 0), ["latent_image"] = Link("5", 0), ["denoise"] = 1.0,
            }),
            ["7"] = Node("VAEDecode", new() { ["samples"] = Link("6", 0), ["vae"] = Link("1", 2) }),
            ["8"] = Node("SaveImage", new() { ["images"] = Link("7", 0), ["filename_prefix"] = prefix }),
        };
        if (lora is not null)
        {
            graph["2"] = Node("LoraLoader", new()
            {
                ["model"] = Link("1", 0), ["clip"] = Link("1", 1), ["lora_name"] = lora, ["strength_model"] = strength, ["strength_clip"] = strength,
            });
        }
        return graph;
    }

    public static JsonObject Flux(string lora = "flux/style.safetensors", double strength = 0.8, ulong seed = 7, string text = "a lighthouse",
        string prefix = "loradeploy/flux1", int steps = 3, int width = 64, int height = 32, int batch = 2) => new()
    {
        ["1"] = Node("UNETLoader", new() { ["unet_name"] = "flux1-dev.safetensors", ["weight_dtype"] = "default" }),
        ["2"] = Node("DualCLIPLoader", new() { ["clip_name1"] = "clip_l.safetensors", ["clip_name2"] = "t5xxl_fp16.safetensors", ["type"] = "flux" }),
        ["3"] = Node("VAELoader", new() { ["vae_name"] = "ae.safetensors" }),
        ["4"] = Node("LoraLoaderModelOnly", new() { ["model"] = Link("1", 0), ["lora_name"] = lora, ["strength_model"] = strength }),
        ["5"] = Node("CLIPTextEncode", new() { ["text"] = text, ["clip"] = Link("2", 0) }),
        ["6"] = Node("FluxGuidance", new() { ["conditioning"] = Link("5", 0), ["guidance"] = 3.5 }),
        ["7"] = Node("ConditioningZeroOut", new() { ["conditioning"] = Link("5", 0) }),
        ["8"] = Node("EmptySD3LatentImage", new() { ["width"] = width, ["height"] = height, ["batch_size"] = batch }),
        ["9"] = Node("KSampler", new()
        {
            ["model"] = Link("4", 0), ["seed"] = seed, ["steps"] = steps, ["cfg"] = 1.0, ["sampler_name"] = "euler", ["scheduler"] = "simple",
            ["positive"] = Link("6", 0), ["negative"] = Link("7", 0), ["latent_image"] = Link("8", 0), ["denoise"] = 1.0,
        }),
        ["10"] = Node("VAEDecode", new() { ["samples"] = Link("9", 0), ["vae"] = Link("3", 0) }),
        ["11"] = Node("SaveImage", new() { ["images"] = Link("10", 0), ["filename_prefix"] = prefix }),
    };

    public static JsonArray Link(string node, int slot) => new(node, slot);

    private static JsonObject Node(string classType, JsonObject inputs) => new() { ["class_type"] = classType, ["inputs"] = inputs };

    public static JsonObject Inputs(this JsonObject graph, string node) => (JsonObject)graph[node]!["inputs"]!;
}

/// <summary>A client of the simulator: plain HttpClient calls and one ClientWebSocket whose JSON messages are collected in order.</summary>
internal sealed class ComfyTestClient : IAsyncDisposable
{
    private readonly ClientWebSocket _socket = new();
    private readonly Channel<JsonObject> _messages = Channel.CreateUnbounded<JsonObject>();
    private Task _receiver = Task.CompletedTask;

    private ComfyTestClient(ComfyUiSimulator sim, string clientId)
    {
        ClientId = clientId;
        Http = new HttpClient { BaseAddress = new Uri(sim.BaseUrl + "/"), Timeout = TimeSpan.FromSeconds(30) };
    }

    public string ClientId { get; }
    public HttpClient Http { get; }
    /// <summary>Set when the server closed or cut the socket.</summary>
    public bool SocketEnded { get; private set; }

    public static async Task<ComfyTestClient> ConnectAsync(ComfyUiSimulator sim, string? clientId = null, CancellationToken cancellationToken = default, Uri? url = null)
    {
        var client = new ComfyTestClient(sim, clientId ?? Guid.NewGuid().ToString("N"));
        await client._socket.ConnectAsync(url ?? sim.WebSocketUrl(client.ClientId), cancellationToken);
        client._receiver = Task.Run(client.ReceiveLoopAsync, CancellationToken.None);
        return client;
    }

    private async Task ReceiveLoopAsync()
    {
        var buffer = new byte[64 * 1024];
        try
        {
            while (true)
            {
                using var message = new MemoryStream();
                WebSocketReceiveResult result;
                do
                {
                    result = await _socket.ReceiveAsync(buffer, CancellationToken.None);
                    if (result.MessageType == WebSocketMessageType.Close)
                    {
                        return;
                    }
                    message.Write(buffer, 0, result.Count);
                }
                while (!result.EndOfMessage);
                if (result.MessageType == WebSocketMessageType.Text)
                {
                    _messages.Writer.TryWrite(JsonNode.Parse(message.ToArray())!.AsObject());
                }
            }
        }
        catch (Exception ex) when (ex is WebSocketException or IOException or ObjectDisposedException or OperationCanceledException)
        {
            // Cut by the server, or aborted by DisposeAsync.
        }
        finally
        {
            SocketEnded = true;
            _messages.Writer.TryComplete();
        }
    }

    /// <summary>Messages up to and including the first that <paramref name="last"/> accepts.</summary>
    public async Task<List<JsonObject>> ReadUntilAsync(Func<JsonObject, bool> last, TimeSpan? timeout = null)
    {
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(TestContext.Current.CancellationToken);
        cts.CancelAfter(timeout ?? TimeSpan.FromSeconds(20));
        var seen = new List<JsonObject>();
        while (true)
        {
            var message = await _messages.Reader.ReadAsync(cts.Token);
            seen.Add(message);
            if (last(message))
            {
                return seen;
            }
        }
    }

    /// <summary>Everything up to the <c>executing {node: null}</c> that ends <paramref name="promptId"/>.</summary>
    public Task<List<JsonObject>> ReadJobAsync(string promptId, TimeSpan? timeout = null) =>
        ReadUntilAsync(m => IsJobEnd(m, promptId), timeout);

    public static bool IsJobEnd(JsonObject m, string promptId) =>
        Type(m) == "executing" && m["data"]!["node"] is null && m["data"]!["prompt_id"]?.ToString() == promptId;

    public static string Type(JsonObject m) => m["type"]!.ToString();

    public Task SendTextAsync(string text) =>
        _socket.SendAsync(Encoding.UTF8.GetBytes(text), WebSocketMessageType.Text, endOfMessage: true, TestContext.Current.CancellationToken);

    public async Task<(int Status, JsonObject Body)> PostPromptAsync(JsonObject graph, string? promptId = null, bool withClientId = true, string path = "prompt")
    {
        var body = new JsonObject { ["prompt"] = graph.DeepClone(), ["prompt_id"] = promptId ?? Guid.NewGuid().ToString() };
        if (withClientId)
        {
            body["client_id"] = ClientId;
        }
        return await PostAsync(path, body);
    }

    public async Task<(int Status, JsonObject Body)> PostAsync(string path, JsonNode body)
    {
        using var response = await Http.PostAsync(path, new StringContent(body.ToJsonString(), Encoding.UTF8, "application/json"), TestContext.Current.CancellationToken);
        var text = await response.Content.ReadAsStringAsync(TestContext.Current.CancellationToken);
        var json = response.Content.Headers.ContentType?.MediaType == "application/json";
        return ((int)response.StatusCode, json ? JsonNode.Parse(text)!.AsObject() : new JsonObject { ["text"] = text });
    }

    public async Task<JsonNode> GetJsonAsync(string path)
    {
        var text = await Http.GetStringAsync(path, TestContext.Current.CancellationToken);
        return JsonNode.Parse(text)!;
    }

    public async ValueTask DisposeAsync()
    {
        _socket.Abort();
        await _receiver;
        _socket.Dispose();
        Http.Dispose();
    }
}

/// <summary>Reads back what the simulator's encoder wrote, by the PNG spec: signature, chunks with CRCs, zlib scanlines.</summary>
internal static class PngReader
{
    public static (int Width, int Height, byte[] Pixels) Decode(byte[] png)
    {
        Assert.Equal([0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A], png[..8]);
        var offset = 8;
        int width = 0, height = 0;
        using var idat = new MemoryStream();
        while (offset < png.Length)
        {
            var length = BinaryPrimitives.ReadInt32BigEndian(png.AsSpan(offset));
            var type = Encoding.ASCII.GetString(png, offset + 4, 4);
            var data = png.AsSpan(offset + 8, length);
            var crc = BinaryPrimitives.ReadUInt32BigEndian(png.AsSpan(offset + 8 + length));
            Assert.Equal(ComfyUiSimulator.Crc32(png.AsSpan(offset + 4, 4 + length)), crc);
            if (type == "IHDR")
            {
                width = BinaryPrimitives.ReadInt32BigEndian(data);
                height = BinaryPrimitives.ReadInt32BigEndian(data[4..]);
                Assert.Equal(8, data[8]);
                Assert.Equal(2, data[9]);
            }
            else if (type == "IDAT")
            {
                idat.Write(data);
            }
            offset += 12 + length;
            if (type == "IEND")
            {
                break;
            }
        }
        idat.Position = 0;
        using var z = new ZLibStream(idat, CompressionMode.Decompress);
        using var raw = new MemoryStream();
        z.CopyTo(raw);
        var pixels = raw.ToArray();
        Assert.Equal(height * (1 + width * 3), pixels.Length);
        return (width, height, pixels);
    }
}
