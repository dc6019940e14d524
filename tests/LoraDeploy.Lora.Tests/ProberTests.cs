using System.Security.Cryptography;
using System.Text.Json;
using LoraDeploy.Lora.Safetensors;
using LoraDeploy.Lora.Tests.Support;

namespace LoraDeploy.Lora.Tests;

/// <summary>Synthetic adapters with real key names and real base-model widths (data sections are zeros except alpha).</summary>
public sealed class ProberTests
{
    private static ProbeReport Probe(SafetensorsWriter writer)
    {
        using var stream = new MemoryStream(writer.ToBytes());
        // Disposed before the report is checked: the report must hold nothing of the header's pooled tables.
        using var header = SafetensorsReader.Read(stream);
        return LoraProber.Probe(header, stream);
    }

    [Fact]
    public void Sd1_kohya_locon_with_text_encoder()
    {
        var w = new SafetensorsWriter()
            .Metadata("ss_network_module", "networks.lora")
            .Metadata("ss_base_model_version", "sd_v1")
            .Metadata("ss_output_name", "mychar_v1")
            .Metadata("ss_tag_frequency", """{"10_mychar": {"mychar": 20, "1girl": 18, "smile": 5}, "5_style": {"smile": 3}}""")
            .Lora("lora_unet_down_blocks_0_attentions_0_proj_in", 8, 320, 320, alpha: 4, kernel: 1)
            .Lora("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 8, 320, 320, alpha: 4)
            .Lora("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 8, 768, 320, alpha: 4)
            .Lora("lora_unet_down_blocks_0_resnets_0_conv1", 8, 320, 320, alpha: 4, kernel: 3)
            .Lora("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2", 8, 1280, 320, alpha: 4)
            .Lora("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 8, 768, 768, alpha: 4)
            .Lora("lora_te_text_model_encoder_layers_11_mlp_fc1", 8, 768, 3072, alpha: 4);

        var report = Probe(w);

        Assert.Equal("sd1", report.Architecture);
        Assert.Equal("SD 1.x", report.ArchitectureDisplay);
        Assert.Equal("locon", report.Network);
        Assert.Equal("kohya", report.Format);
        Assert.Equal(["text_encoder_1", "unet"], report.Targets);
        Assert.Equal(7, report.ModuleCount);
        Assert.Equal((8, 8), (report.RankMin, report.RankMax));
        Assert.Equal(4, report.Alpha);
        Assert.Equal(0.5, report.Scale);
        Assert.Equal(["F16"], report.Dtypes);
        Assert.Contains("mychar", report.TriggerWords);
        Assert.Equal(new TagCount("mychar", 20), report.TopTags[0]);
        Assert.Equal(new TagCount("smile", 8), report.TopTags[2]);
        Assert.Equal("sd_v1", report.BaseModelVersion);
        Assert.Equal("mychar_v1", report.Metadata["ss_output_name"]);
        Assert.True(report.IsAdapter);
        Assert.True(report.Applicable, report.NotApplicableReason);
        Assert.Empty(report.Warnings);
    }

    [Fact]
    public void Sorted_keys_where_a_module_comes_back_after_one_that_extends_its_name_make_one_module()
    {
        // The safetensors library's order puts "M.extra.*" between "M.alpha" and "M.lora_down.weight", so module M
        // comes back after a module whose name is greater than its own.
        const string M = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q";
        var w = new SafetensorsWriter()
            .Metadata("ss_base_model_version", "sdxl_base_v1-0")
            .Tensor(M + ".alpha", "F16", [], SafetensorsWriter.Half(4))
            .Tensor(M + ".extra.alpha", "F16", [], SafetensorsWriter.Half(4))
            .Tensor(M + ".extra.lora_down.weight", "F16", [8, 640])
            .Tensor(M + ".extra.lora_up.weight", "F16", [640, 8])
            .Tensor(M + ".lora_down.weight", "F16", [8, 640])
            .Tensor(M + ".lora_up.weight", "F16", [640, 8]);

        var report = Probe(w);

        Assert.Equal(2, report.ModuleCount);
        Assert.Equal(6, report.TensorCount);
        Assert.Equal(4, report.Alpha);
        Assert.Equal(0.5, report.Scale);
        Assert.DoesNotContain(report.Warnings, w => w.Contains("only one of", StringComparison.Ordinal));
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Modules_with_up_and_down_of_different_ranks_are_named_in_the_warning(bool unsorted)
    {
        // The module name is made from its first tensor's name only when a warning needs it; "é" checks that the
        // name is cut in UTF-16 units, not UTF-8 bytes. Unsorted modules take the prober's indexed path.
        const string Module = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q_é";
        var w = new SafetensorsWriter();
        if (unsorted)
        {
            w.Lora("lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q", 8, 1280, 1280, alpha: 8);
        }
        w.Tensor(Module + ".alpha", "F16", [], SafetensorsWriter.Half(8))
            .Tensor(Module + ".lora_down.weight", "F16", [8, 640])
            .Tensor(Module + ".lora_up.weight", "F16", [640, 4]);

        var report = Probe(w);

        Assert.Contains($"1 modules have lora_up and lora_down of different ranks (e.g. '{Module}').", report.Warnings);
    }

    [Fact]
    public void Sdxl_kohya_with_sai_block_names()
    {
        var w = new SafetensorsWriter()
            .Metadata("ss_base_model_version", "sdxl_base_v1-0")
            .Metadata("modelspec.architecture", "stable-diffusion-xl-v1-base/lora")
            .Metadata("modelspec.title", "Test XL")
            .Metadata("modelspec.thumbnail", "data:image/png;base64,AAAA")
            .Lora("lora_unet_input_blocks_4_1_proj_in", 16, 640, 640, alpha: 8)
            .Lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 16, 2048, 640, alpha: 8)
            .Lora("lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_q", 16, 1280, 1280, alpha: 8)
            .Lora("lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj", 16, 1280, 10240, alpha: 8)
            .Lora("lora_unet_output_blocks_0_1_transformer_blocks_3_attn2_to_v", 16, 2048, 1280, alpha: 8)
            .Lora("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 16, 768, 768, alpha: 8)
            .Lora("lora_te2_text_model_encoder_layers_31_self_attn_q_proj", 16, 1280, 1280, alpha: 8);

        var report = Probe(w);

        Assert.Equal("sdxl", report.Architecture);
        Assert.Equal("lora", report.Network);
        Assert.Equal(["text_encoder_1", "text_encoder_2", "unet"], report.Targets);
        Assert.Equal(0.5, report.Scale);
        Assert.Equal("Test XL", report.Metadata["modelspec.title"]);
        Assert.False(report.Metadata.ContainsKey("modelspec.thumbnail"));
        Assert.True(report.Applicable, report.NotApplicableReason);
    }

    [Fact]
    public void Sdxl_kohya_with_diffusers_block_names_and_no_cross_attention()
    {
        // No attn2 and no text encoder: only the block layout (attention in up_blocks_0, transformer depth > 2) says SDXL.
        var w = new SafetensorsWriter()
            .Lora("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q", 32, 640, 640, alpha: 32)
            .Lora("lora_unet_up_blocks_0_attentions_2_transformer_blocks_9_ff_net_2", 32, 5120, 1280, alpha: 32)
            .Lora("lora_unet_mid_block_attentions_0_transformer_blocks_4_attn1_to_out_0", 32, 1280, 1280, alpha: 32);

        var report = Probe(w);

        Assert.Equal("sdxl", report.Architecture);
        Assert.Equal(1, report.Scale);
        Assert.True(report.Applicable, report.NotApplicableReason);
    }

    [Fact]
    public void Sdxl_loha_with_conv()
    {
        var w = new SafetensorsWriter()
            .Metadata("ss_network_module", "lycoris.kohya")
            .Metadata("ss_network_args", """{"conv_dim": "8", "conv_alpha": "4", "algo": "loha"}""");
        void Loha(string module, int rank, long inDim, long outDim)
        {
            w.Tensor(module + ".alpha", "F16", [], SafetensorsWriter.Half(rank))
                .Tensor(module + ".hada_w1_a", "F16", [outDim, rank])
                .Tensor(module + ".hada_w1_b", "F16", [rank, inDim])
                .Tensor(module + ".hada_w2_a", "F16", [outDim, rank])
                .Tensor(module + ".hada_w2_b", "F16", [rank, inDim]);
        }
        Loha("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", 8, 2048, 640);
        Loha("lora_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_q", 8, 1280, 1280);
        Loha("lora_unet_input_blocks_1_0_in_layers_2", 8, 320 * 3 * 3, 320);
        Loha("lora_te2_text_model_encoder_layers_0_mlp_fc1", 8, 1280, 5120);

        var report = Probe(w);

        Assert.Equal("sdxl", report.Architecture);
        Assert.Equal("loha", report.Network);
        Assert.Equal(1, report.Scale);
        Assert.True(report.Applicable, report.NotApplicableReason);
    }

    [Fact]
    public void Sd1_lokr_full_and_decomposed_factors()
    {
        var w = new SafetensorsWriter()
            // attn2.to_k: out 320 = 16*20, in 768 = 16*48
            .Tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lokr_w1", "F16", [16, 16])
            .Tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lokr_w2", "F16", [20, 48])
            .Tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha", "F16", [], SafetensorsWriter.Half(2))
            .Tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w1", "F16", [16, 16])
            .Tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w2_a", "F16", [20, 4])
            .Tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w2_b", "F16", [4, 20])
            .Tensor("lora_te_text_model_encoder_layers_3_self_attn_q_proj.lokr_w1", "F16", [16, 16])
            .Tensor("lora_te_text_model_encoder_layers_3_self_attn_q_proj.lokr_w2", "F16", [48, 48]);

        var report = Probe(w);

        Assert.Equal("sd1", report.Architecture);
        Assert.Equal("lokr", report.Network);
        Assert.Equal((4, 4), (report.RankMin, report.RankMax));
        Assert.Contains(report.Warnings, x => x.Contains("scale", StringComparison.Ordinal));
        Assert.True(report.Applicable, report.NotApplicableReason);
    }

    [Fact]
    public void Sdxl_dora()
    {
        var w = new SafetensorsWriter()
            .Lora("lora_unet_input_blocks_8_1_transformer_blocks_2_attn2_to_k", 16, 2048, 1280, alpha: 16)
            .Tensor("lora_unet_input_blocks_8_1_transformer_blocks_2_attn2_to_k.dora_scale", "F16", [1280, 1])
            .Lora("lora_unet_input_blocks_8_1_transformer_blocks_2_attn2_to_v", 16, 2048, 1280, alpha: 16)
            .Tensor("lora_unet_input_blocks_8_1_transformer_blocks_2_attn2_to_v.dora_scale", "F16", [1280, 1]);

        var report = Probe(w);

        Assert.Equal(("sdxl", "dora"), (report.Architecture, report.Network));
        Assert.True(report.Applicable, report.NotApplicableReason);
    }

    [Fact]
    public void Flux1_kohya_with_modulation()
    {
        var w = new SafetensorsWriter()
            .Metadata("ss_network_module", "networks.lora_flux")
            .Metadata("ss_base_model_version", "flux1")
            .Lora("lora_unet_double_blocks_0_img_attn_qkv", 16, 3072, 9216, alpha: 16, dtype: "BF16")
            .Lora("lora_unet_double_blocks_0_img_mlp_0", 16, 3072, 12288, alpha: 16, dtype: "BF16")
            .Lora("lora_unet_double_blocks_18_img_mod_lin", 16, 3072, 18432, alpha: 16, dtype: "BF16")
            .Lora("lora_unet_single_blocks_37_linear1", 16, 3072, 21504, alpha: 16, dtype: "BF16")
            .Lora("lora_unet_single_blocks_37_linear2", 16, 15360, 3072, alpha: 16, dtype: "BF16");

        var report = Probe(w);

        Assert.Equal(("flux1", "kohya", "lora"), (report.Architecture, report.Format, report.Network));
        Assert.Equal(["BF16", "F16"], report.Dtypes);
        Assert.Equal(["transformer"], report.Targets);
        Assert.True(report.Applicable, report.NotApplicableReason);
    }

    [Fact]
    public void Flux1_ai_toolkit_diffusers_with_wrong_metadata_trusts_keys()
    {
        var w = new SafetensorsWriter()
            .Metadata("ss_base_model_version", "sd_1.5")
            .Metadata("software", "ai-toolkit")
            .Peft("transformer.transformer_blocks.0.attn.to_q", 16, 3072, 3072)
            .Peft("transformer.transformer_blocks.0.attn.add_q_proj", 16, 3072, 3072)
            .Peft("transformer.single_transformer_blocks.0.proj_mlp", 16, 3072, 12288)
            .Peft("transformer.single_transformer_blocks.0.attn.to_q", 16, 3072, 3072);

        var report = Probe(w);

        Assert.Equal(("flux1", "diffusers", "lora"), (report.Architecture, report.Format, report.Network));
        Assert.Equal(1, report.Scale);
        Assert.Contains(report.Warnings, x => x.Contains("'sd_1.5'", StringComparison.Ordinal) && x.Contains("the keys win", StringComparison.Ordinal));
        Assert.True(report.Applicable, report.NotApplicableReason);
    }

    [Fact]
    public void Flux1_xlabs()
    {
        var w = new SafetensorsWriter();
        foreach (var stream in new[] { "1", "2" })
        {
            w.Tensor($"double_blocks.0.processor.qkv_lora{stream}.down.weight", "BF16", [16, 3072])
                .Tensor($"double_blocks.0.processor.qkv_lora{stream}.up.weight", "BF16", [9216, 16])
                .Tensor($"double_blocks.0.processor.proj_lora{stream}.down.weight", "BF16", [16, 3072])
                .Tensor($"double_blocks.0.processor.proj_lora{stream}.up.weight", "BF16", [3072, 16]);
        }

        var report = Probe(w);

        Assert.Equal(("flux1", "xlabs", "lora"), (report.Architecture, report.Format, report.Network));
        Assert.Equal(4, report.ModuleCount);
        Assert.True(report.Applicable, report.NotApplicableReason);
    }

    [Fact]
    public void Flux2_klein_kohya_by_mlp_ratios()
    {
        var w = new SafetensorsWriter()
            .Metadata("ss_network_module", "networks.lora_flux_2")
            .Lora("lora_unet_double_blocks_0_img_attn_qkv", 8, 3072, 9216, alpha: 8)
            .Lora("lora_unet_double_blocks_0_img_mlp_0", 8, 3072, 18432, alpha: 8)
            .Lora("lora_unet_single_blocks_19_linear1", 8, 3072, 27648, alpha: 8)
            .Lora("lora_unet_single_blocks_19_linear2", 8, 12288, 3072, alpha: 8);

        var report = Probe(w);

        Assert.Equal("flux2", report.Architecture);
        Assert.Equal("FLUX.2", report.ArchitectureDisplay);
        Assert.True(report.Applicable, report.NotApplicableReason);
    }

    [Fact]
    public void Sd3_kohya_with_three_text_encoders()
    {
        var w = new SafetensorsWriter()
            .Lora("lora_unet_joint_blocks_0_x_block_attn_qkv", 16, 1536, 4608, alpha: 8)
            .Lora("lora_unet_joint_blocks_23_context_block_mlp_fc1", 16, 1536, 6144, alpha: 8)
            .Lora("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 16, 768, 768, alpha: 8)
            .Lora("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 16, 1280, 1280, alpha: 8)
            .Lora("lora_te3_encoder_block_0_layer_0_SelfAttention_q", 16, 4096, 4096, alpha: 8);

        var report = Probe(w);

        Assert.Equal("sd3", report.Architecture);
        Assert.Equal(["text_encoder_1", "text_encoder_2", "text_encoder_3", "transformer"], report.Targets);
        Assert.True(report.Applicable, report.NotApplicableReason);
    }

    [Fact]
    public void Sd3_diffusers_by_hidden_width()
    {
        var w = new SafetensorsWriter()
            .Peft("transformer.transformer_blocks.0.attn.to_q", 4, 1536, 1536)
            .Peft("transformer.transformer_blocks.0.attn.add_q_proj", 4, 1536, 1536)
            .Peft("transformer.transformer_blocks.0.ff_context.net.2", 4, 6144, 1536);

        Assert.Equal("sd3", Probe(w).Architecture);
    }

    [Fact]
    public void Wan_and_hunyuan_video_kohya()
    {
        var wan = new SafetensorsWriter()
            .Metadata("ss_network_module", "networks.lora_wan")
            .Lora("lora_unet_blocks_0_cross_attn_k", 32, 5120, 5120, alpha: 32)
            .Lora("lora_unet_blocks_39_ffn_0", 32, 5120, 13824, alpha: 32);
        Assert.Equal("wan", Probe(wan).Architecture);

        var hunyuan = new SafetensorsWriter()
            .Lora("lora_unet_double_blocks_0_img_attn_qkv", 32, 3072, 9216, alpha: 32)
            .Lora("lora_unet_double_blocks_0_img_mod_linear", 32, 3072, 18432, alpha: 32)
            .Lora("lora_unet_single_blocks_0_modulation_linear", 32, 3072, 9216, alpha: 32);
        Assert.Equal("hunyuan-video", Probe(hunyuan).Architecture);
    }

    [Fact]
    public void Sdxl_locon_with_unet_stem_and_head_modules_has_no_unrecognised_names()
    {
        var w = new SafetensorsWriter()
            .Lora("lora_unet_input_blocks_0_0", 8, 4, 320, alpha: 4, kernel: 3)
            .Lora("lora_unet_time_embed_0", 8, 320, 1280, alpha: 4)
            .Lora("lora_unet_label_emb_0_0", 8, 2816, 1280, alpha: 4)
            .Lora("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", 8, 2048, 640, alpha: 4)
            .Lora("lora_unet_out_2", 8, 320, 4, alpha: 4, kernel: 3);

        var report = Probe(w);

        Assert.Equal(("sdxl", "locon"), (report.Architecture, report.Network));
        Assert.Empty(report.Warnings);
    }

    [Fact]
    public void Ltx_video_and_unrecognised_dit_widths()
    {
        var ltx = new SafetensorsWriter()
            .Peft("transformer.transformer_blocks.0.attn1.to_q", 32, 2048, 2048)
            .Peft("transformer.transformer_blocks.0.attn2.to_k", 32, 4096, 2048)
            .Peft("transformer.transformer_blocks.27.ff.net.0.proj", 32, 2048, 8192);
        Assert.Equal("ltx", Probe(ltx).Architecture);

        var pixart = new SafetensorsWriter()
            .Peft("transformer.transformer_blocks.0.attn1.to_q", 16, 1152, 1152)
            .Peft("text_encoder.encoder.block.0.layer.0.SelfAttention.q", 16, 4096, 4096);
        var report = Probe(pixart);
        Assert.Equal("unknown", report.Architecture);
        Assert.False(report.Applicable);
    }

    [Fact]
    public void Ia3_weight_vectors_are_adapter_tensors()
    {
        var w = new SafetensorsWriter()
            .Tensor("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.weight", "F32", [640])
            .Tensor("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.on_input", "BOOL", [])
            .Tensor("lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_2.weight", "F32", [1280, 1])
            .Tensor("lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_2.on_input", "BOOL", []);

        var report = Probe(w);

        Assert.True(report.IsAdapter);
        Assert.Equal("ia3", report.Network);
        Assert.Null(report.Scale);
    }

    [Fact]
    public void Peft_llm_adapter_is_an_adapter_but_not_for_images()
    {
        var w = new SafetensorsWriter()
            .Peft("base_model.model.model.layers.0.self_attn.q_proj", 16, 4096, 4096)
            .Peft("base_model.model.model.layers.0.mlp.gate_proj", 16, 4096, 14336)
            .Peft("base_model.model.model.layers.31.self_attn.v_proj", 16, 4096, 1024);

        var report = Probe(w);

        Assert.Equal(("llm", "peft", "lora"), (report.Architecture, report.Format, report.Network));
        Assert.True(report.IsAdapter);
        Assert.False(report.Applicable);
        Assert.Contains("language-model", report.NotApplicableReason, StringComparison.Ordinal);
        Assert.Equal(["language_model"], report.Targets);
    }

    [Fact]
    public void ControlNet_lllite_is_not_an_adapter()
    {
        var w = new SafetensorsWriter();
        foreach (var part in new[] { "conditioning1.0", "down.0", "mid.0", "up.0" })
        {
            w.Tensor($"lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.{part}.weight", "F16", [32, 32])
                .Tensor($"lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.{part}.bias", "F16", [32]);
        }

        var report = Probe(w);

        Assert.Equal("lllite", report.Network);
        Assert.False(report.IsAdapter);
        Assert.False(report.Applicable);
        Assert.Contains("ControlNet-LLLite", report.NotApplicableReason, StringComparison.Ordinal);
    }

    [Fact]
    public void Full_checkpoint_is_not_an_adapter()
    {
        var w = new SafetensorsWriter()
            .Tensor("model.diffusion_model.input_blocks.0.0.weight", "F16", [320, 4, 3, 3])
            .Tensor("model.diffusion_model.input_blocks.0.0.bias", "F16", [320])
            .Tensor("model.diffusion_model.input_blocks.1.1.proj_in.weight", "F16", [320, 320, 1, 1])
            .Tensor("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "F16", [320, 768])
            .Tensor("cond_stage_model.transformer.text_model.embeddings.position_ids", "I64", [1, 77]);

        var report = Probe(w);

        Assert.False(report.IsAdapter);
        Assert.Equal("none", report.Network);
        Assert.Contains("checkpoint", report.NotApplicableReason, StringComparison.Ordinal);
    }

    [Fact]
    public void Mixed_architectures_are_not_applicable()
    {
        var w = new SafetensorsWriter()
            .Lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 8, 2048, 640, alpha: 8)
            .Lora("lora_unet_double_blocks_0_img_attn_qkv", 8, 3072, 9216, alpha: 8)
            .Lora("lora_unet_double_blocks_0_img_mlp_0", 8, 3072, 12288, alpha: 8);

        var report = Probe(w);

        Assert.True(report.IsAdapter);
        Assert.False(report.Applicable);
        Assert.Contains("more than one architecture", report.NotApplicableReason, StringComparison.Ordinal);
    }

    [Fact]
    public void Unknown_keys_make_it_not_applicable()
    {
        var w = new SafetensorsWriter()
            .Lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 8, 2048, 640, alpha: 8)
            .Tensor("something_else", "F32", [4]);

        var report = Probe(w);

        Assert.Equal("sdxl", report.Architecture);
        Assert.False(report.Applicable);
        Assert.Contains("'something_else'", report.NotApplicableReason, StringComparison.Ordinal);
    }

    [Fact]
    public void Text_encoder_only_sdxl()
    {
        var w = new SafetensorsWriter()
            .Lora("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 8, 768, 768)
            .Lora("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 8, 1280, 1280);

        var report = Probe(w);

        Assert.Equal("sdxl", report.Architecture);
        Assert.Equal(1, report.Scale);
        Assert.Null(report.Alpha);
    }

    [Fact]
    public void Without_a_stream_alpha_falls_back_to_metadata()
    {
        var w = new SafetensorsWriter()
            .Metadata("ss_network_alpha", "4.0")
            .Lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 8, 2048, 640, alpha: 1);

        var report = LoraProber.Probe(SafetensorsReader.Read(new MemoryStream(w.ToBytes())));

        Assert.Equal(4, report.Alpha);
        Assert.Equal(0.5, report.Scale);
    }

    [Fact]
    public void Non_finite_alpha_is_a_warning_and_still_serialises()
    {
        var w = new SafetensorsWriter()
            .Lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 8, 2048, 640, alpha: double.NaN)
            .Lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v", 8, 2048, 640, alpha: double.PositiveInfinity);

        var report = Probe(w);

        Assert.Null(report.Alpha);
        Assert.Null(report.Scale);
        Assert.Contains(report.Warnings, x => x.Contains("Alpha differs", StringComparison.Ordinal));
        Assert.Contains("\"alpha\": null", JsonSerializer.Serialize(report, ProbeJsonContext.Default.ProbeReport), StringComparison.Ordinal);
    }

    [Fact]
    public void Report_serialises_with_snake_case_names()
    {
        // Every collection non-empty (two dtypes and alphas that differ give dtypes and a warning), so the
        // round trip below compares real values, not empty lists.
        var report = Probe(new SafetensorsWriter()
            .Metadata("ss_output_name", "mychar_v1")
            .Metadata("ss_tag_frequency", """{"10_mychar": {"mychar": 20, "smile": 5}}""")
            .Lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 8, 2048, 640, alpha: 8)
            .Lora("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v", 8, 2048, 640, alpha: 4, dtype: "F32"));
        Assert.Equal([1, 2, 1, 2, 1, 2],
            [report.Targets.Count, report.Dtypes.Count, report.TriggerWords.Count, report.TopTags.Count, report.Metadata.Count, report.Warnings.Count]);

        var json = JsonSerializer.Serialize(report, ProbeJsonContext.Default.ProbeReport);
        using var doc = JsonDocument.Parse(json);
        var names = doc.RootElement.EnumerateObject().Select(p => p.Name).ToList();

        Assert.Equal(
            ["format", "network", "architecture", "architecture_display", "targets", "module_count", "tensor_count",
             "rank_min", "rank_max", "alpha", "scale", "dtypes", "parameter_count", "trigger_words", "top_tags",
             "base_model_version", "metadata", "is_adapter", "applicable", "not_applicable_reason", "warnings",
             "file_sha256", "data_sha256"],
            names);
        var back = JsonSerializer.Deserialize(json, ProbeJsonContext.Default.ProbeReport)!;
        // Records compare collections by reference, so the collections are compared one by one.
        Assert.Equal(report.Targets, back.Targets);
        Assert.Equal(report.Dtypes, back.Dtypes);
        Assert.Equal(report.TriggerWords, back.TriggerWords);
        Assert.Equal(report.TopTags, back.TopTags);
        Assert.Equal(report.Metadata.OrderBy(m => m.Key), back.Metadata.OrderBy(m => m.Key));
        Assert.Equal(report.Warnings, back.Warnings);
        Assert.Equal(report, back with
        {
            Targets = report.Targets, Dtypes = report.Dtypes, TriggerWords = report.TriggerWords, TopTags = report.TopTags,
            Metadata = report.Metadata, Warnings = report.Warnings,
        });
        Assert.Equal(report.TopTags[0].Tag, doc.RootElement.GetProperty("top_tags")[0].GetProperty("tag").GetString());
    }

    [Fact]
    public void Hashes_cover_the_file_and_the_data_section()
    {
        var dir = TempFiles.Directory();
        try
        {
            var path = new SafetensorsWriter().Lora("lora_te1_text_model_encoder_layers_0_mlp_fc1", 4, 768, 3072, alpha: 4).WriteTo(Path.Combine(dir, "a.safetensors"));
            var bytes = File.ReadAllBytes(path);
            var header = SafetensorsReader.ReadFile(path);

            var report = LoraProber.ProbeFile(path, hashes: true);

            Assert.Equal(Convert.ToHexStringLower(SHA256.HashData(bytes)), report.FileSha256);
            Assert.Equal(Convert.ToHexStringLower(SHA256.HashData(bytes.AsSpan((int)header.DataOffset))), report.DataSha256);
            Assert.Equal(report.DataSha256, SafetensorsHashes.DataSha256(path, header));
            Assert.Null(LoraProber.ProbeFile(path).FileSha256);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void Architecture_display_names()
    {
        Assert.Equal("SDXL", ArchitectureFamilies.Display("sdxl"));
        Assert.Equal("FLUX.1", ArchitectureFamilies.Display("flux1"));
        Assert.Equal("something-new", ArchitectureFamilies.Display("something-new"));
        Assert.All(ArchitectureFamilies.Ids, id => Assert.False(string.IsNullOrEmpty(ArchitectureFamilies.Display(id))));
    }
}
