using System.Buffers.Binary;
using System.Net;
using System.Text.Json;
using LoraDeploy.Lora.Tests.Support;
using LoraDeploy.Tests.Pipeline;
using LoraDeploy.Tests.Simulator;

namespace LoraDeploy.Tests.Exports;

/// <summary>
/// A CivitAI simulator and a real server whose registry has three SDXL base models: one with base weights on this host
/// (a synthetic checkpoint written here, real SDXL tensor names and shapes), one without, and one whose weights do not
/// fit the adapter. One server per test class; tests isolate themselves with fresh users.
/// </summary>
public abstract class ExportFixture(TestDatabase database) : IAsyncLifetime
{
    public const string WithWeights = PipelineHarness.Sdxl;
    public const string WithoutWeights = "test/sdxl-without-weights";
    public const string OtherShapes = "test/sdxl-other-shapes";

    private readonly string _dir = Directory.CreateTempSubdirectory("exports-").FullName;
    private LoraDeployServer? _server;
    private Exception? _startFailure;

    public CivitaiSimulator Simulator { get; private set; } = null!;
    public string BasePath => Path.Combine(_dir, "sdxl-base.safetensors");
    public string OtherShapesPath => Path.Combine(_dir, "sdxl-other-shapes.safetensors");
    public byte[] Adapter { get; } = ExportTestFiles.SdxlAdapter(seed: 11);
    public SimVersion Version { get; private set; } = null!;

    public LoraDeployServer Server
    {
        get
        {
            if (database == TestDatabase.Postgres)
            {
                TestBackend.RequirePostgres();
            }
            if (_startFailure is not null)
            {
                throw new InvalidOperationException("The test server failed to start.", _startFailure);
            }
            return _server!;
        }
    }

    public string ExportsFolder => Path.Combine(Server.DataDir, "exports");

    public static Dictionary<string, string?> Settings(CivitaiSimulator simulator, string basePath, string otherShapesPath)
    {
        var settings = PipelineHarness.ServerSettings(simulator);
        settings[$"BaseModels:{WithWeights}:Family"] = "sdxl";
        settings[$"BaseModels:{WithWeights}:Weights"] = basePath;
        settings[$"BaseModels:{WithoutWeights}"] = "sdxl";
        settings[$"BaseModels:{OtherShapes}:Family"] = "sdxl";
        settings[$"BaseModels:{OtherShapes}:Weights"] = otherShapesPath;
        settings["Exports:PollInterval"] = "00:00:00.100";
        settings["Exports:LeaseDuration"] = "00:00:03";
        return settings;
    }

    public async ValueTask InitializeAsync()
    {
        if (database == TestDatabase.Postgres && string.IsNullOrWhiteSpace(Environment.GetEnvironmentVariable(TestBackend.PostgresVariable)))
        {
            return; // each test skips (or fails under CI) when it asks for the server
        }
        try
        {
            ExportTestFiles.WriteSdxlBase(BasePath, seed: 5);
            ExportTestFiles.WriteSdxlBase(OtherShapesPath, seed: 6, toQWidth: 320);
            Simulator = await CivitaiSimulator.StartAsync();
            Version = Simulator.AddLora(Adapter, baseModel: "SDXL 1.0", fileName: "ink-style.safetensors");
            _server = await LoraDeployServer.StartAsync(database, Settings(Simulator, BasePath, OtherShapesPath));
        }
        catch (Exception e)
        {
            _startFailure = e;
        }
    }

    /// <summary>A new user owning LoRA <paramref name="loraName"/> on <paramref name="baseModel"/>, imported (status deploying).</summary>
    public async Task<TestUser> UserWithLoraAsync(string loraName, string baseModel = WithWeights)
    {
        var user = await Server.CreateUserAsync("exporter");
        await ImportAsync(user, loraName, baseModel);
        return user;
    }

    public async Task ImportAsync(TestUser user, string loraName, string baseModel = WithWeights)
    {
        var created = await (await user.Client.PostJsonAsync("/v1/lora/create", PipelineHarness.CreateBody(loraName, PipelineHarness.ModelUrl(Version), baseModel)))
            .ExpectAsync(HttpStatusCode.OK);
        var deployId = created.GetProperty("deploy_id").GetString()!;
        var deadline = DateTime.UtcNow.AddSeconds(60);
        while (true)
        {
            var deploy = await (await user.Client.GetAsync($"/deploy/{deployId}")).ExpectAsync(HttpStatusCode.OK);
            if (deploy.GetProperty("status").GetString() is not ("initializing" or "downloading"))
            {
                deploy.AssertDeploying();
                return;
            }
            Assert.True(DateTime.UtcNow < deadline, $"import still running: {deploy}");
            await Task.Delay(50);
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (_server is not null)
        {
            await _server.DisposeAsync();
        }
        if (Simulator is not null)
        {
            await Simulator.DisposeAsync();
        }
        Directory.Delete(_dir, recursive: true);
    }
}

public sealed class SqliteExportFixture() : ExportFixture(TestDatabase.Sqlite);

public sealed class PostgresExportFixture() : ExportFixture(TestDatabase.Postgres);

/// <summary>Synthetic SDXL files with random values: an adapter on three attention projections and a base it fits.</summary>
public static class ExportTestFiles
{
    public const string ToQ = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q";
    public const string ToK = "lora_unet_input_blocks_8_1_transformer_blocks_2_attn2_to_k";
    public const string ToV = "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_v";

