using LoraDeploy.BaseModels;
using LoraDeploy.Exports;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Tests.Exports;

/// <summary><c>BaseModels:{name}:Weights</c> and the <c>Exports</c> section are checked at start, naming the setting.</summary>
public sealed class ExportSettingsTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("export-settings-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void Weights_that_exist_as_a_file_are_the_entrys_base()
    {
        var weights = Path.Combine(_dir, "base.safetensors");
        File.WriteAllBytes(weights, [0]);
        var registry = Registry(new() { ["BaseModels:my/sdxl:Family"] = "sdxl", ["BaseModels:my/sdxl:Weights"] = weights });
        Assert.Empty(registry.Errors);
        Assert.Equal(new ExportBase(ExportBase.Safetensors, weights), ExportBase.Of(registry.Find("my/sdxl")));
        Assert.Null(ExportBase.Of(registry.Find("stabilityai/stable-diffusion-xl-base-1.0")));
    }

    [Fact]
    public void A_llamacpp_pool_exports_into_its_gguf_unless_weights_are_given()
    {
        var registry = Registry(new() { ["BaseModels:my/llama:Family"] = "llama", ["BaseModels:my/llama:Engine"] = "llamacpp", ["BaseModels:my/llama:Gguf"] = "/models/llama.gguf" });
        Assert.Equal(new ExportBase(ExportBase.Gguf, "/models/llama.gguf"), ExportBase.Of(registry.Find("my/llama")));
    }

    [Fact]
    public void A_llm_loras_gguf_adapter_onto_safetensors_weights_is_refused_naming_the_setting_to_drop()
    {
        var weights = Path.Combine(_dir, "base.safetensors");
        File.WriteAllBytes(weights, [0]);
        var adapter = Path.Combine(_dir, "adapter.safetensors"); // the runner's copy of a stored LLM LoRA may be named so
        new LoraDeploy.Lora.Gguf.GgufWriter().Add("general.type", "adapter").WriteTo(adapter);
        var output = Path.Combine(_dir, "out.safetensors");

        var e = Assert.Throws<LoraDeploy.Lora.Merge.LoraMergeException>(() =>
            new ExportBase(ExportBase.Safetensors, weights).Merge(new(adapter), output, new(), TestContext.Current.CancellationToken));

        Assert.StartsWith($"the adapter is a llama.cpp LoRA GGUF (an LLM LoRA), which merges only into the pool's GGUF base, not into the safetensors weights {weights}; leave BaseModels:", e.Message);
        Assert.False(File.Exists(output));
    }

    [Fact]
    public async Task Missing_weights_or_a_folder_stop_the_host_at_start_naming_the_key()
    {
        var builder = Microsoft.Extensions.Hosting.Host.CreateApplicationBuilder();
        builder.Configuration.AddInMemoryCollection(new Dictionary<string, string?>
        {
            ["BaseModels:my/sdxl:Family"] = "sdxl",
            ["BaseModels:my/sdxl:Weights"] = Path.Combine(_dir, "nowhere.safetensors"),
            ["BaseModels:my/flux:Family"] = "flux1",
            ["BaseModels:my/flux:Weights"] = _dir,
        });
        builder.Services.AddBaseModels();
        using var host = builder.Build();

        var ex = await Assert.ThrowsAsync<OptionsValidationException>(() => host.StartAsync(TestContext.Current.CancellationToken));

        Assert.Contains("BaseModels:my/sdxl:Weights", ex.Message, StringComparison.Ordinal);
        Assert.Contains("does not exist", ex.Message, StringComparison.Ordinal);
        Assert.Contains("BaseModels:my/flux:Weights", ex.Message, StringComparison.Ordinal);
        Assert.Contains("is a folder", ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Export_defaults_are_a_day_of_retention_and_one_merge_at_a_time()
    {
        var options = Exports([]);
        Assert.Equal(TimeSpan.FromHours(24), options.Retention);
        Assert.Equal(1, options.MaxConcurrentJobs);
        Assert.Null(options.Path);
    }

    [Theory]
    [InlineData("Exports:MaxConcurrentJobs", "0", "MaxConcurrentJobs")]
    [InlineData("Exports:RetentionHours", "0", "RetentionHours")]
    [InlineData("Exports:Path", " ", "Exports:Path")]
    [InlineData("Exports:ProgressInterval", "00:00:00.100", "ProgressInterval")]
    [InlineData("Exports:LeaseDuration", "00:00:01", "Exports:LeaseDuration")]
    public void A_bad_export_setting_fails_naming_it(string key, string value, string expected)
    {
        var ex = Assert.ThrowsAny<OptionsValidationException>(() => Exports(new() { [key] = value }));
        Assert.Contains(expected, ex.Message, StringComparison.Ordinal);
    }

    private static BaseModelRegistry Registry(Dictionary<string, string?> settings) =>
        new(new ConfigurationBuilder().AddInMemoryCollection(settings).Build());

    private static ExportOptions Exports(Dictionary<string, string?> settings)
    {
        var services = new ServiceCollection();
        services.AddLogging();
        services.AddSingleton<IConfiguration>(new ConfigurationBuilder().AddInMemoryCollection(settings).Build());
        services.AddExports();
        using var provider = services.BuildServiceProvider();
        return provider.GetRequiredService<IOptions<ExportOptions>>().Value;
    }
}
