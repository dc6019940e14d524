using System.Globalization;
using System.Text.RegularExpressions;
using LoraDeploy.Lora.Merge;

namespace LoraDeploy.Lora.Conversion;

/// <summary>The model an adapter module sits in.</summary>
internal enum ModelPart
{
    /// <summary>SD1.5/SDXL UNet; paths in diffusers block names.</summary>
    Unet,

    /// <summary>FLUX.1 transformer; paths in BFL names (<see cref="ModulePath.Bfl"/>) or diffusers names.</summary>
    Flux,

    /// <summary>CLIP-L (SD1.5's text encoder, SDXL's and FLUX's first); Hugging Face names.</summary>
    ClipL,

    /// <summary>OpenCLIP-bigG in Hugging Face names (SDXL's second text encoder).</summary>
    ClipG,

    /// <summary>T5-XXL (FLUX's second text encoder).</summary>
    T5,
}

/// <summary>A module's place: its model and its dotted path in that model's own names.</summary>
internal sealed record ModulePath(ModelPart Part, string Path, bool Bfl = false);

/// <summary>
/// Module names of SD1.5, SDXL and FLUX.1 adapters in every convention, read into one <see cref="ModulePath"/> and
/// written back in the convention asked for. kohya's underscored names are re-dotted with a vocabulary of the model's
/// identifiers that contain underscores and then checked against the model's module list, so a name that does not
/// map is reported rather than guessed. LDM (single-file) UNet block names are translated to diffusers ones and back
/// (the forward table is the merge library's <see cref="BaseTensorNames.DiffusersToLdm"/>).
/// </summary>
internal static partial class AdapterModuleNames
{
    /// <summary>Reads a module name (any convention), or null when it names no SD1.5/SDXL/FLUX.1 module.</summary>
    /// <param name="kohyaPrefix">The kohya prefix the name had (<c>lora_te_</c>, <c>lora_te1_</c>…), a hint for the architecture.</param>
    /// <param name="style">The name's prefix style, to say which convention the input was in.</param>
    public static ModulePath? Parse(string module, out string? kohyaPrefix, out PrefixStyle style)
    {
        var buffer = new char[module.Length];
        var length = LoraKeys.Normalize(module, buffer, out var component, out style);
        var rest = new string(buffer, 0, length);
        kohyaPrefix = module.StartsWith("lora_", StringComparison.Ordinal) ? module[..(module.Length - length)] : null;
        var path = Redot(rest);

        if (path.StartsWith("text_model.", StringComparison.Ordinal))
        {
            return ClipModule().IsMatch(path) ? new ModulePath(component == Component.TextEncoder2 ? ModelPart.ClipG : ModelPart.ClipL, path) : null;
        }
        if (path.StartsWith("encoder.block.", StringComparison.Ordinal))
        {
            return T5Module().IsMatch(path) ? new ModulePath(ModelPart.T5, path) : null;
        }
        if (component != Component.Denoiser)
        {
            return null;
        }
        if (XLabs().Match(path) is { Success: true } x)
        {
            // XLabs: lora1 is the image stream, lora2 the text stream.
            path = $"double_blocks.{x.Groups[1].Value}.{(x.Groups[3].Value == "1" ? "img" : "txt")}_attn.{x.Groups[2].Value}";
        }
        if (LdmToDiffusers(path) is { } unet)
        {
            return UnetModule().IsMatch(unet) ? new ModulePath(ModelPart.Unet, unet) : null;
        }
        if (UnetModule().IsMatch(path))
        {
            return new ModulePath(ModelPart.Unet, path);
        }
        if (FluxBflModule().IsMatch(path))
        {
            return new ModulePath(ModelPart.Flux, path, Bfl: true);
        }
        return FluxDiffusersModule().IsMatch(path) ? new ModulePath(ModelPart.Flux, path) : null;
    }

    /// <summary>The module's name in <paramref name="convention"/>. FLUX paths must already be in that convention's naming (BFL for kohya).</summary>
    /// <param name="single">The adapter adapts one model only (PEFT then names modules relative to it).</param>
    public static string Render(ModulePath module, AdapterConvention convention, AdapterArchitecture architecture, bool single)
    {
        switch (convention)
        {
            case AdapterConvention.Kohya:
                var path = module.Part == ModelPart.Unet && architecture == AdapterArchitecture.SDXL ? Ldm(module.Path) : module.Path;
                var prefix = module.Part switch
                {
                    ModelPart.Unet or ModelPart.Flux => "lora_unet_",
                    ModelPart.ClipL => architecture == AdapterArchitecture.SD15 ? "lora_te_" : "lora_te1_",
                    ModelPart.ClipG => "lora_te2_",
                    _ => "lora_te3_",
                };
                return prefix + path.Replace('.', '_');
            case AdapterConvention.Diffusers:
                return PipelineComponent(module.Part) + "." + module.Path;
            default:
                return "base_model.model." + (single ? module.Path : PipelineComponent(module.Part) + "." + module.Path);
        }
    }

