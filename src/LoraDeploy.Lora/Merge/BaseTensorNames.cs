using System.Globalization;
using System.Text.RegularExpressions;

namespace LoraDeploy.Lora.Merge;

/// <summary>
/// Maps an adapter's module names onto the base file's own tensor names. Dotted names (PEFT, diffusers, ComfyUI
/// <c>diffusion_model.</c>) are looked up as they are, with their wrapper prefix removed; kohya's underscored names
/// are compared with the base's names after the same dots-to-underscores folding, under the prefixes single-file
/// checkpoints use (SD1.5 <c>model.diffusion_model.</c> / <c>cond_stage_model.transformer.</c>, SDXL
/// <c>conditioner.embedders.0.transformer.</c>), and SD1.5-style diffusers block names are translated to the LDM
/// block names single-file checkpoints use (A1111's <c>convert_diffusers_name_to_compvis</c>). Hugging Face CLIP
/// names on an OpenCLIP text encoder (SDXL's second, SD2's) map to its modules, q/k/v onto row thirds of the fused
/// <c>attn.in_proj_weight</c>.
/// </summary>
/// <summary>Where a module lands: a base weight (and its bias), whole or a block of its rows (a fused q/k/v projection).</summary>
internal sealed record BaseTarget(string Weight, string Bias, long RowStart, long? RowCount)
{
    public static BaseTarget Module(string module) => new(module + ".weight", module + ".bias", 0, null);
}

internal sealed partial class BaseTensorNames
{
    private readonly Dictionary<string, long[]> _shapes;
    // Underscored module path (no ".weight") → base module path; null where two base modules fold to the same name.
    private readonly Dictionary<string, string?> _underscored = new(StringComparer.Ordinal);

    public BaseTensorNames(IEnumerable<(string Name, long[] Shape)> tensors)
    {
        _shapes = tensors.ToDictionary(t => t.Name, t => t.Shape, StringComparer.Ordinal);
        foreach (var name in _shapes.Keys)
        {
            if (name.EndsWith(".weight", StringComparison.Ordinal))
            {
                var module = name[..^".weight".Length];
                var folded = module.Replace('.', '_');
                _underscored[folded] = _underscored.ContainsKey(folded) ? null : module;
            }
        }
    }

    /// <summary>The base tensor(s) an adapter module targets, or null.</summary>
    /// <exception cref="LoraMergeException">The name folds onto two base modules.</exception>
    public BaseTarget? Resolve(string adapterModule)
    {
        foreach (var candidate in DottedCandidates(adapterModule))
        {
            if (_shapes.ContainsKey(candidate + ".weight"))
            {
                return BaseTarget.Module(candidate);
            }
        }
        var normalized = new char[adapterModule.Length];
        var length = LoraKeys.Normalize(adapterModule, normalized, out var component, out _);
        var rest = new string(normalized, 0, length);
        foreach (var candidate in UnderscoredCandidates(rest, component))
        {
            if (_underscored.TryGetValue(candidate, out var module))
            {
                return module is null
                    ? throw new LoraMergeException($"adapter module '{adapterModule}' matches more than one base tensor once dots are read as underscores ({candidate})")
                    : BaseTarget.Module(module);
            }
        }
        return component is Component.TextEncoder1 or Component.TextEncoder2 ? OpenClip(rest, component) : DiffusersFlux(adapterModule);
    }

