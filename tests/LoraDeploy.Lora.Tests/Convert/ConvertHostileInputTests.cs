using LoraDeploy.Lora.Conversion;
using LoraDeploy.Lora.Tests.Merge;
using LoraDeploy.Lora.Tests.Support;
using static LoraDeploy.Lora.Tests.Conversion.ConvertFixtures;
using static LoraDeploy.Lora.Tests.Merge.MergeFixtures;

namespace LoraDeploy.Lora.Tests.Conversion;

/// <summary>Inputs convert refuses, says why for, or carries as they are; and outputs that cannot be written.</summary>
public sealed class ConvertHostileInputTests : IDisposable
{
    private readonly string _dir = TempFiles.Directory();
    private readonly Random _random = new(29);

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private string Output => Path.Combine(_dir, "out.safetensors");

    private AdapterConvertException Refused(string input, AdapterConvention to, AdapterArchitecture? architecture = null)
    {
        var e = Assert.Throws<AdapterConvertException>(() => AdapterConverter.Convert(input, to, Output, new ConvertOptions { Architecture = architecture }));
        Assert.Empty(Directory.GetFiles(_dir, "out.*"));
        return e;
    }

    [Fact]
    public void A_file_that_is_not_safetensors_is_refused()
    {
        var input = Path.Combine(_dir, "notes.safetensors");
        File.WriteAllText(input, "this is not a safetensors file at all");

        Assert.Contains($"adapter {input} is not a valid safetensors file", Refused(input, AdapterConvention.Peft).Message);
    }

    [Fact]
    public void Tensors_that_are_no_adapter_factor_are_listed()
    {
        var input = Write(Path.Combine(_dir, "in.safetensors"),
            [.. KohyaModule(_random, "lora_unet_mid_block_attentions_0_proj_in", 2, [8], 8, 1), Random(_random, "model.diffusion_model.out.2.weight", [2, 2])], "F16");

        Assert.EndsWith("1 tensor(s) cannot be converted: 'model.diffusion_model.out.2.weight' (not an adapter factor)", Refused(input, AdapterConvention.Kohya).Message);
    }

    [Fact]
    public void Module_names_no_model_has_are_listed_not_dropped()
    {
        var input = Write(Path.Combine(_dir, "in.safetensors"),
            [.. KohyaModule(_random, "lora_unet_mid_block_attentions_0_proj_in", 2, [8], 8, 1), .. KohyaModule(_random, "lora_unet_mid_block_attentions_0_wobble", 2, [8], 8, 1),
             .. KohyaModule(_random, "lora_te_text_model_encoder_layers_0_self_attn_x_proj", 2, [8], 8, 1)], "F16");

        Assert.EndsWith("2 module(s) name no SD1.5, SDXL or FLUX.1 layer this converter knows: lora_te_text_model_encoder_layers_0_self_attn_x_proj, lora_unet_mid_block_attentions_0_wobble",
            Refused(input, AdapterConvention.Diffusers).Message);
    }

    [Fact]
    public void Nan_and_inf_are_carried_untouched_and_listed()
    {
        // Converting renames; judging values is merge's job (it refuses NaN/Inf adapters).
        var tensors = KohyaModule(_random, "lora_unet_mid_block_attentions_0_proj_in", 2, [8], 8, 1).ToList();
        tensors[1] = tensors[1] with { Values = [double.NaN, double.PositiveInfinity, .. tensors[1].Values[2..]] };
        var input = Write(Path.Combine(_dir, "in.safetensors"), tensors, "F16");

        var result = AdapterConverter.Convert(input, AdapterConvention.Diffusers, Output);

        Assert.Equal(["unet.mid_block.attentions.0.proj_in.lora_B.weight"], result.NonFiniteTensors);
        Assert.Equal(Read(input, out _)[tensors[1].Name].Bytes, Read(Output, out _)["unet.mid_block.attentions.0.proj_in.lora_B.weight"].Bytes);
    }

    [Fact]
    public void An_output_folder_that_cannot_be_written_is_a_clear_error_and_leaves_nothing()
    {
        var input = Write(Path.Combine(_dir, "in.safetensors"), Sd15Kohya(_random), "F16");
        var notAFolder = Path.Combine(_dir, "file");
        File.WriteAllText(notAFolder, "");
        var output = Path.Combine(notAFolder, "out.safetensors");

        var e = Assert.Throws<AdapterConvertException>(() => AdapterConverter.Convert(input, AdapterConvention.Diffusers, output));

        Assert.StartsWith($"writing {output} failed: ", e.Message);
        Assert.EndsWith("(no output was left)", e.Message);
        Assert.Equal(new[] { input, notAFolder }.Order(), Directory.GetFiles(_dir).Order());
    }

    [Fact]
    public void A_disk_that_fills_up_mid_write_leaves_no_part_file()
    {
        var input = Write(Path.Combine(_dir, "in.safetensors"), Sd15Kohya(_random, dora: false), "F16");
        var options = new ConvertOptions { OpenOutput = part => new Merge.MergeHostileInputTests.FullDiskStream(new FileStream(part, FileMode.Create), 512) };

        var e = Assert.Throws<AdapterConvertException>(() => AdapterConverter.Convert(input, AdapterConvention.Peft, Output, options));

        Assert.Contains("No space left on device", e.Message);
        Assert.Equal([input], Directory.GetFiles(_dir));
    }