    /// <summary>The diffusers pipeline component that holds the model.</summary>
    public static string PipelineComponent(ModelPart part) => part switch
    {
        ModelPart.Unet => "unet",
        ModelPart.Flux => "transformer",
        ModelPart.ClipL => "text_encoder",
        // SDXL's OpenCLIP-bigG and FLUX's T5 are both the pipeline's second text encoder.
        _ => "text_encoder_2",
    };

    /// <summary>SDXL's LDM name of a diffusers UNet path (underscored, as kohya writes it).</summary>
    private static string Ldm(string diffusersPath)
    {
        var underscored = diffusersPath.Replace('.', '_');
        var candidates = BaseTensorNames.DiffusersToLdm(underscored).ToList();
        if (candidates.Count == 0)
        {
            throw new AdapterConvertException($"module '{diffusersPath}' has no SDXL single-file (LDM) name");
        }
        // Only an upsampler has two: after the attention (index 2) in SDXL's up blocks 0 and 1, after the resnet in block 2.
        return candidates.Count == 1 || Upsampler().Match(diffusersPath).Groups[1].Value is "0" or "1" ? candidates[0] : candidates[1];
    }

    /// <summary>A diffusers UNet path for an LDM (single-file) one; null when <paramref name="path"/> is not in LDM names.</summary>
    internal static string? LdmToDiffusers(string path)
    {
        Match m;
        if (path == "input_blocks.0.0")
        {
            return "conv_in";
        }
        if (path == "out.2")
        {
            return "conv_out";
        }
        if ((m = TimeEmbed().Match(path)).Success)
        {
            return $"time_embedding.linear_{(m.Groups[1].Value == "0" ? 1 : 2)}";
        }
        if ((m = InputBlock().Match(path)).Success)
        {
            var k = Int(m, 1) - 1;
            if (k < 0)
            {
                return "?";
            }
            var (i, j, rest) = (k / 3, k % 3, m.Groups[3].Value);
            if (m.Groups[2].Value == "1")
            {
                return j < 2 ? $"down_blocks.{i}.attentions.{j}.{rest}" : "?";
            }
            return j == 2 ? rest == "op" ? $"down_blocks.{i}.downsamplers.0.conv" : "?" : Resnet($"down_blocks.{i}.resnets.{j}", rest);
        }
        if ((m = MiddleBlock().Match(path)).Success)
        {
            return m.Groups[1].Value switch
            {
                "1" => "mid_block.attentions.0." + m.Groups[2].Value,
                var n => Resnet($"mid_block.resnets.{(n == "0" ? 0 : 1)}", m.Groups[2].Value),
            };
        }
        if ((m = OutputBlock().Match(path)).Success)
        {
            var (i, j, sub, rest) = (Int(m, 1) / 3, Int(m, 1) % 3, m.Groups[2].Value, m.Groups[3].Value);
            return sub switch
            {
                "0" => Resnet($"up_blocks.{i}.resnets.{j}", rest),
                _ when rest == "conv" => j == 2 ? $"up_blocks.{i}.upsamplers.0.conv" : "?",
                "1" => $"up_blocks.{i}.attentions.{j}.{rest}",
                _ => "?",
            };
        }
        return null;

        // "?" marks an LDM name with no diffusers counterpart: not a module this table knows.
        static string Resnet(string block, string rest) => rest switch
        {
            "in_layers.2" => block + ".conv1",
            "out_layers.3" => block + ".conv2",
            "emb_layers.1" => block + ".time_emb_proj",
            "skip_connection" => block + ".conv_shortcut",
            _ => "?",
        };
    }

    private static int Int(Match m, int group) => int.Parse(m.Groups[group].ValueSpan, NumberStyles.None, CultureInfo.InvariantCulture);