    /// <summary>
    /// FLUX.1 diffusers names (ai-toolkit, diffusers PEFT) on a BFL-layout checkpoint, as diffusers'
    /// <c>convert_flux_to_diffusers</c> splits it: q/k/v are row thirds of <c>img_attn.qkv</c>/<c>txt_attn.qkv</c>, and a
    /// single block's q/k/v and <c>proj_mlp</c> are row blocks of <c>linear1</c> (h, h, h, 4h with h its input width).
    /// <c>norm_out</c> is not mapped: BFL stores its shift and scale halves the other way round.
    /// </summary>
    private BaseTarget? DiffusersFlux(string adapterModule)
    {
        var name = adapterModule;
        foreach (var wrapper in (string[])["base_model.model.", "transformer.", "diffusion_model."])
        {
            name = name.StartsWith(wrapper, StringComparison.Ordinal) ? name[wrapper.Length..] : name;
        }
        if (FluxModuleNames.BflOf(name, out var relation, out var part) is not { } module)
        {
            return null;
        }
        switch (relation)
        {
            case FluxRelation.Same:
                return Whole(module);
            case FluxRelation.QkvPart:
                return Rows(module, part, 3);
            case FluxRelation.Linear1Part:
                var width = _shapes.TryGetValue(module + ".weight", out var shape) && shape.Length == 2 ? shape[1] : 0;
                return part < 3
                    ? Block(module, part * width, width, width)
                    : width > 0 && shape![0] > 3 * width ? Block(module, 3 * width, shape[0] - 3 * width, width) : null;
            default:
                // norm_out is not mapped: BFL stores its shift and scale halves the other way round.
                return null;
        }

        BaseTarget? Whole(string module) => _shapes.ContainsKey(module + ".weight") ? BaseTarget.Module(module) : null;

        BaseTarget? Rows(string module, int part, int parts) =>
            _shapes.TryGetValue(module + ".weight", out var fused) && fused.Length == 2 && fused[0] % parts == 0
                ? new BaseTarget(module + ".weight", module + ".bias", part * (fused[0] / parts), fused[0] / parts)
                : null;

        BaseTarget? Block(string module, long start, long rows, long width) =>
            width > 0 && _shapes.TryGetValue(module + ".weight", out var fused) && start + rows <= fused[0]
                ? new BaseTarget(module + ".weight", module + ".bias", start, rows)
                : null;
    }

    /// <summary>
    /// HF CLIP names on an OpenCLIP encoder: SDXL's second (<c>conditioner.embedders.1.model.</c>) or SD2's
    /// (<c>cond_stage_model.model.</c>). q/k/v are row thirds of <c>attn.in_proj_weight</c>, as in
    /// A1111/ComfyUI's key maps.
    /// </summary>
    private BaseTarget? OpenClip(string rest, Component component)
    {
        var m = ClipLayer().Match(rest);
        if (!m.Success)
        {
            return null;
        }
        var prefix = (component == Component.TextEncoder2 ? "conditioner.embedders.1.model." : "cond_stage_model.model.") + $"transformer.resblocks.{m.Groups[1].Value}.";
        var part = m.Groups[2].Value;
        if (part is "self_attn_q_proj" or "self_attn_k_proj" or "self_attn_v_proj")
        {
            var weight = prefix + "attn.in_proj_weight";
            if (!_shapes.TryGetValue(weight, out var shape) || shape.Length != 2 || shape[0] % 3 != 0)
            {
                return null;
            }
            var rows = shape[0] / 3;
            var third = part[10] switch { 'q' => 0, 'k' => 1, _ => 2 };
            return new BaseTarget(weight, prefix + "attn.in_proj_bias", third * rows, rows);
        }
        var module = prefix + part switch
        {
            "self_attn_out_proj" => "attn.out_proj",
            "mlp_fc1" => "mlp.c_fc",
            _ => "mlp.c_proj",
        };
        return _shapes.ContainsKey(module + ".weight") ? BaseTarget.Module(module) : null;
    }

    [GeneratedRegex(@"\Atext_model_encoder_layers_(\d{1,3})_(self_attn_(?:q|k|v|out)_proj|mlp_fc1|mlp_fc2)\z")]
    private static partial Regex ClipLayer();

    private static IEnumerable<string> DottedCandidates(string module)
    {
        if (module.StartsWith("lora_", StringComparison.Ordinal) || module.StartsWith("lycoris_", StringComparison.Ordinal))
        {
            yield break;
        }
        var name = module.StartsWith("base_model.model.", StringComparison.Ordinal) ? module["base_model.model.".Length..] : module;
        yield return name;
        if (name.StartsWith("diffusion_model.", StringComparison.Ordinal))
        {
            // ComfyUI generic names against an SD single-file checkpoint; and against a bare BFL file.
            yield return "model." + name;
            yield return name["diffusion_model.".Length..];
        }
        foreach (var wrapper in (string[])["transformer.", "unet.", "text_encoder.", "text_encoder_2."])
        {
            if (name.StartsWith(wrapper, StringComparison.Ordinal))
            {
                // diffusers pipeline names against the component's own file.
                yield return name[wrapper.Length..];
            }
        }
    }

    private static IEnumerable<string> UnderscoredCandidates(string rest, Component component)
    {
        switch (component)
        {
            case Component.Denoiser:
                yield return "model_diffusion_model_" + rest;
                yield return "diffusion_model_" + rest;
                yield return rest;
                foreach (var ldm in DiffusersToLdm(rest))
                {
                    yield return "model_diffusion_model_" + ldm;
                    yield return "diffusion_model_" + ldm;
                }
                break;
            case Component.TextEncoder1:
                yield return "cond_stage_model_transformer_" + rest;
                yield return "conditioner_embedders_0_transformer_" + rest;
                yield return rest;
                break;
            default:
                yield return rest;
                break;
        }
    }