    [Fact]
    public void Loha_and_lokr_convert_to_kohya_names_and_are_refused_for_peft_and_diffusers()
    {
        const string module = "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
        var input = Write(Path.Combine(_dir, "in.safetensors"),
        [
            Random(_random, module + ".hada_w1_a", [8, 2]), Random(_random, module + ".hada_w1_b", [2, 8]),
            Random(_random, module + ".hada_w2_a", [8, 2]), Random(_random, module + ".hada_w2_b", [2, 8]), Scalar(module + ".alpha", 1),
            Random(_random, "lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w1", [2, 2]), Random(_random, "lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w2", [6, 3]),
        ], "F16");

        Assert.Contains($"'{module}' is LoHa, which the peft convention has no form for (it holds LoRA/LoCon and DoRA only); convert it to kohya",
            Refused(input, AdapterConvention.Peft).Message);
        Assert.Contains("'lora_te_text_model_encoder_layers_0_mlp_fc1' is LoKr, which the diffusers convention has no form for",
            Refused(input, AdapterConvention.Diffusers).Message);

        var result = AdapterConverter.Convert(input, AdapterConvention.Kohya, Output);

        Assert.Equal(AdapterArchitecture.SD15, result.Architecture);
        var output = Read(Output, out _);
        Assert.Equal(Read(input, out _)[module + ".hada_w1_b"].Bytes, output["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_b"].Bytes);
        Assert.True(output.ContainsKey("lora_te_text_model_encoder_layers_0_mlp_fc1.lokr_w2"));
    }

    [Fact]
    public void Q_k_v_parts_with_different_alpha_over_rank_are_not_fused()
    {
        var tensors = new List<TestTensor>();
        foreach (var (part, alpha) in new[] { ("to_q", 2.0), ("to_k", 1.0) })
        {
            tensors.AddRange(PeftModule(_random, $"transformer.transformer_blocks.0.attn.{part}", 2, 4, 4));
            tensors.Add(Scalar($"transformer.transformer_blocks.0.attn.{part}.alpha", alpha));
        }
        var input = Write(Path.Combine(_dir, "in.safetensors"), tensors, "F16");

        Assert.Contains("cannot fuse 'double_blocks.0.img_attn.qkv' (from 'transformer.transformer_blocks.0.attn.to_q', 'transformer.transformer_blocks.0.attn.to_k') exactly: their alpha/rank differ (2/2, 1/2)",
            Refused(input, AdapterConvention.Kohya).Message);
    }

    [Fact]
    public void Peft_cannot_hold_dora_on_some_modules_only()
    {
        var input = Write(Path.Combine(_dir, "in.safetensors"), Sd15Kohya(_random, dora: true), "F16");

        Assert.Contains("cannot convert to peft: 1 of 7 modules are DoRA, but adapter_config.json's use_dora applies to all", Refused(input, AdapterConvention.Peft).Message);
    }

    [Fact]
    public void Sd15_or_sdxl_unknown_is_refused_for_kohya_names_until_said()
    {
        var input = Write(Path.Combine(_dir, "in.safetensors"), [.. PeftModule(_random, "unet.mid_block.attentions.0.proj_in", 2, 8, 8)], "F16");

        Assert.Contains("cannot tell an SD1.5 adapter from an SDXL one", Refused(input, AdapterConvention.Kohya).Message);
        // diffusers names are the same for both.
        Assert.Null(AdapterConverter.Convert(input, AdapterConvention.Peft, Path.Combine(_dir, "peft", "a.safetensors") is var p && Directory.CreateDirectory(Path.GetDirectoryName(p)!) is not null ? p : p).Architecture);

        AdapterConverter.Convert(input, AdapterConvention.Kohya, Output, new ConvertOptions { Architecture = AdapterArchitecture.SDXL });

        Assert.True(Read(Output, out _).ContainsKey("lora_unet_middle_block_1_proj_in.lora_down.weight"));
    }

    [Fact]
    public void Norm_out_and_adaln_modulation_swap_their_row_halves()
    {
        var tensors = PeftModule(_random, "transformer.norm_out.linear", 2, 4, 8).ToList();
        var input = Write(Path.Combine(_dir, "in.safetensors"), tensors, "F16");

        AdapterConverter.Convert(input, AdapterConvention.Kohya, Output);
        var back = Path.Combine(_dir, "back.safetensors");
        AdapterConverter.Convert(Output, AdapterConvention.Diffusers, back);

        var up = Read(input, out _)["transformer.norm_out.linear.lora_B.weight"].Bytes;
        var swapped = Read(Output, out _)["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"].Bytes;
        Assert.Equal(up[16..], swapped[..16]);
        Assert.Equal(up[..16], swapped[16..]);
        Assert.Equal(up, Read(back, out _)["transformer.norm_out.linear.lora_B.weight"].Bytes);
    }

    [Fact]
    public void The_input_is_never_the_output()
    {
        var input = Write(Path.Combine(_dir, "in.safetensors"), Sd15Kohya(_random), "F16");

        var e = Assert.Throws<AdapterConvertException>(() => AdapterConverter.Convert(input, AdapterConvention.Kohya, input));

        Assert.Contains("is the input file", e.Message);
    }
}