    /// <summary>Identifiers of these models that contain underscores; every other underscore in a kohya name was a dot.</summary>
    private static readonly HashSet<string> Words = new(StringComparer.Ordinal)
    {
        // SD UNet, diffusers and LDM
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out",
        "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "time_embedding", "linear_1", "linear_2",
        "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection", "time_embed",
        // CLIP, T5
        "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "wi_0", "wi_1",
        // FLUX, diffusers and BFL
        "single_transformer_blocks", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context", "proj_mlp", "norm1_context",
        "norm_out", "x_embedder", "context_embedder", "time_text_embed", "timestep_embedder", "text_embedder", "guidance_embedder",
        "double_blocks", "single_blocks", "img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod",
        "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "in_layer", "out_layer", "final_layer", "adaLN_modulation",
        // XLabs
        "qkv_lora1", "qkv_lora2", "proj_lora1", "proj_lora2",
    };

    /// <summary>Underscored name → dotted path, joining pieces that form one of <see cref="Words"/> (longest first).</summary>
    internal static string Redot(string underscored)
    {
        var pieces = underscored.Split('_');
        var parts = new List<string>(pieces.Length);
        for (var i = 0; i < pieces.Length;)
        {
            var taken = 1;
            for (var n = Math.Min(3, pieces.Length - i); n > 1; n--)
            {
                if (Words.Contains(string.Join('_', pieces, i, n)))
                {
                    taken = n;
                    break;
                }
            }
            parts.Add(string.Join('_', pieces, i, taken));
            i += taken;
        }
        return string.Join('.', parts);
    }

    [GeneratedRegex(@"\Atext_model\.encoder\.layers\.\d{1,3}\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])\z")]
    private static partial Regex ClipModule();

    [GeneratedRegex(@"\Aencoder\.block\.\d{1,3}\.layer\.\d{1,2}\.(?:SelfAttention\.[qkvo]|DenseReluDense\.(?:wi_0|wi_1|wi|wo))\z")]
    private static partial Regex T5Module();

    [GeneratedRegex(@"\A(?:(?:(?:down|up)_blocks\.\d{1,2}\.attentions\.\d{1,2}|mid_block\.attentions\.0)\.(?:proj_in|proj_out|transformer_blocks\.\d{1,2}\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))|(?:(?:down|up)_blocks\.\d{1,2}\.resnets\.\d{1,2}|mid_block\.resnets\.[01])\.(?:conv1|conv2|time_emb_proj|conv_shortcut)|down_blocks\.\d{1,2}\.downsamplers\.0\.conv|up_blocks\.\d{1,2}\.upsamplers\.0\.conv|conv_in|conv_out|time_embedding\.linear_[12])\z")]
    private static partial Regex UnetModule();

    [GeneratedRegex(@"\A(?:double_blocks\.\d{1,3}\.(?:img|txt)_(?:attn\.(?:qkv|proj)|mlp\.[02]|mod\.lin)|single_blocks\.\d{1,3}\.(?:linear1|linear2|modulation\.lin)|img_in|txt_in|final_layer\.linear|final_layer\.adaLN_modulation\.1|(?:time_in|vector_in|guidance_in)\.(?:in_layer|out_layer))\z")]
    private static partial Regex FluxBflModule();

    [GeneratedRegex(@"\A(?:transformer_blocks\.\d{1,3}\.(?:attn\.(?:to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)|ff\.net\.(?:0\.proj|2)|ff_context\.net\.(?:0\.proj|2)|norm1\.linear|norm1_context\.linear)|single_transformer_blocks\.\d{1,3}\.(?:attn\.(?:to_q|to_k|to_v)|proj_mlp|proj_out|norm\.linear)|x_embedder|context_embedder|proj_out|norm_out\.linear|time_text_embed\.(?:timestep|text|guidance)_embedder\.linear_[12])\z")]
    private static partial Regex FluxDiffusersModule();

    [GeneratedRegex(@"\Adouble_blocks\.(\d{1,3})\.processor\.(qkv|proj)_lora([12])\z")]
    private static partial Regex XLabs();





    [GeneratedRegex(@"\Aup_blocks\.(\d{1,2})\.upsamplers\.")]
    private static partial Regex Upsampler();

    [GeneratedRegex(@"\Atime_embed\.([02])\z")]
    private static partial Regex TimeEmbed();

    [GeneratedRegex(@"\Ainput_blocks\.(\d{1,2})\.([01])\.(.+)\z")]
    private static partial Regex InputBlock();

    [GeneratedRegex(@"\Amiddle_block\.([012])\.(.+)\z")]
    private static partial Regex MiddleBlock();

    [GeneratedRegex(@"\Aoutput_blocks\.(\d{1,2})\.([012])\.(.+)\z")]
    private static partial Regex OutputBlock();
}
