using System.Net;
using System.Security.Cryptography;
using LoraDeploy.Lora.Gguf;
using LoraDeploy.Lora.Merge;
using LoraDeploy.Lora.Tests.Support;
using LoraDeploy.Tests.Pipeline;
using LoraDeploy.Tests.Serving;
using LoraDeploy.Tests.Simulator;
using static LoraDeploy.Tests.Serving.PeftExactnessTests;

namespace LoraDeploy.Tests.Exports;

/// <summary>
/// Exports of LLM LoRAs: a PEFT adapter imported through <c>POST /lora-model</c> from the Hugging Face simulator onto a
/// llamacpp pool (stored as the llama.cpp LoRA GGUF made at import) is merged into the pool's base GGUF on the real
/// host; the download is what <see cref="GgufMerger"/> writes from the stored blob, and llama.cpp gives it the logits of
/// the base with that blob applied at run time.
/// </summary>
public sealed class ExportGgufTests : IAsyncLifetime
{
    private const string Pool = LoraModelImportTests.Pool;
    private readonly string _dir = Directory.CreateTempSubdirectory("export-gguf-").FullName;
    private HuggingFaceSimulator _hub = null!;
    private LoraDeployServer _server = null!;
    private TinyLlama _model = null!;
    private string _basePath = null!;

    public async ValueTask InitializeAsync()
    {
        _hub = await HuggingFaceSimulator.StartAsync();
        _model = new TinyLlama().Generate();
        _basePath = _model.WriteGguf(Path.Combine(_dir, "tiny.gguf"));
        var settings = LoraModelImportTests.LlmPoolSettings(_hub, _basePath);
        settings["Exports:PollInterval"] = "00:00:00.100";
        _server = await LoraDeployServer.StartAsync(TestDatabase.Sqlite, settings);
    }

    public async ValueTask DisposeAsync()
    {
        await _server.DisposeAsync();
        await _hub.DisposeAsync();
        Directory.Delete(_dir, recursive: true);
    }

    /// <summary>A new user owning LLM LoRA <paramref name="name"/>, imported from the Hub (status deploying).</summary>
    private async Task<TestUser> UserWithLlmLoraAsync(string name, PeftAdapterFixture fixture)
    {
        var user = await _server.CreateUserAsync("llm-exporter");
        _hub.AddAdapter($"hub-owner/{name}", fixture.Generate(_model).Safetensors().ToBytes(), config: fixture.ConfigJson());
        var created = await (await user.Client.PostJsonAsync("/lora-model",
            new { hf_model_name = $"hub-owner/{name}", lora_model_name = name, base_model_name = Pool })).ExpectAsync(HttpStatusCode.OK);
        var deployId = created.GetProperty("deploy_id").GetString()!;
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (true)
        {
            var deploy = await (await user.Client.GetAsync($"/deploy/{deployId}")).ExpectAsync(HttpStatusCode.OK);
            if (deploy.GetProperty("status").GetString() is not ("initializing" or "downloading"))
            {
                deploy.AssertDeploying();
                return user;
            }
            Assert.True(DateTime.UtcNow < deadline, $"import still running: {deploy}");
            await Task.Delay(50);
        }
    }

    [Fact]
    public async Task An_llm_lora_exports_as_a_merged_gguf_that_llama_cpp_runs_like_the_base_with_the_adapter()
    {
        var user = await UserWithLlmLoraAsync("chat", new PeftAdapterFixture { Rank = 4, Alpha = 8, UseRslora = true, Targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "lm_head"] });

        var queued = await (await user.Client.PostJsonAsync("/v1/lora/chat/export", new { strength = 0.6 })).ExpectAsync(HttpStatusCode.Accepted);
        Assert.Equal("gguf", queued.GetProperty("format").GetString());
        var (export, _) = await ExportTestFiles.WaitAsync(user.Client, "chat", queued.GetProperty("export_id").GetString()!);
        Assert.True(export.GetProperty("status").GetString() == "done", export.ToString());
        Assert.True(export.GetProperty("tensors_total").GetInt32() == GgufReader.ReadFile(_basePath).Tensors.Count, export.ToString());

        var response = await user.Client.GetAsync(export.GetProperty("download_url").GetString());
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        Assert.Equal("application/octet-stream", response.Content.Headers.ContentType?.MediaType);
        Assert.EndsWith(".gguf", response.Content.Headers.ContentDisposition?.FileName?.Trim('"'));
        var downloaded = await response.Content.ReadAsByteArrayAsync();
        Assert.Equal(export.GetProperty("sha256").GetString(), Convert.ToHexStringLower(SHA256.HashData(downloaded)));
        var downloadedPath = Path.Combine(_dir, "downloaded.gguf");
        await File.WriteAllBytesAsync(downloadedPath, downloaded);

        // The stored adapter is the llama.cpp LoRA GGUF made at import; the same merge run directly on it, under the
        // name the runner gives it, writes the same bytes.
        var sha = export.GetProperty("adapter_sha256").GetString()!;
        var blob = Directory.EnumerateFiles(Path.Combine(_server.DataDir, "blobs"), sha, SearchOption.AllDirectories).Single();
        Assert.True(GgufMerger.IsGguf(blob));
        var adapter = Path.Combine(Directory.CreateDirectory(Path.Combine(_dir, "direct")).FullName, "adapter.gguf");
        File.Copy(blob, adapter);
        var direct = GgufMerger.Merge(_basePath, [new MergeAdapter(adapter, 0.6)], Path.Combine(_dir, "direct.gguf"));
        Assert.True((await File.ReadAllBytesAsync(direct.OutputPath)).AsSpan().SequenceEqual(downloaded), "the download differs from a direct merge of the stored adapter");

        var expected = Logits(_basePath, [(adapter, 0.6f)]);
        Assert.True(MaxAbsDiff(expected, Logits(_basePath, [])) > 0.1f, "the adapter should move the logits well beyond the tolerance");
        var diff = MaxAbsDiff(expected, Logits(downloadedPath, []));
        Assert.True(diff <= 1e-3f, $"downloaded merged GGUF vs the stored adapter at run time: max abs logit diff {diff}");
    }

    [Fact]
    public async Task A_dtype_for_a_gguf_export_is_a_422_naming_the_field()
    {
        var user = await UserWithLlmLoraAsync("typed", new PeftAdapterFixture { Targets = ["v_proj"] });

        await (await user.Client.PostJsonAsync("/v1/lora/typed/export", new { dtype = "f16" })).ExpectValidationErrorAsync("body", "dtype");

        Assert.Empty((await (await user.Client.GetAsync("/v1/lora/typed/exports")).ExpectAsync(HttpStatusCode.OK)).EnumerateArray());
    }
}
