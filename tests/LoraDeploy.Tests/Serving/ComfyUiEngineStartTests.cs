using LoraDeploy.BaseModels;
using LoraDeploy.Serving.ComfyUi;
using LoraDeploy.Tests.Simulator;

namespace LoraDeploy.Tests.Serving;

/// <summary>At start the ComfyUI engine checks what its graphs need against ComfyUI itself and says exactly what is missing.</summary>
public sealed class ComfyUiEngineStartTests : IAsyncLifetime
{
    private readonly string _dir = Directory.CreateTempSubdirectory("comfy-start-").FullName;
    private string _loras = "";
    private readonly List<ComfyUiSimulator> _sims = [];

    public ValueTask InitializeAsync()
    {
        _loras = Directory.CreateDirectory(Path.Combine(_dir, "loras")).FullName;
        return ValueTask.CompletedTask;
    }

    public async ValueTask DisposeAsync()
    {
        foreach (var sim in _sims)
        {
            await sim.DisposeAsync();
        }
        Directory.Delete(_dir, recursive: true);
    }

    private async Task<ComfyUiSimulator> ComfyAsync(ComfyUiSimulatorOptions options)
    {
        var sim = await ComfyUiSimulator.StartAsync(options);
        _sims.Add(sim);
        return sim;
    }

    private static BaseModelEntry Flux(ComfyUiSimulator comfy, string folder, string unet = "flux1-dev.safetensors", string? sampler = null) =>
        new("black-forest-labs/FLUX-1-dev", "flux1")
        {
            Engine = Engines.ComfyUi,
            ComfyUi = new ComfyUiSettings(comfy.BaseUrl, folder, null, unet, "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"),
            Defaults = sampler is null ? new Dictionary<string, string>() : new Dictionary<string, string> { ["sampler"] = sampler },
        };

    private static async Task<string> StartFailureAsync(params BaseModelEntry[] pools)
    {
        using var engine = new ComfyUiServingEngine();
        var e = await Assert.ThrowsAsync<InvalidOperationException>(() => engine.StartAsync(pools, TestContext.Current.CancellationToken));
        return e.Message;
    }

    [Fact]
    public async Task A_well_configured_pool_starts_and_learns_the_name_comfyui_gives_its_folder()
    {
        // The folder is a subfolder of ComfyUI's LoRA root: files in it are listed as "loradeploy/<name>".
        var root = Directory.CreateDirectory(Path.Combine(_dir, "root")).FullName;
        var folder = Directory.CreateDirectory(Path.Combine(root, "loradeploy")).FullName;
        var comfy = await ComfyAsync(new ComfyUiSimulatorOptions { LoraFolder = root });
        using var engine = new ComfyUiServingEngine();
        await engine.StartAsync([Flux(comfy, folder)], TestContext.Current.CancellationToken);
        Assert.Null(engine.Problem);
        Assert.Empty(Directory.GetFiles(folder)); // the probe file is gone

        var blob = Path.Combine(_dir, "blob");
        await File.WriteAllBytesAsync(blob, AdapterFiles.Flux1(seed: 1), TestContext.Current.CancellationToken);
        var sha = new string('d', 64);
        var loaded = await engine.LoadAdapterAsync("black-forest-labs/FLUX-1-dev", sha, blob, TestContext.Current.CancellationToken);
        Assert.True(loaded.IsLoaded, loaded.Reason);
        var warmup = Assert.Single(comfy.Prompts).Graph;
        Assert.Contains($"\"loradeploy/{sha}.safetensors\"", warmup.ToJsonString());
    }

    [Fact]
    public async Task Missing_model_files_nodes_and_samplers_are_each_named_with_what_comfyui_has()
    {
        var comfy = await ComfyAsync(new ComfyUiSimulatorOptions { LoraFolder = _loras, RemovedNodeClasses = ["FluxGuidance"] });
        var message = await StartFailureAsync(Flux(comfy, _loras, unet: "flux1-schnell.safetensors", sampler: "euler_magic"));

        Assert.Contains("ComfyUi:Unet 'flux1-schnell.safetensors' is not among ComfyUI's UNETLoader.unet_name choices (flux1-dev.safetensors)", message);
        Assert.Contains("no node 'FluxGuidance'", message);
        Assert.Contains("Defaults:sampler 'euler_magic'", message);
        Assert.Contains("BaseModels:black-forest-labs/FLUX-1-dev", message);
    }

    [Fact]
    public async Task A_lora_folder_comfyui_does_not_read_is_refused_with_the_extra_model_paths_lines()
    {
        var comfy = await ComfyAsync(new ComfyUiSimulatorOptions()); // reads its own models/loras only
        var message = await StartFailureAsync(Flux(comfy, _loras));
        Assert.Contains("does not list files written to ComfyUi:LoraFolder", message);
        Assert.Contains($"loras: {_loras}", message);
        Assert.Empty(Directory.GetFiles(_loras));
    }

    [Fact]
    public async Task A_missing_lora_folder_or_an_unsupported_family_is_refused_before_calling_comfyui()
    {
        var comfy = await ComfyAsync(new ComfyUiSimulatorOptions { LoraFolder = _loras });
        var message = await StartFailureAsync(
            Flux(comfy, Path.Combine(_dir, "nowhere")),
            new BaseModelEntry("a/sd3", "sd3") { Engine = Engines.ComfyUi, ComfyUi = new ComfyUiSettings(comfy.BaseUrl, _loras, "sd3.safetensors", null, null, null, null) });
        Assert.Contains("ComfyUi:LoraFolder", message);
        Assert.Contains("not an existing folder", message);
        Assert.Contains("builds graphs for sd1, sdxl and flux1, not 'sd3'", message);
        Assert.Equal(0, comfy.GetCount("/object_info") + comfy.GetCount("/queue"));
    }
}