    /// <summary>SD-style diffusers UNet block names (underscored) → LDM names; more than one where the layout is ambiguous.</summary>
    internal static IEnumerable<string> DiffusersToLdm(string name)
    {
        Match m;
        if ((m = ConvIn().Match(name)).Success)
        {
            yield return "input_blocks_0_0" + m.Groups[1].Value;
        }
        else if ((m = ConvOut().Match(name)).Success)
        {
            yield return "out_2" + m.Groups[1].Value;
        }
        else if ((m = TimeEmbedding().Match(name)).Success)
        {
            yield return $"time_embed_{Int(m, 1) * 2 - 2}{m.Groups[2].Value}";
        }
        else if ((m = DownBlock().Match(name)).Success)
        {
            var attention = m.Groups[2].Value == "attentions";
            yield return $"input_blocks_{1 + Int(m, 1) * 3 + Int(m, 3)}_{(attention ? 1 : 0)}_{ResnetSuffix(m.Groups[4].Value, attention)}";
        }
        else if ((m = MidBlock().Match(name)).Success)
        {
            var attention = m.Groups[1].Value == "attentions";
            yield return $"middle_block_{(attention ? 1 : Int(m, 2) * 2)}_{ResnetSuffix(m.Groups[3].Value, attention)}";
        }
        else if ((m = UpBlock().Match(name)).Success)
        {
            var attention = m.Groups[2].Value == "attentions";
            yield return $"output_blocks_{Int(m, 1) * 3 + Int(m, 3)}_{(attention ? 1 : 0)}_{ResnetSuffix(m.Groups[4].Value, attention)}";
        }
        else if ((m = Downsampler().Match(name)).Success)
        {
            yield return $"input_blocks_{3 + Int(m, 1) * 3}_0_op{m.Groups[2].Value}";
        }
        else if ((m = Upsampler().Match(name)).Success)
        {
            // The upsampler follows the attention block where the up block has one (index 2), else the resnet (index 1).
            yield return $"output_blocks_{2 + Int(m, 1) * 3}_2_conv{m.Groups[2].Value}";
            yield return $"output_blocks_{2 + Int(m, 1) * 3}_1_conv{m.Groups[2].Value}";
        }
    }

    private static int Int(Match m, int group) => int.Parse(m.Groups[group].ValueSpan, NumberStyles.None, CultureInfo.InvariantCulture);

    private static string ResnetSuffix(string suffix, bool attention)
    {
        if (attention)
        {
            return suffix;
        }
        foreach (var (diffusers, ldm) in ResnetNames)
        {
            if (suffix == diffusers || suffix.StartsWith(diffusers + "_", StringComparison.Ordinal))
            {
                return ldm + suffix[diffusers.Length..];
            }
        }
        return suffix;
    }

    private static readonly (string Diffusers, string Ldm)[] ResnetNames =
    [
        ("conv1", "in_layers_2"), ("conv2", "out_layers_3"), ("norm1", "in_layers_0"), ("norm2", "out_layers_0"),
        ("time_emb_proj", "emb_layers_1"), ("conv_shortcut", "skip_connection"),
    ];

    [GeneratedRegex(@"\Aconv_in(.*)\z")]
    private static partial Regex ConvIn();

    [GeneratedRegex(@"\Aconv_out(.*)\z")]
    private static partial Regex ConvOut();

    [GeneratedRegex(@"\Atime_embedding_linear_(\d{1,3})(.*)\z")]
    private static partial Regex TimeEmbedding();

    [GeneratedRegex(@"\Adown_blocks_(\d{1,3})_(attentions|resnets)_(\d{1,3})_(.+)\z")]
    private static partial Regex DownBlock();

    [GeneratedRegex(@"\Amid_block_(attentions|resnets)_(\d{1,3})_(.+)\z")]
    private static partial Regex MidBlock();

    [GeneratedRegex(@"\Aup_blocks_(\d{1,3})_(attentions|resnets)_(\d{1,3})_(.+)\z")]
    private static partial Regex UpBlock();

    [GeneratedRegex(@"\Adown_blocks_(\d{1,3})_downsamplers_0_conv(.*)\z")]
    private static partial Regex Downsampler();

    [GeneratedRegex(@"\Aup_blocks_(\d{1,3})_upsamplers_0_conv(.*)\z")]
    private static partial Regex Upsampler();
}
