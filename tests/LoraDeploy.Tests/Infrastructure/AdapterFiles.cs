using LoraDeploy.Lora.Tests.Support;

namespace LoraDeploy.Tests;

/// <summary>Real-shaped LoRA files for end-to-end tests (real key names and base-model dimensions, small rank).</summary>
public static class AdapterFiles
{
    /// <summary>A kohya FLUX.1 LoRA; <paramref name="seed"/> goes into the metadata, so each seed hashes differently.</summary>
    public static byte[] Flux1(int seed = 1, int rank = 4) =>
        new SafetensorsWriter()
            .Metadata("ss_network_module", "networks.lora_flux")
            .Metadata("ss_base_model_version", "flux1")
            .Metadata("ss_output_name", $"test-{seed}")
            .Lora("lora_unet_double_blocks_0_img_attn_qkv", rank, 3072, 9216, alpha: rank, dtype: "BF16")
            .Lora("lora_unet_double_blocks_0_img_mlp_0", rank, 3072, 12288, alpha: rank, dtype: "BF16")
            .Lora("lora_unet_single_blocks_37_linear1", rank, 3072, 21504, alpha: rank, dtype: "BF16")
            .ToBytes();

    /// <summary>A kohya SDXL LoRA (SAI block names, both text encoders untouched).</summary>
    public static byte[] Sdxl(int seed = 1, int rank = 4) =>
        new SafetensorsWriter()
            .Metadata("ss_network_module", "networks.lora")
            .Metadata("ss_output_name", $"test-{seed}")
            .Metadata("ss_base_model_version", "sdxl_base_v1-0")
            .Lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", rank, 640, 640, alpha: rank)
            .Lora("lora_unet_input_blocks_8_1_transformer_blocks_2_attn2_to_k", rank, 2048, 1280, alpha: rank)
            .Lora("lora_unet_middle_block_1_transformer_blocks_9_attn2_to_v", rank, 2048, 1280, alpha: rank)
            .ToBytes();
}
