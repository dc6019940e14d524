using System.Text.Json;
using LoraDeploy.Lora.Merge;
using LoraDeploy.Lora.Tests.Support;

namespace LoraDeploy.Lora.Tests.Merge;

/// <summary>
/// Real FLUX.1 adapter layouts (InvokeAI's key lists, Fixtures/realworld-lora-headers) against a synthetic FLUX.1 base
/// layout written here from the model's architecture (not from the adapters): every module must resolve to a tensor of
/// the right shape, none left over. Files are sparse and only planned, not merged (a FLUX base is 12B parameters).
/// </summary>
public sealed class MergeRealWorldLayoutTests : IDisposable
{
    private const int Hidden = 3072;
    private readonly string _dir = TempFiles.Directory();

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void Bfl_named_adapters_map_onto_a_bfl_checkpoint()
    {
        var basePath = BflBase().WriteTo(Path.Combine(_dir, "flux1-dev.safetensors"));
        Assert.Equal(228, Plan(basePath, "flux1__invoke-aitoolkit-bfl"));
    }

    [Fact]
    public void The_synthetic_lokr_sample_whose_factors_fit_no_flux_layer_is_refused_with_every_mismatch()
    {
        // expected.json notes this InvokeAI sample's LoKr factor shapes match no real layer.
        var basePath = BflBase().WriteTo(Path.Combine(_dir, "flux1-dev.safetensors"));

        var e = Assert.Throws<LoraMergeException>(() => Plan(basePath, "flux1__invoke-lokr-bfl-synthetic"));
        Assert.StartsWith("cannot merge: 6 module(s) do not fit the base tensor: ", e.Message);
        Assert.Contains("diffusion_model.double_blocks.0.img_attn.qkv → double_blocks.0.img_attn.qkv.weight: the adapter's LoKr delta is [1024, 27648], the base tensor [9216, 3072]", e.Message);
    }

    [Fact]
    public void Peft_diffusers_names_map_onto_a_bfl_checkpoint_through_the_fused_tensors()
    {
        var basePath = BflBase().WriteTo(Path.Combine(_dir, "flux1-dev.safetensors"));
        Assert.Equal(FusedTargets, Plan(basePath, "flux1__invoke-peft-base-model"));
    }

    [Fact]
    public void Peft_diffusers_names_map_onto_a_diffusers_transformer()
    {
        var basePath = DiffusersBase().WriteTo(Path.Combine(_dir, "diffusion_pytorch_model.safetensors"));
        Assert.Equal(381, Plan(basePath, "flux1__invoke-peft-base-model"));
    }

    // 381 modules onto 191 BFL tensors: per double block img qkv (to_q/k/v), txt qkv (add_q/k/v), img/txt proj, img/txt
    // mlp.0 (6 × 19 = 114); per single block linear1 (q/k/v/proj_mlp) and linear2 (2 × 38 = 76); proj_out → final_layer.
    private const int FusedTargets = 191;