    /// <summary>A kohya SDXL LoRA (rank 4, F16) with random weights.</summary>
    public static byte[] SdxlAdapter(int seed)
    {
        var random = new Random(seed);
        var writer = new SafetensorsWriter()
            .Metadata("ss_network_module", "networks.lora")
            .Metadata("ss_base_model_version", "sdxl_base_v1-0")
            .Metadata("ss_output_name", $"export-test-{seed}");
        foreach (var (module, inDim, outDim) in new[] { (ToQ, 640L, 640L), (ToK, 2048L, 1280L), (ToV, 2048L, 1280L) })
        {
            const int rank = 4;
            writer.Tensor(module + ".lora_down.weight", "F16", [rank, inDim], RandomF16(random, rank * inDim, 0.05));
            writer.Tensor(module + ".lora_up.weight", "F16", [outDim, rank], RandomF16(random, outDim * rank, 0.05));
            writer.Tensor(module + ".alpha", "F16", [], SafetensorsWriter.Half(2));
        }
        return writer.ToBytes();
    }

    /// <summary>
    /// An SDXL checkpoint holding the three tensors the adapter changes (the first <paramref name="toQWidth"/> wide) and
    /// a few it leaves alone, F16 with random values, with metadata of its own.
    /// </summary>
    public static void WriteSdxlBase(string path, int seed, long toQWidth = 640, int fillerTensors = 0)
    {
        var random = new Random(seed);
        var writer = new SafetensorsWriter().Metadata("modelspec.title", "synthetic sdxl base");
        writer.Tensor("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", "F16", [toQWidth, toQWidth], RandomF16(random, toQWidth * toQWidth, 0.5));
        for (var i = 0; i < 12; i++)
        {
            writer.Tensor($"model.diffusion_model.input_blocks.4.1.transformer_blocks.{i}.norm1.weight", "F16", [640], RandomF16(random, 640, 1));
        }
        writer.Tensor("model.diffusion_model.input_blocks.8.1.transformer_blocks.2.attn2.to_k.weight", "F16", [1280, 2048], RandomF16(random, 1280 * 2048, 0.5));
        writer.Tensor("model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_v.weight", "F16", [1280, 2048], RandomF16(random, 1280 * 2048, 0.5));
        writer.Tensor("model.diffusion_model.out.2.bias", "F32", [4], RandomF32(random, 4));
        // Untouched 10 MB tensors left as holes (no disk) that make a merge take a while.
        for (var i = 0; i < fillerTensors; i++)
        {
            writer.Tensor($"model.diffusion_model.output_blocks.{i}.0.filler.weight", "F16", [5 * 1024 * 1024]);
        }
        writer.WriteTo(path);
    }

    private static byte[] RandomF16(Random random, long count, double amplitude)
    {
        var bytes = new byte[count * 2];
        for (var i = 0; i < count; i++)
        {
            BinaryPrimitives.WriteHalfLittleEndian(bytes.AsSpan(i * 2), (Half)((random.NextDouble() * 2 - 1) * amplitude));
        }
        return bytes;
    }

    private static byte[] RandomF32(Random random, long count)
    {
        var bytes = new byte[count * 4];
        for (var i = 0; i < count; i++)
        {
            BinaryPrimitives.WriteSingleLittleEndian(bytes.AsSpan(i * 4), (float)random.NextDouble());
        }
        return bytes;
    }

    /// <summary>The export JSON once it leaves queued/running, checking every progress report seen on the way.</summary>
    public static async Task<(JsonElement Export, List<(long Done, long Total)> Seen)> WaitAsync(HttpClient client, string loraName, string exportId, TimeSpan? timeout = null)
    {
        var seen = new List<(long, long)>();
        var deadline = DateTime.UtcNow + (timeout ?? TimeSpan.FromSeconds(60));
        while (true)
        {
            var export = await (await client.GetAsync($"/v1/lora/{loraName}/export/{exportId}")).ExpectAsync(HttpStatusCode.OK);
            var done = export.GetProperty("bytes_done").GetInt64();
            var total = export.GetProperty("bytes_total").GetInt64();
            Assert.True(done <= total || total == 0, $"progress beyond its total: {export}");
            seen.Add((done, total));
            if (export.GetProperty("status").GetString() is not ("queued" or "running"))
            {
                return (export, seen);
            }
            Assert.True(DateTime.UtcNow < deadline, $"export still {export.GetProperty("status")}: {export}");
            await Task.Delay(20);
        }
    }
}
