using LoraDeploy.Lora.Conversion;
using LoraDeploy.Lora.Tests.Merge;
using LoraDeploy.Lora.Safetensors;
using LoraDeploy.Lora.Tests.Support;
using static LoraDeploy.Lora.Tests.Conversion.ConvertFixtures;
using static LoraDeploy.Lora.Tests.Merge.MergeFixtures;

namespace LoraDeploy.Lora.Tests.Conversion;

/// <summary>
/// Conversions checked two ways: round trips give back the very bytes, and the merge library (which reads every
/// convention) merges the converted adapter into a synthetic base exactly as it merges the original.
/// </summary>
public sealed class ConvertExactnessTests : IDisposable
{
    private readonly string _dir = TempFiles.Directory();
    private readonly Random _random = new(23);

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Theory]
    [InlineData(AdapterConvention.Peft, "sd15")]
    [InlineData(AdapterConvention.Diffusers, "sd15")]
    [InlineData(AdapterConvention.Peft, "sdxl")]
    [InlineData(AdapterConvention.Diffusers, "sdxl")]
    public void Kohya_round_trips_give_back_identical_tensors(AdapterConvention via, string model)
    {
        var tensors = model == "sd15" ? Sd15Kohya(_random, dora: via != AdapterConvention.Peft) : SdxlKohya(_random);
        var original = Write(Path.Combine(_dir, "original.safetensors"), tensors, "F16", new Dictionary<string, string> { ["ss_network_dim"] = "2" });

        var (converted, there) = ConvertFixtures.Convert(_dir, original, via);
        var (back, _) = ConvertFixtures.Convert(_dir, converted, AdapterConvention.Kohya, "back");

        Assert.Equal(model == "sd15" ? AdapterArchitecture.SD15 : AdapterArchitecture.SDXL, there.Architecture);
        Assert.Equal("kohya", there.From);
        var before = Read(original, out _);
        var after = Read(back, out var metadata);
        foreach (var (name, tensor) in before)
        {
            Assert.True(tensor.Bytes.AsSpan().SequenceEqual(after[name].Bytes), $"{name} changed");
            Assert.Equal(tensor.Shape, after[name].Shape);
        }
        // A module without alpha (scale 1) comes back from PEFT, which always has one, with alpha = rank: the same scale.
        foreach (var added in after.Keys.Except(before.Keys))
        {
            Assert.EndsWith(".alpha", added);
            Assert.False(before.ContainsKey(added));
            Assert.Equal(before[added.Replace(".alpha", ".lora_down.weight")].Shape[0], after[added].Values.Single());
        }
        Assert.Equal(via == AdapterConvention.Peft && model == "sd15" ? 1 : 0, after.Count - before.Count);
        Assert.Equal("2", metadata["ss_network_dim"]);
        Assert.Contains("\"to\":\"kohya\"", metadata[AdapterConverter.ConvertRecordKey]);
        Assert.Contains($"\"to\":\"{via.ToString().ToLowerInvariant()}\"", metadata[AdapterConverter.ConvertRecordKey]);
    }

    [Theory]
    [InlineData(AdapterConvention.Peft)]
    [InlineData(AdapterConvention.Diffusers)]
    [InlineData(AdapterConvention.Kohya)]
    public void Sd15_converted_merges_as_the_original(AdapterConvention to)
    {
        var basePath = WriteBase(Path.Combine(_dir, "sd15.safetensors"), _random, Sd15Base);
        var original = Write(Path.Combine(_dir, "original.safetensors"), Sd15Kohya(_random, dora: to != AdapterConvention.Peft), "F16");

        var (converted, _) = ConvertFixtures.Convert(_dir, original, to);

        AssertSameMerge(_dir, basePath, original, converted);
    }

    [Theory]
    [InlineData(AdapterConvention.Peft)]
    [InlineData(AdapterConvention.Diffusers)]
    public void Sdxl_converted_merges_as_the_original_and_back(AdapterConvention to)
    {
        var basePath = WriteBase(Path.Combine(_dir, "sdxl.safetensors"), _random, SdxlBase);
        var original = Write(Path.Combine(_dir, "original.safetensors"), SdxlKohya(_random), "F16");

        var (converted, _) = ConvertFixtures.Convert(_dir, original, to);
        var (back, _) = ConvertFixtures.Convert(_dir, converted, AdapterConvention.Kohya, "back");

        AssertSameMerge(_dir, basePath, original, converted);
        AssertSameMerge(_dir, basePath, original, back);
    }

    [Theory]
    [InlineData(AdapterConvention.Diffusers)]
    [InlineData(AdapterConvention.Peft)]
    public void Flux_fused_qkv_split_into_q_k_v_merges_as_the_original(AdapterConvention to)
    {
        var basePath = WriteBase(Path.Combine(_dir, "flux1.safetensors"), _random, FluxBase);
        var original = Write(Path.Combine(_dir, "original.safetensors"), FluxKohya(_random, dora: to != AdapterConvention.Peft), "F16");

        var (converted, result) = ConvertFixtures.Convert(_dir, original, to);

        Assert.Equal(AdapterArchitecture.Flux1, result.Architecture);
        // qkv ×2 → 3 parts each, linear1 → q, k, v, proj_mlp.
        Assert.Equal(result.ModulesIn + 2 * 2 + 3, result.ModulesOut);
        Assert.Empty(result.RankGrown);
        Assert.Equal(0, result.TensorsBuilt);
        AssertSameMerge(_dir, basePath, original, converted);

        // lora_A shared, lora_B's rows: the bytes are the original's.
        var before = Read(original, out _);
        var after = Read(converted, out _);
        var prefix = to == AdapterConvention.Peft ? "base_model.model.transformer." : "transformer.";
        Assert.Equal(before["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].Bytes, after[prefix + "transformer_blocks.0.attn.to_k.lora_A.weight"].Bytes);
        Assert.Equal(before["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].Bytes.AsSpan(4 * 2 * 2, 4 * 2 * 2).ToArray(), after[prefix + "transformer_blocks.0.attn.to_k.lora_B.weight"].Bytes);
    }

    [Fact]
    public void Flux_split_q_k_v_fused_into_qkv_merges_as_the_original_and_says_the_rank_grew()
    {
        var basePath = WriteBase(Path.Combine(_dir, "flux1.safetensors"), _random, FluxBase);
        var original = Write(Path.Combine(_dir, "original.safetensors"), FluxDiffusers(_random), "F16");

        var (converted, result) = ConvertFixtures.Convert(_dir, original, AdapterConvention.Kohya);

        Assert.Equal("diffusers", result.From);
        Assert.Equal(
        [
            "double_blocks.0.img_attn.qkv: rank 2+1+2 → 5",
            "double_blocks.0.txt_attn.qkv: rank 2+0+2 → 4",
            "single_blocks.0.linear1: rank 2+2+2+2 → 8",
        ], result.RankGrown.Order());
        AssertSameMerge(_dir, basePath, original, converted);
        using var header = SafetensorsReader.ReadFile(converted);
        header.TryGetTensor("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight", out var up);
        Assert.Equal([12L, 5], up.Shape);
        // No alpha in (scale 1), none out: kohya reads a missing alpha as alpha = rank.
        Assert.False(header.TryGetTensor("lora_unet_double_blocks_0_img_attn_qkv.alpha", out _));
    }

    [Fact]
    public void Flux_kohya_to_diffusers_and_back_merges_as_the_original()
    {
        var basePath = WriteBase(Path.Combine(_dir, "flux1.safetensors"), _random, FluxBase);
        var original = Write(Path.Combine(_dir, "original.safetensors"), FluxKohya(_random, dora: false), "F16");

        var (converted, _) = ConvertFixtures.Convert(_dir, original, AdapterConvention.Diffusers);
        var (back, result) = ConvertFixtures.Convert(_dir, converted, AdapterConvention.Kohya, "back");

        // Fused again, the rank is 3× (q, k, v each carry the shared lora_A) and alpha 3× with it.
        Assert.Contains("double_blocks.0.txt_attn.qkv: rank 3+3+3 → 9", result.RankGrown);
        AssertSameMerge(_dir, basePath, original, back);
    }

    [Fact]
    public void Peft_alpha_and_rank_patterns_carry_each_modules_scale()
    {
        var original = Write(Path.Combine(_dir, "original.safetensors"), Sd15Kohya(_random, dora: false), "F16");

        var (converted, result) = ConvertFixtures.Convert(_dir, original, AdapterConvention.Peft);

        var config = PeftAdapterConfigOf(result.ConfigPath!);
        Assert.Equal(2, config.Rank);
        Assert.Equal(1, config.LoraAlpha);
        Assert.Equal(4, config.RankPattern.Single(p => p.Key == "unet.up_blocks.0.upsamplers.0.conv").Value);
        Assert.Equal(4, config.AlphaPattern.Single(p => p.Key == "unet.up_blocks.0.upsamplers.0.conv").Value);
        // No alpha in the kohya file: scale 1, so alpha = rank.
        Assert.Equal(2, config.AlphaPattern.Single(p => p.Key == "unet.time_embedding.linear_1").Value);
        Assert.Equal(2, config.AlphaPattern.Single(p => p.Key == "text_encoder.text_model.encoder.layers.0.self_attn.q_proj").Value);
        Assert.Contains("unet.down_blocks.0.resnets.0.conv1", config.TargetModules!);
        Assert.Equal(Path.Combine(Path.GetDirectoryName(converted)!, "adapter_config.json"), result.ConfigPath);
    }

    private static LoraDeploy.Lora.Peft.PeftAdapterConfig PeftAdapterConfigOf(string path) => LoraDeploy.Lora.Peft.PeftAdapterConfig.ReadFile(path);
}
