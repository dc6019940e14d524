using LoraDeploy.Lora.Conversion;

namespace LoraDeploy.Lora.Tests.Conversion;

/// <summary>The module-name table: every convention read into one path and written back.</summary>
public sealed class ConvertNameTableTests
{
    [Theory]
    // SDXL's LDM (sd-scripts) names and their diffusers blocks: 3 levels, no attention at the first, the upsampler after the attention.
    [InlineData("lora_unet_input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1")]
    [InlineData("lora_unet_input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv")]
    [InlineData("lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k", "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k")]
    [InlineData("lora_unet_input_blocks_7_0_skip_connection", "down_blocks.2.resnets.0.conv_shortcut")]
    [InlineData("lora_unet_middle_block_0_emb_layers_1", "mid_block.resnets.0.time_emb_proj")]
    [InlineData("lora_unet_middle_block_1_proj_out", "mid_block.attentions.0.proj_out")]
    [InlineData("lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_0_proj", "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj")]
    [InlineData("lora_unet_output_blocks_5_2_conv", "up_blocks.1.upsamplers.0.conv")]
    [InlineData("lora_unet_output_blocks_8_0_out_layers_3", "up_blocks.2.resnets.2.conv2")]
    [InlineData("lora_unet_time_embed_2", "time_embedding.linear_2")]
    [InlineData("lora_unet_input_blocks_0_0", "conv_in")]
    [InlineData("lora_unet_out_2", "conv_out")]
    public void Sdxl_ldm_names_read_as_diffusers_blocks_and_write_back_the_same(string kohya, string diffusers)
    {
        var path = AdapterModuleNames.Parse(kohya, out var prefix, out _);

        Assert.Equal(new ModulePath(ModelPart.Unet, diffusers), path);
        Assert.Equal("lora_unet_", prefix);
        Assert.Equal(kohya, AdapterModuleNames.Render(path!, AdapterConvention.Kohya, AdapterArchitecture.SDXL, single: true));
        Assert.Equal("unet." + diffusers, AdapterModuleNames.Render(path!, AdapterConvention.Diffusers, AdapterArchitecture.SDXL, single: true));
        // SD1.5 kohya files use the diffusers block names, underscored.
        Assert.Equal("lora_unet_" + diffusers.Replace('.', '_'), AdapterModuleNames.Render(path!, AdapterConvention.Kohya, AdapterArchitecture.SD15, single: true));
    }

    [Theory]
    [InlineData("lora_te1_text_model_encoder_layers_11_self_attn_out_proj", "ClipL", "text_model.encoder.layers.11.self_attn.out_proj")]
    [InlineData("text_encoder_2.text_model.encoder.layers.3.mlp.fc2", "ClipG", "text_model.encoder.layers.3.mlp.fc2")]
    [InlineData("lora_te2_encoder_block_0_layer_1_DenseReluDense_wi_0", "T5", "encoder.block.0.layer.1.DenseReluDense.wi_0")]
    [InlineData("lora_te3_encoder_block_23_layer_0_SelfAttention_o", "T5", "encoder.block.23.layer.0.SelfAttention.o")]
    [InlineData("lora_transformer_single_transformer_blocks_0_attn_to_k", "Flux", "single_transformer_blocks.0.attn.to_k")]
    [InlineData("transformer.time_text_embed.guidance_embedder.linear_1", "Flux", "time_text_embed.guidance_embedder.linear_1")]
    [InlineData("base_model.model.transformer_blocks.4.ff_context.net.0.proj", "Flux", "transformer_blocks.4.ff_context.net.0.proj")]
    [InlineData("lora_unet_final_layer_adaLN_modulation_1", "Flux", "final_layer.adaLN_modulation.1")]
    [InlineData("double_blocks.2.processor.qkv_lora2", "Flux", "double_blocks.2.txt_attn.qkv")]
    [InlineData("diffusion_model.input_blocks.4.1.proj_in", "Unet", "down_blocks.1.attentions.0.proj_in")]
    public void Every_convention_reads_into_its_model_path(string module, string part, string path)
    {
        var parsed = AdapterModuleNames.Parse(module, out _, out _);

        Assert.NotNull(parsed);
        Assert.Equal((part, path), (parsed.Part.ToString(), parsed.Path));
    }

    [Theory]
    [InlineData("lora_unet_down_blocks_0_attentions_0_norm")]
    [InlineData("lora_unet_output_blocks_1_1_conv")]
    [InlineData("lora_te1_text_model_embeddings_token_embedding")]
    [InlineData("transformer.transformer_blocks.0.attn.norm_q")]
    [InlineData("lora_unet_blocks_0_attn_wq")]
    public void Names_no_model_has_are_not_guessed(string module) => Assert.Null(AdapterModuleNames.Parse(module, out _, out _));

    [Fact]
    public void Flux_diffusers_and_bfl_names_pair_up_both_ways()
    {
        foreach (var bfl in new[] { "double_blocks.3.img_attn.qkv", "double_blocks.3.txt_mod.lin", "single_blocks.7.linear1", "single_blocks.7.linear2", "img_in", "guidance_in.out_layer" })
        {
            var parts = FluxModuleNames.DiffusersOf(bfl, out var relation)!;
            for (var i = 0; i < parts.Count; i++)
            {
                Assert.Equal(bfl, FluxModuleNames.BflOf(parts[i], out var back, out var part));
                Assert.Equal((relation, parts.Count == 1 ? 0 : i), (back, part));
            }
        }
        Assert.Equal(["single_transformer_blocks.7.attn.to_q", "single_transformer_blocks.7.attn.to_k", "single_transformer_blocks.7.attn.to_v", "single_transformer_blocks.7.proj_mlp"],
            FluxModuleNames.DiffusersOf("single_blocks.7.linear1", out _));
    }
}