    private int Plan(string basePath, string fixture)
    {
        // Factors stay zero (sparse); alphas get a value, as a zero alpha is refused.
        using var json = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(AppContext.BaseDirectory, "Fixtures", "realworld-lora-headers", "headers", fixture + ".json")));
        var writer = new SafetensorsWriter();
        foreach (var tensor in json.RootElement.GetProperty("tensors").EnumerateObject())
        {
            var dtype = tensor.Value.GetProperty("dtype").GetString()!;
            long[] shape = [.. tensor.Value.GetProperty("shape").EnumerateArray().Select(d => d.GetInt64())];
            writer.Tensor(tensor.Name, dtype, shape, tensor.Name.EndsWith(".alpha", StringComparison.Ordinal) && dtype == "F16" && shape.Length == 0 ? SafetensorsWriter.Half(4) : null);
        }
        var adapter = writer.WriteTo(Path.Combine(_dir, fixture + ".safetensors"));
        return LoraMerger.Check(basePath, [new MergeAdapter(adapter)]);
    }

    /// <summary>FLUX.1 in BFL names (flux1-dev.safetensors): 19 double blocks, 38 single blocks, width 3072.</summary>
    private static SafetensorsWriter BflBase()
    {
        var writer = new SafetensorsWriter();
        void Linear(string name, long outDim, long inDim) => writer.Tensor(name + ".weight", "BF16", [outDim, inDim]).Tensor(name + ".bias", "BF16", [outDim]);
        Linear("img_in", Hidden, 64);
        Linear("txt_in", Hidden, 4096);
        Linear("time_in.in_layer", Hidden, 256);
        Linear("time_in.out_layer", Hidden, Hidden);
        Linear("vector_in.in_layer", Hidden, 768);
        Linear("vector_in.out_layer", Hidden, Hidden);
        for (var i = 0; i < 19; i++)
        {
            foreach (var stream in new[] { "img", "txt" })
            {
                Linear($"double_blocks.{i}.{stream}_attn.qkv", 3 * Hidden, Hidden);
                Linear($"double_blocks.{i}.{stream}_attn.proj", Hidden, Hidden);
                Linear($"double_blocks.{i}.{stream}_mlp.0", 4 * Hidden, Hidden);
                Linear($"double_blocks.{i}.{stream}_mlp.2", Hidden, 4 * Hidden);
                Linear($"double_blocks.{i}.{stream}_mod.lin", 6 * Hidden, Hidden);
                writer.Tensor($"double_blocks.{i}.{stream}_attn.norm.query_norm.scale", "BF16", [128]);
            }
        }
        for (var i = 0; i < 38; i++)
        {
            Linear($"single_blocks.{i}.linear1", 3 * Hidden + 4 * Hidden, Hidden);
            Linear($"single_blocks.{i}.linear2", Hidden, Hidden + 4 * Hidden);
            Linear($"single_blocks.{i}.modulation.lin", 3 * Hidden, Hidden);
        }
        Linear("final_layer.linear", 64, Hidden);
        Linear("final_layer.adaLN_modulation.1", 2 * Hidden, Hidden);
        return writer;
    }

    /// <summary>FLUX.1's transformer in diffusers names (transformer/diffusion_pytorch_model.safetensors).</summary>
    private static SafetensorsWriter DiffusersBase()
    {
        var writer = new SafetensorsWriter();
        void Linear(string name, long outDim, long inDim) => writer.Tensor(name + ".weight", "BF16", [outDim, inDim]).Tensor(name + ".bias", "BF16", [outDim]);
        Linear("x_embedder", Hidden, 64);
        Linear("context_embedder", Hidden, 4096);
        Linear("norm_out.linear", 2 * Hidden, Hidden);
        Linear("proj_out", 64, Hidden);
        for (var i = 0; i < 19; i++)
        {
            var block = $"transformer_blocks.{i}.";
            foreach (var name in new[] { "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out" })
            {
                Linear(block + name, Hidden, Hidden);
            }
            Linear(block + "ff.net.0.proj", 4 * Hidden, Hidden);
            Linear(block + "ff.net.2", Hidden, 4 * Hidden);
            Linear(block + "ff_context.net.0.proj", 4 * Hidden, Hidden);
            Linear(block + "ff_context.net.2", Hidden, 4 * Hidden);
            Linear(block + "norm1.linear", 6 * Hidden, Hidden);
            Linear(block + "norm1_context.linear", 6 * Hidden, Hidden);
        }
        for (var i = 0; i < 38; i++)
        {
            var block = $"single_transformer_blocks.{i}.";
            foreach (var name in new[] { "attn.to_q", "attn.to_k", "attn.to_v" })
            {
                Linear(block + name, Hidden, Hidden);
            }
            Linear(block + "proj_mlp", 4 * Hidden, Hidden);
            Linear(block + "proj_out", Hidden, 5 * Hidden);
            Linear(block + "norm.linear", 3 * Hidden, Hidden);
        }
        return writer;
    }
}
