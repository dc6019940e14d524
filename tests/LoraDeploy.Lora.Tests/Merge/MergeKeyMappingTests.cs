using LoraDeploy.Lora.Merge;
using LoraDeploy.Lora.Tests.Support;
using static LoraDeploy.Lora.Tests.Merge.MergeFixtures;

namespace LoraDeploy.Lora.Tests.Merge;

/// <summary>Adapter key conventions mapped onto the base's own tensor names, each checked by merging and comparing.</summary>
public sealed class MergeKeyMappingTests : IDisposable
{
    private readonly string _dir = TempFiles.Directory();
    private readonly Random _random = new(11);

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void Kohya_sd15_diffusers_block_names_map_to_ldm_checkpoint_names()
    {
        MergeEachOnto(
        [
            ("lora_unet_down_blocks_0_attentions_0_proj_in", "model.diffusion_model.input_blocks.1.1.proj_in.weight"),
            ("lora_unet_down_blocks_0_resnets_1_conv1", "model.diffusion_model.input_blocks.2.0.in_layers.2.weight"),
            ("lora_unet_down_blocks_1_resnets_0_conv_shortcut", "model.diffusion_model.input_blocks.4.0.skip_connection.weight"),
            ("lora_unet_down_blocks_0_downsamplers_0_conv", "model.diffusion_model.input_blocks.3.0.op.weight"),
            ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k", "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"),
            ("lora_unet_mid_block_resnets_1_time_emb_proj", "model.diffusion_model.middle_block.2.emb_layers.1.weight"),
            ("lora_unet_up_blocks_1_attentions_2_proj_out", "model.diffusion_model.output_blocks.5.1.proj_out.weight"),
            ("lora_unet_up_blocks_3_resnets_2_conv2", "model.diffusion_model.output_blocks.11.0.out_layers.3.weight"),
            ("lora_unet_up_blocks_0_upsamplers_0_conv", "model.diffusion_model.output_blocks.2.1.conv.weight"),
            ("lora_unet_up_blocks_1_upsamplers_0_conv", "model.diffusion_model.output_blocks.5.2.conv.weight"),
            ("lora_unet_time_embedding_linear_2", "model.diffusion_model.time_embed.2.weight"),
            ("lora_unet_conv_in", "model.diffusion_model.input_blocks.0.0.weight"),
            ("lora_te_text_model_encoder_layers_11_mlp_fc2", "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"),
        ]);
    }

    [Fact]
    public void Kohya_sdxl_names_map_to_the_sdxl_checkpoint()
    {
        MergeEachOnto(
        [
            ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_out_0", "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_out.0.weight"),
            ("lora_unet_middle_block_1_proj_in", "model.diffusion_model.middle_block.1.proj_in.weight"),
            ("lora_te1_text_model_encoder_layers_3_self_attn_v_proj", "conditioner.embedders.0.transformer.text_model.encoder.layers.3.self_attn.v_proj.weight"),
            ("lora_te2_text_model_encoder_layers_3_self_attn_out_proj", "conditioner.embedders.1.model.transformer.resblocks.3.attn.out_proj.weight"),
            ("lora_te2_text_model_encoder_layers_3_mlp_fc1", "conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_fc.weight"),
        ]);
    }

    [Fact]
    public void Dotted_comfyui_bfl_and_diffusers_names_map_to_bare_names()
    {
        MergeEachOnto(
        [
            ("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv.weight"),
            ("diffusion_model.double_blocks.0.img_attn.proj", "double_blocks.0.img_attn.proj.weight"),
            ("base_model.model.single_blocks.7.linear2", "single_blocks.7.linear2.weight"),
            ("transformer.single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.proj_out.weight"),
            ("diffusion_model.input_blocks.1.1.proj_in", "model.diffusion_model.input_blocks.1.1.proj_in.weight"),
        ], dotted: true);
    }

