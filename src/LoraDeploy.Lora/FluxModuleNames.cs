using System.Text.RegularExpressions;

namespace LoraDeploy.Lora;

/// <summary>How a FLUX diffusers module relates to its BFL module.</summary>
internal enum FluxRelation
{
    /// <summary>Same weight, another name.</summary>
    Same,

    /// <summary>One of the row thirds of a fused <c>img_attn.qkv</c>/<c>txt_attn.qkv</c>.</summary>
    QkvPart,

    /// <summary>One of q, k, v (h rows each) or proj_mlp (the rest) of a single block's <c>linear1</c>.</summary>
    Linear1Part,

    /// <summary><c>norm_out.linear</c> = <c>final_layer.adaLN_modulation.1</c> with its two row halves (shift, scale) swapped.</summary>
    SwappedHalves,
}

/// <summary>
/// FLUX.1's transformer in diffusers names and in BFL names (diffusers' <c>convert_flux_to_diffusers</c> layout): which
/// BFL module each diffusers one is, whole or a row block of a fused q/k/v. Shared by merge (diffusers adapters onto a
/// BFL checkpoint) and convert (adapters re-emitted in the other naming).
/// </summary>
internal static partial class FluxModuleNames
{
    /// <summary>
    /// FLUX.1 diffusers path → its BFL module and how it relates (diffusers' <c>convert_flux_to_diffusers</c> layout);
    /// <paramref name="part"/> is the row block (0–2 q/k/v, 3 proj_mlp) of a fused module; null when it is none.
    /// </summary>
    public static string? BflOf(string diffusersPath, out FluxRelation relation, out int part)
    {
        (relation, part) = (FluxRelation.Same, 0);
        Match m;
        if ((m = FluxDouble().Match(diffusersPath)).Success)
        {
            var block = $"double_blocks.{m.Groups[1].Value}.";
            var name = m.Groups[2].Value;
            var qkv = Array.IndexOf(ImageQkv, name) is >= 0 and var q ? ("img_attn.qkv", q) : Array.IndexOf(TextQkv, name) is >= 0 and var t ? ("txt_attn.qkv", t) : default;
            if (qkv.Item1 is not null)
            {
                (relation, part) = (FluxRelation.QkvPart, qkv.Item2);
                return block + qkv.Item1;
            }
            return DoubleSame.FirstOrDefault(p => p.Diffusers == name).Bfl is { } same ? block + same : null;
        }
        if ((m = FluxSingle().Match(diffusersPath)).Success)
        {
            var block = $"single_blocks.{m.Groups[1].Value}.";
            var name = m.Groups[2].Value;
            if (Array.IndexOf(Linear1Parts, name) is >= 0 and var index)
            {
                (relation, part) = (FluxRelation.Linear1Part, index);
                return block + "linear1";
            }
            return name switch { "proj_out" => block + "linear2", "norm.linear" => block + "modulation.lin", _ => null };
        }
        if (diffusersPath == "norm_out.linear")
        {
            relation = FluxRelation.SwappedHalves;
        }
        return GlobalSame.FirstOrDefault(p => p.Diffusers == diffusersPath).Bfl;
    }

    /// <summary>FLUX.1 BFL path → its diffusers module(s): one, or the parts of a fused module in row order; null when it is none.</summary>
    public static IReadOnlyList<string>? DiffusersOf(string bflPath, out FluxRelation relation)
    {
        relation = FluxRelation.Same;
        Match m;
        if ((m = BflDouble().Match(bflPath)).Success)
        {
            var block = $"transformer_blocks.{m.Groups[1].Value}.";
            var name = m.Groups[2].Value;
            if (name is "img_attn.qkv" or "txt_attn.qkv")
            {
                relation = FluxRelation.QkvPart;
                return [.. (name[0] == 'i' ? ImageQkv : TextQkv).Select(p => block + p)];
            }
            return DoubleSame.FirstOrDefault(p => p.Bfl == name).Diffusers is { } same ? [block + same] : null;
        }
        if ((m = BflSingle().Match(bflPath)).Success)
        {
            var block = $"single_transformer_blocks.{m.Groups[1].Value}.";
            var name = m.Groups[2].Value;
            if (name == "linear1")
            {
                relation = FluxRelation.Linear1Part;
                return [.. Linear1Parts.Select(p => block + p)];
            }
            return name switch { "linear2" => [block + "proj_out"], "modulation.lin" => [block + "norm.linear"], _ => null };
        }
        if (bflPath == "final_layer.adaLN_modulation.1")
        {
            relation = FluxRelation.SwappedHalves;
        }
        return GlobalSame.FirstOrDefault(p => p.Bfl == bflPath).Diffusers is { } global ? [global] : null;
    }

    private static readonly string[] ImageQkv = ["attn.to_q", "attn.to_k", "attn.to_v"];
    private static readonly string[] TextQkv = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"];
    private static readonly string[] Linear1Parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"];

    private static readonly (string Diffusers, string Bfl)[] DoubleSame =
    [
        ("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
        ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"), ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"),
        ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
    ];

    private static readonly (string Diffusers, string Bfl)[] GlobalSame =
    [
        ("x_embedder", "img_in"), ("context_embedder", "txt_in"), ("proj_out", "final_layer.linear"),
        ("norm_out.linear", "final_layer.adaLN_modulation.1"),
        ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"), ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"), ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"), ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ];

    [GeneratedRegex(@"\Atransformer_blocks\.(\d{1,3})\.(.+)\z")]
    private static partial Regex FluxDouble();

    [GeneratedRegex(@"\Asingle_transformer_blocks\.(\d{1,3})\.(.+)\z")]
    private static partial Regex FluxSingle();

    [GeneratedRegex(@"\Adouble_blocks\.(\d{1,3})\.(.+)\z")]
    private static partial Regex BflDouble();

    [GeneratedRegex(@"\Asingle_blocks\.(\d{1,3})\.(.+)\z")]
    private static partial Regex BflSingle();
}
