using LoraDeploy.Lora.Conversion;
using LoraDeploy.Lora.Tests.Merge;
using LoraDeploy.Lora.Merge;
using static LoraDeploy.Lora.Tests.Merge.MergeFixtures;

namespace LoraDeploy.Lora.Tests.Conversion;

/// <summary>
/// Small synthetic bases in single-file names (SD1.5 and SDXL LDM checkpoints, FLUX.1 in BFL names) and adapters for
/// them, F16 with values F16 holds exactly; and the check that converting changes nothing a merge can see.
/// </summary>
internal static class ConvertFixtures
{
    public const string Untouched = "first_stage_model.decoder.conv_in.weight";

    /// <summary>SD1.5 single-file tensors: (name, shape).</summary>
    public static readonly (string Name, long[] Shape)[] Sd15Base =
    [
        ("model.diffusion_model.input_blocks.1.1.proj_in.weight", [8, 8, 1, 1]),
        ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", [8, 12]),
        ("model.diffusion_model.input_blocks.1.0.in_layers.2.weight", [8, 8, 3, 3]),
        ("model.diffusion_model.input_blocks.1.0.in_layers.2.bias", [8]),
        ("model.diffusion_model.output_blocks.2.1.conv.weight", [8, 8, 3, 3]),
        ("model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2.weight", [8, 16]),
        ("model.diffusion_model.time_embed.0.weight", [16, 8]),
        ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", [6, 6]),
        (Untouched, [4, 3, 3, 3]),
    ];

    /// <summary>kohya SD1.5 (diffusers block names, as sd-scripts writes them): LoRA, LoCon 1×1 and 3×3, DoRA, mixed ranks and alphas.</summary>
    public static List<TestTensor> Sd15Kohya(Random random, bool dora = true) =>
    [
        .. KohyaModule(random, "lora_unet_down_blocks_0_attentions_0_proj_in", 2, [8, 1, 1], 8, alpha: 1),
        .. KohyaModule(random, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 2, [12], 8, alpha: 1),
        .. KohyaModule(random, "lora_unet_down_blocks_0_resnets_0_conv1", 2, [8, 3, 3], 8, alpha: 1),
        .. KohyaModule(random, "lora_unet_up_blocks_0_upsamplers_0_conv", 4, [8, 3, 3], 8, alpha: 4),
        .. KohyaModule(random, "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2", 2, [16], 8, alpha: 1),
        .. KohyaModule(random, "lora_unet_time_embedding_linear_1", 2, [8], 16, alpha: null),
        .. KohyaModule(random, "lora_te_text_model_encoder_layers_0_self_attn_q_proj", 2, [6], 6, alpha: 2),
        .. dora ? [Representable(Random(random, "lora_te_text_model_encoder_layers_0_self_attn_q_proj.dora_scale", [6, 1], 2), "F16")] : Array.Empty<TestTensor>(),
    ];

    public static readonly (string Name, long[] Shape)[] SdxlBase =
    [
        ("model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_out.0.weight", [8, 8]),
        ("model.diffusion_model.output_blocks.2.2.conv.weight", [8, 8, 3, 3]),
        ("model.diffusion_model.middle_block.2.emb_layers.1.weight", [8, 16]),
        ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight", [12, 6]),
        ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", [18, 6]),
        ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias", [18]),
        ("conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight", [12, 6]),
        (Untouched, [4, 3, 3, 3]),
    ];

    /// <summary>kohya SDXL (LDM block names, as current sd-scripts writes them) with both text encoders.</summary>
    public static List<TestTensor> SdxlKohya(Random random) =>
    [
        .. KohyaModule(random, "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_out_0", 2, [8], 8, alpha: 1),
        .. KohyaModule(random, "lora_unet_output_blocks_2_2_conv", 2, [8, 3, 3], 8, alpha: 2),
        .. KohyaModule(random, "lora_unet_middle_block_2_emb_layers_1", 2, [16], 8, alpha: 1),
        .. KohyaModule(random, "lora_te1_text_model_encoder_layers_0_mlp_fc1", 2, [6], 12, alpha: 1),
        .. KohyaModule(random, "lora_te2_text_model_encoder_layers_0_self_attn_k_proj", 2, [6], 6, alpha: 1),
        .. KohyaModule(random, "lora_te2_text_model_encoder_layers_0_mlp_fc1", 3, [6], 12, alpha: 1.5),
    ];