    [Fact]
    public void Sdxl_te2_q_k_v_land_on_row_thirds_of_the_fused_in_proj()
    {
        const string prefix = "conditioner.embedders.1.model.transformer.resblocks.0.attn.";
        var weight = Random(_random, prefix + "in_proj_weight", [12, 4]);
        var bias = Random(_random, prefix + "in_proj_bias", [12]);
        var basePath = Write(Path.Combine(_dir, "base.safetensors"), [weight, bias]);
        var tensors = new List<TestTensor>();
        var deltas = new Dictionary<int, double[]>();
        foreach (var (part, third) in new[] { ("q", 0), ("v", 2) })
        {
            var module = $"lora_te2_text_model_encoder_layers_0_self_attn_{part}_proj";
            var down = Random(_random, module + ".lora_down.weight", [2, 4]);
            var up = Random(_random, module + ".lora_up.weight", [4, 2]);
            tensors.AddRange([down, up, Scalar(module + ".alpha", 1)]);
            deltas[third] = MergeExactnessTests.MatMul(up, down);
        }
        var adapter = Write(Path.Combine(_dir, "adapter.safetensors"), tensors);

        var output = Path.Combine(_dir, "out.safetensors");
        LoraMerger.Merge(basePath, [new MergeAdapter(adapter, 0.8)], output);

        var expected = (double[])weight.Values.Clone();
        foreach (var (third, delta) in deltas)
        {
            for (var i = 0; i < 16; i++)
            {
                expected[third * 16 + i] += 0.8 * 0.5 * delta[i];
            }
        }
        var merged = Read(output, out _);
        AssertClose(expected, merged[weight.Name].Values, "in_proj_weight");
        Assert.Equal(weight.Values[16..32], merged[weight.Name].Values[16..32]); // k rows: untouched
        Assert.Equal(Encode(bias.Values, "F32"), merged[bias.Name].Bytes);
    }

    [Fact]
    public void Diffusers_flux_q_k_v_and_proj_mlp_land_on_row_blocks_of_bfl_fused_tensors()
    {
        var qkv = Random(_random, "double_blocks.0.img_attn.qkv.weight", [12, 4]);
        var qkvBias = Random(_random, "double_blocks.0.img_attn.qkv.bias", [12]);
        var linear1 = Random(_random, "single_blocks.0.linear1.weight", [28, 4]);
        var linear2 = Random(_random, "single_blocks.0.linear2.weight", [4, 20]);
        var basePath = Write(Path.Combine(_dir, "base.safetensors"), [qkv, qkvBias, linear1, linear2]);
        var tensors = new List<TestTensor>();
        TestTensor[] Lora(string module, long outDim, long inDim)
        {
            var a = Random(_random, module + ".lora_A.weight", [2, inDim]);
            var b = Random(_random, module + ".lora_B.weight", [outDim, 2]);
            tensors.AddRange([a, b]);
            return [a, b];
        }
        var toK = Lora("transformer.transformer_blocks.0.attn.to_k", 4, 4);
        var toV = Lora("transformer.transformer_blocks.0.attn.to_v", 4, 4);
        var singleQ = Lora("transformer.single_transformer_blocks.0.attn.to_q", 4, 4);
        var mlp = Lora("transformer.single_transformer_blocks.0.proj_mlp", 16, 4);
        var projOut = Lora("transformer.single_transformer_blocks.0.proj_out", 4, 20);
        var adapter = Write(Path.Combine(_dir, "adapter.safetensors"), tensors);

        var output = Path.Combine(_dir, "out.safetensors");
        var result = LoraMerger.Merge(basePath, [new MergeAdapter(adapter)], output);

        var merged = Read(output, out _);
        Assert.Equal(3, result.TensorsMerged);
        Assert.Equal(5, result.ModulesApplied);
        AssertClose(AddRows(qkv, [(4, toK), (8, toV)]), merged[qkv.Name].Values, "qkv");
        AssertClose(AddRows(linear1, [(0, singleQ), (12, mlp)]), merged[linear1.Name].Values, "linear1");
        AssertClose(MergeExactnessTests.Add(linear2, MergeExactnessTests.MatMul(projOut[1], projOut[0]), 1), merged[linear2.Name].Values, "linear2");
        Assert.Equal(Encode(qkvBias.Values, "F32"), merged[qkvBias.Name].Bytes);
    }

