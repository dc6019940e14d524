using System.Text;
using LoraDeploy.Lora.Peft;
using LoraDeploy.Lora.Tests.Support;

namespace LoraDeploy.Lora.Tests.Peft;

public sealed class PeftAdapterConfigTests
{
    [Fact]
    public void A_saved_peft_config_is_read()
    {
        var json = new PeftAdapterFixture
        {
            Rank = 16, Alpha = 32, UseRslora = true, LayersToTransform = [0, 3],
            RankPattern = new() { ["q_proj"] = 8, ["model.layers.1.mlp.down_proj"] = 4 },
            AlphaPattern = new() { ["v_proj"] = 2.5 },
        }.ConfigJson();

        var config = PeftAdapterConfig.Parse(Encoding.UTF8.GetBytes(json));

        Assert.Equal("LORA", config.PeftType);
        Assert.Equal(16, config.Rank);
        Assert.Equal(32, config.LoraAlpha);
        Assert.True(config.UseRslora);
        Assert.False(config.UseDora);
        Assert.Equal(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], config.TargetModules!);
        Assert.Null(config.TargetModulesRegex);
        Assert.Equal([new("q_proj", 8), new("model.layers.1.mlp.down_proj", 4)], config.RankPattern);
        Assert.Equal([new KeyValuePair<string, double>("v_proj", 2.5)], config.AlphaPattern);
        Assert.Equal([0, 3], config.LayersToTransform!);
        Assert.Null(config.LayersPattern);
        Assert.Equal("none", config.Bias);
        Assert.Null(config.ModulesToSave);
        Assert.Equal("tiny-llama-test", config.BaseModelNameOrPath);
    }

    [Fact]
    public void Optional_forms_are_read()
    {
        var config = Parse("""
            {"peft_type": "LORA", "r": 8, "lora_alpha": 16.5, "target_modules": ".*\\.(q|v)_proj",
             "layers_to_transform": 2, "layers_pattern": "layers", "modules_to_save": ["lm_head"], "bias": "all"}
            """);
        Assert.Equal(16.5, config.LoraAlpha);
        Assert.Null(config.TargetModules);
        Assert.Equal(@".*\.(q|v)_proj", config.TargetModulesRegex);
        Assert.Equal([2], config.LayersToTransform!);
        Assert.Equal(["layers"], config.LayersPattern!);
        Assert.Equal(["lm_head"], config.ModulesToSave!);
        Assert.Equal("all", config.Bias);
        Assert.Empty(config.RankPattern);
        Assert.False(config.UseRslora);
    }

    [Theory]
    [InlineData("""{"r": 8, "lora_alpha": 16}""", "no 'peft_type'")]
    [InlineData("""{"peft_type": "LORA", "lora_alpha": 16}""", "no 'r'")]
    [InlineData("""{"peft_type": "LORA", "r": 8}""", "no 'lora_alpha'")]
    [InlineData("""{"peft_type": "LORA", "r": null, "lora_alpha": 16}""", "no 'r'")]
    [InlineData("""{"peft_type": 3, "r": 8, "lora_alpha": 16}""", "'peft_type' must be a string, not the number 3")]
    [InlineData("""{"peft_type": "LORA", "r": "8", "lora_alpha": 16}""", "'r' must be a positive integer, not the string \"8\"")]
    [InlineData("""{"peft_type": "LORA", "r": 0, "lora_alpha": 16}""", "'r' must be a positive integer, not the number 0")]
    [InlineData("""{"peft_type": "LORA", "r": 8.5, "lora_alpha": 16}""", "'r' must be a positive integer")]
    [InlineData("""{"peft_type": "LORA", "r": 8, "lora_alpha": "x"}""", "'lora_alpha' must be a finite number")]
    [InlineData("""{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_dora": "yes"}""", "'use_dora' must be true or false")]
    [InlineData("""{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": 1}""", "'use_rslora' must be true or false")]
    [InlineData("""{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": 5}""", "'target_modules' must be a list of module names or a regex string")]
    [InlineData("""{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", 5]}""", "'target_modules' must hold strings only")]
    [InlineData("""{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "bias": "some"}""", "'bias' must be \"none\", \"all\" or \"lora_only\"")]
    [InlineData("""{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "layers_to_transform": -1}""", "'layers_to_transform' must hold non-negative layer indices")]
    [InlineData("""{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "layers_to_transform": "0"}""", "'layers_to_transform' must be a layer index or a list")]
    [InlineData("""{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 0}}""", "'rank_pattern['q_proj']' must be a positive integer")]
    [InlineData("""{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": ["q_proj"]}""", "'rank_pattern' must be an object")]
    [InlineData("""{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "alpha_pattern": {"q_proj": "big"}}""", "'alpha_pattern['q_proj']' must be a finite number")]
    [InlineData("""{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "modules_to_save": {"a": 1}}""", "'modules_to_save' must be a string or a list of strings")]
    [InlineData("""{"peft_type": "LORA", "r": 8, "r": 16, "lora_alpha": 16}""", "not valid JSON")]
    [InlineData("""{"peft_type": "LORA", "r": 8,""", "not valid JSON")]
    [InlineData("""[1, 2]""", "must be a JSON object")]
    public void Missing_and_malformed_fields_are_refused_naming_the_field(string json, string expected)
    {
        var error = Assert.Throws<PeftAdapterException>(() => Parse(json));
        Assert.Contains(expected, error.Message);
    }

    [Fact]
    public void Invalid_utf8_is_refused() =>
        Assert.Contains("not valid UTF-8", Assert.Throws<PeftAdapterException>(() => PeftAdapterConfig.Parse([(byte)'{', (byte)'"', 0xFF, (byte)'"', (byte)':', (byte)'1', (byte)'}'])).Message);

    [Fact]
    public void An_oversized_config_is_refused()
    {
        var json = "{\"peft_type\": \"LORA\", \"pad\": \"" + new string('x', PeftAdapterConfig.MaxBytes) + "\"}";
        Assert.Contains("limit", Assert.Throws<PeftAdapterException>(() => Parse(json)).Message);
    }

    [Fact]
    public void Random_byte_changes_give_a_config_or_a_refusal_never_another_exception()
    {
        var original = Encoding.UTF8.GetBytes(new PeftAdapterFixture { RankPattern = new() { ["q_proj"] = 8 }, LayersToTransform = [1] }.ConfigJson());
        var random = new Random(5);
        for (var round = 0; round < 3000; round++)
        {
            var bytes = (byte[])original.Clone();
            for (var changes = random.Next(1, 4); changes > 0; changes--)
            {
                bytes[random.Next(bytes.Length)] = (byte)"0123456789-.,:\"{}[]etrufalsn\\ \u00ff"[random.Next(31)];
            }
            try
            {
                PeftAdapterConfig.Parse(bytes);
            }
            catch (PeftAdapterException)
            {
            }
        }
    }

    private static PeftAdapterConfig Parse(string json) => PeftAdapterConfig.Parse(Encoding.UTF8.GetBytes(json));
}