    private const int Hidden = 4;

    /// <summary>FLUX.1 in BFL names, hidden width 4 (linear1 7h rows, linear2 5h columns, as in the real model).</summary>
    public static readonly (string Name, long[] Shape)[] FluxBase =
    [
        ("img_in.weight", [Hidden, 8]),
        ("double_blocks.0.img_attn.qkv.weight", [3 * Hidden, Hidden]),
        ("double_blocks.0.img_attn.qkv.bias", [3 * Hidden]),
        ("double_blocks.0.txt_attn.qkv.weight", [3 * Hidden, Hidden]),
        ("double_blocks.0.img_attn.proj.weight", [Hidden, Hidden]),
        ("double_blocks.0.img_mlp.0.weight", [4 * Hidden, Hidden]),
        ("double_blocks.0.txt_mod.lin.weight", [6 * Hidden, Hidden]),
        ("single_blocks.0.linear1.weight", [7 * Hidden, Hidden]),
        ("single_blocks.0.linear1.bias", [7 * Hidden]),
        ("single_blocks.0.linear2.weight", [Hidden, 5 * Hidden]),
        ("single_blocks.0.modulation.lin.weight", [3 * Hidden, Hidden]),
        ("final_layer.linear.weight", [8, Hidden]),
        ("vector_in.in_layer.weight", [Hidden, 6]),
        ("text_model.encoder.layers.0.mlp.fc1.weight", [12, 6]),
    ];

    /// <summary>kohya FLUX.1 (BFL names, fused q/k/v), with a lora_up bias on linear1 and DoRA on img_attn.proj.</summary>
    public static List<TestTensor> FluxKohya(Random random, bool dora = true) =>
    [
        .. KohyaModule(random, "lora_unet_img_in", 2, [8], Hidden, alpha: 1),
        .. KohyaModule(random, "lora_unet_double_blocks_0_img_attn_qkv", 2, [Hidden], 3 * Hidden, alpha: 1),
        .. KohyaModule(random, "lora_unet_double_blocks_0_txt_attn_qkv", 3, [Hidden], 3 * Hidden, alpha: 3),
        .. KohyaModule(random, "lora_unet_double_blocks_0_img_attn_proj", 2, [Hidden], Hidden, alpha: 2),
        .. dora ? [Representable(Random(random, "lora_unet_double_blocks_0_img_attn_proj.dora_scale", [Hidden, 1], 2), "F16")] : Array.Empty<TestTensor>(),
        .. KohyaModule(random, "lora_unet_double_blocks_0_img_mlp_0", 2, [Hidden], 4 * Hidden, alpha: 1),
        .. KohyaModule(random, "lora_unet_double_blocks_0_txt_mod_lin", 2, [Hidden], 6 * Hidden, alpha: 1),
        .. KohyaModule(random, "lora_unet_single_blocks_0_linear1", 2, [Hidden], 7 * Hidden, alpha: 1),
        Representable(Random(random, "lora_unet_single_blocks_0_linear1.lora_up.bias", [7 * Hidden]), "F16"),
        .. KohyaModule(random, "lora_unet_single_blocks_0_linear2", 2, [5 * Hidden], Hidden, alpha: 1),
        .. KohyaModule(random, "lora_unet_single_blocks_0_modulation_lin", 2, [Hidden], 3 * Hidden, alpha: 1),
        .. KohyaModule(random, "lora_unet_final_layer_linear", 2, [Hidden], 8, alpha: 1),
        .. KohyaModule(random, "lora_te1_text_model_encoder_layers_0_mlp_fc1", 2, [6], 12, alpha: 1),
    ];