    private static double[] AddRows(TestTensor weight, (int Row, TestTensor[] Factors)[] blocks)
    {
        var expected = (double[])weight.Values.Clone();
        var columns = (int)weight.Shape[1];
        foreach (var (row, factors) in blocks)
        {
            var delta = MergeExactnessTests.MatMul(factors[1], factors[0]);
            for (var i = 0; i < delta.Length; i++)
            {
                expected[row * columns + i] += delta[i];
            }
        }
        return expected;
    }

    [Fact]
    public void A_name_that_folds_onto_two_base_tensors_is_refused()
    {
        var basePath = Write(Path.Combine(_dir, "base.safetensors"), [Random(_random, "blocks.a_b.c.weight", [2, 2]), Random(_random, "blocks.a.b_c.weight", [2, 2])]);
        var adapter = Write(Path.Combine(_dir, "adapter.safetensors"),
            [Random(_random, "lora_unet_blocks_a_b_c.lora_down.weight", [1, 2]), Random(_random, "lora_unet_blocks_a_b_c.lora_up.weight", [2, 1])]);

        var e = Assert.Throws<LoraMergeException>(() => LoraMerger.Merge(basePath, [new MergeAdapter(adapter)], Path.Combine(_dir, "out.safetensors")));
        Assert.Contains("adapter module 'lora_unet_blocks_a_b_c' matches more than one base tensor", e.Message);
    }

    [Fact]
    public void Diffusers_to_ldm_translation_table()
    {
        Assert.Equal(["input_blocks_7_1_transformer_blocks_0_ff_net_2"], BaseTensorNames.DiffusersToLdm("down_blocks_2_attentions_0_transformer_blocks_0_ff_net_2"));
        Assert.Equal(["output_blocks_8_2_conv", "output_blocks_8_1_conv"], BaseTensorNames.DiffusersToLdm("up_blocks_2_upsamplers_0_conv"));
        Assert.Equal(["middle_block_0_in_layers_0"], BaseTensorNames.DiffusersToLdm("mid_block_resnets_0_norm1"));
        Assert.Empty(BaseTensorNames.DiffusersToLdm("input_blocks_1_1_proj_in"));
    }

    /// <summary>A base of exactly the target tensors; one rank-1 LoRA per (adapter module, target); checks every target got its own delta.</summary>
    private void MergeEachOnto((string Module, string Target)[] pairs, bool dotted = false)
    {
        var baseTensors = pairs.Select(p => Random(_random, p.Target, [4, 3])).ToList();
        // An unrelated tensor that must stay as it is.
        baseTensors.Add(Random(_random, "first_stage_model.decoder.conv_in.weight", [2, 2]));
        var basePath = Write(Path.Combine(_dir, "base.safetensors"), baseTensors);
        var tensors = new List<TestTensor>();
        var deltas = new Dictionary<string, double[]>(StringComparer.Ordinal);
        foreach (var (module, target) in pairs)
        {
            var (downName, upName) = dotted ? (".lora_A.weight", ".lora_B.weight") : (".lora_down.weight", ".lora_up.weight");
            var down = Random(_random, module + downName, [1, 3]);
            var up = Random(_random, module + upName, [4, 1]);
            tensors.AddRange([down, up]);
            deltas[target] = MergeExactnessTests.MatMul(up, down);
        }
        var adapter = Write(Path.Combine(_dir, "adapter.safetensors"), tensors);

        var output = Path.Combine(_dir, "out.safetensors");
        var result = LoraMerger.Merge(basePath, [new MergeAdapter(adapter)], output);

        var merged = Read(output, out _);
        Assert.Equal(pairs.Length, result.TensorsMerged);
        foreach (var tensor in baseTensors)
        {
            if (deltas.TryGetValue(tensor.Name, out var delta))
            {
                AssertClose(MergeExactnessTests.Add(tensor, delta, 1), merged[tensor.Name].Values, tensor.Name);
            }
            else
            {
                Assert.Equal(Encode(tensor.Values, "F32"), merged[tensor.Name].Bytes);
            }
        }
    }
}
