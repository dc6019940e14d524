using LoraDeploy.BaseModels;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Tests.Serving;

/// <summary>Registry entries with engine settings are pools; bad ones stop the server at start with one sentence each.</summary>
public sealed class PoolSettingsTests
{
    private static BaseModelRegistry Registry(Dictionary<string, string?> settings) =>
        new(new ConfigurationBuilder().AddInMemoryCollection(settings).Build());

    [Fact]
    public void Section_entries_with_an_engine_are_pools_and_the_plain_form_keeps_working()
    {
        var registry = Registry(new()
        {
            ["BaseModels:acme/llm:Family"] = "llama",
            ["BaseModels:acme/llm:Engine"] = "llamacpp",
            ["BaseModels:acme/llm:Gguf"] = "/models/llm.gguf",
            ["BaseModels:acme/llm:MaxAdaptersPerWorker"] = "3",
            ["BaseModels:acme/llm:Defaults:max_tokens"] = "64",
            ["BaseModels:acme/plain"] = "sdxl",
        });
        Assert.Empty(registry.Errors);
        var pool = Assert.Single(registry.Pools);
        Assert.Equal(("acme/llm", "llama", "llamacpp", "/models/llm.gguf", 3, "64"),
            (pool.Name, pool.Family, pool.Engine, pool.Gguf, pool.MaxAdaptersPerWorker, pool.Defaults["max_tokens"]));
        Assert.True(registry.TryGetFamily("acme/plain", out var family) && family == "sdxl");
        Assert.True(registry.TryGetFamily("black-forest-labs/FLUX-1-dev", out _)); // defaults stay
    }

    [Fact]
    public void Each_bad_entry_is_named_with_what_to_set()
    {
        var registry = Registry(new()
        {
            ["BaseModels:a/no-family:Engine"] = "llamacpp",
            ["BaseModels:a/no-gguf:Family"] = "llama",
            ["BaseModels:a/no-gguf:Engine"] = "llamacpp",
            ["BaseModels:a/vllm:Family"] = "llama",
            ["BaseModels:a/vllm:Engine"] = "vllm",
            ["BaseModels:a/flux:Family"] = "flux1",
            ["BaseModels:a/flux:Engine"] = "comfyui",
            ["BaseModels:a/flux:ComfyUi:Url"] = "ftp://x",
            ["BaseModels:a/cap:Family"] = "sdxl",
            ["BaseModels:a/cap:MaxAdaptersPerWorker"] = "0",
        });
        Assert.Contains(registry.Errors, e => e.StartsWith("BaseModels:a/no-family:Family is missing", StringComparison.Ordinal));
        Assert.Contains(registry.Errors, e => e.StartsWith("BaseModels:a/no-gguf:Gguf is missing", StringComparison.Ordinal));
        Assert.Contains(registry.Errors, e => e.StartsWith("BaseModels:a/vllm:Engine 'vllm' is not an engine", StringComparison.Ordinal));
        Assert.Contains(registry.Errors, e => e.StartsWith("BaseModels:a/flux:ComfyUi:Url is missing or not an http(s) URL", StringComparison.Ordinal));
        foreach (var file in new[] { "Unet", "Clip1", "Clip2", "Vae" })
        {
            Assert.Contains(registry.Errors, e => e.StartsWith($"BaseModels:a/flux:ComfyUi:{file} is missing", StringComparison.Ordinal));
        }
        Assert.Contains(registry.Errors, e => e.StartsWith("BaseModels:a/cap:MaxAdaptersPerWorker '0'", StringComparison.Ordinal));
    }

    [Fact]
    public async Task A_server_with_a_bad_pool_does_not_start_and_says_which_setting()
    {
        var dataDir = Directory.CreateTempSubdirectory("bad-pool-").FullName;
        try
        {
            var result = await LoraDeploy.Tests.Dashboard.LoraDeployExe.RunAsync(
                ["serve", "--urls", $"http://127.0.0.1:{ServerProcess.FreePort()}", "--data-dir", dataDir,
                 "--BaseModels:acme/llm:Family=llama", "--BaseModels:acme/llm:Engine=llamacpp"]);
            Assert.NotEqual(0, result.ExitCode);
            Assert.Contains("BaseModels:acme/llm:Gguf is missing", result.StdOut + result.StdErr);
        }
        finally
        {
            Directory.Delete(dataDir, recursive: true);
        }
    }
}