    /// <summary>diffusers FLUX.1 (split q/k/v, no alpha): parts of different ranks, a missing add_k_proj, single-block q/k/v + proj_mlp.</summary>
    public static List<TestTensor> FluxDiffusers(Random random) =>
    [
        .. PeftModule(random, "transformer.x_embedder", 2, 8, Hidden),
        .. PeftModule(random, "transformer.transformer_blocks.0.attn.to_q", 2, Hidden, Hidden),
        .. PeftModule(random, "transformer.transformer_blocks.0.attn.to_k", 1, Hidden, Hidden),
        .. PeftModule(random, "transformer.transformer_blocks.0.attn.to_v", 2, Hidden, Hidden),
        .. PeftModule(random, "transformer.transformer_blocks.0.attn.add_q_proj", 2, Hidden, Hidden),
        .. PeftModule(random, "transformer.transformer_blocks.0.attn.add_v_proj", 2, Hidden, Hidden),
        .. PeftModule(random, "transformer.transformer_blocks.0.attn.to_out.0", 2, Hidden, Hidden),
        .. PeftModule(random, "transformer.single_transformer_blocks.0.attn.to_q", 2, Hidden, Hidden),
        .. PeftModule(random, "transformer.single_transformer_blocks.0.attn.to_k", 2, Hidden, Hidden),
        .. PeftModule(random, "transformer.single_transformer_blocks.0.attn.to_v", 2, Hidden, Hidden),
        .. PeftModule(random, "transformer.single_transformer_blocks.0.proj_mlp", 2, Hidden, 4 * Hidden),
        .. PeftModule(random, "transformer.single_transformer_blocks.0.proj_out", 2, 5 * Hidden, Hidden),
        .. PeftModule(random, "transformer.time_text_embed.text_embedder.linear_1", 2, 6, Hidden),
    ];

    public static IEnumerable<TestTensor> KohyaModule(Random random, string module, int rank, long[] input, long outDim, double? alpha)
    {
        var kernel = input.Length > 1;
        yield return Representable(Random(random, module + ".lora_down.weight", [rank, .. input]), "F16");
        yield return Representable(Random(random, module + ".lora_up.weight", kernel ? [outDim, rank, 1, 1] : [outDim, rank]), "F16");
        if (alpha is { } a)
        {
            yield return Scalar(module + ".alpha", a);
        }
    }

    public static IEnumerable<TestTensor> PeftModule(Random random, string module, int rank, long inDim, long outDim)
    {
        yield return Representable(Random(random, module + ".lora_A.weight", [rank, inDim]), "F16");
        yield return Representable(Random(random, module + ".lora_B.weight", [outDim, rank]), "F16");
    }

    public static string WriteBase(string path, Random random, (string Name, long[] Shape)[] layout) =>
        Write(path, layout.Select(t => Random(random, t.Name, t.Shape)), "F32");

    /// <summary>Converts into its own folder (PEFT writes adapter_config.json beside, which merge then reads).</summary>
    public static (string Path, ConvertResult Result) Convert(string dir, string input, AdapterConvention to, string name = "adapter", AdapterArchitecture? architecture = null)
    {
        var folder = Path.Combine(dir, $"{name}-{to}".ToLowerInvariant());
        Directory.CreateDirectory(folder);
        var output = Path.Combine(folder, "adapter.safetensors");
        return (output, AdapterConverter.Convert(input, to, output, new ConvertOptions { Architecture = architecture }));
    }

    /// <summary>merge(base, original) and merge(base, converted) agree on every tensor (1e-6 relative), and the adapter changed something.</summary>
    public static void AssertSameMerge(string dir, string basePath, string original, string converted)
    {
        var expectedPath = Path.Combine(dir, "merged-original.safetensors");
        var actualPath = Path.Combine(dir, $"merged-{Guid.NewGuid():n}.safetensors");
        var expectedResult = LoraMerger.Merge(basePath, [new MergeAdapter(original)], expectedPath);
        var actualResult = LoraMerger.Merge(basePath, [new MergeAdapter(converted)], actualPath);
        Assert.True(expectedResult.TensorsMerged > 0);
        Assert.Equal(expectedResult.TensorsMerged, actualResult.TensorsMerged);
        var expected = Read(expectedPath, out _);
        var actual = Read(actualPath, out _);
        Assert.Equal(expected.Keys.Order(), actual.Keys.Order());
        foreach (var (name, tensor) in expected)
        {
            AssertClose(tensor.Values, actual[name].Values, name);
        }
        if (actual.TryGetValue(Untouched, out var untouched))
        {
            Assert.Equal(Read(basePath, out _)[Untouched].Bytes, untouched.Bytes);
        }
    }
}
