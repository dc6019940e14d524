namespace LoraDeploy.Lora;

/// <summary>What one tensor is within an adapter module (reference §2.1 suffix table).</summary>
internal enum ParamKind
{
    Unknown,
    PlainWeight,
    Down,
    Up,
    Mid,
    UpBias,
    Alpha,
    DoraScale,
    Magnitude,
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    HadaT,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
    LokrT2,
    OnInput,
    GloraA1,
    GloraA2,
    GloraB1,
    GloraB2,
    GloraBm,
    Diff,
    DiffB,
    NormW,
    NormB,
    OftBlocks,
    Rescale,
    Scale,
    ReshapeWeight,
    SetWeight,
    EmbeddingA,
    EmbeddingB,
}

/// <summary>Which part of the pipeline a module adapts, from its key prefix (reference §2.2).</summary>
internal enum Component
{
    Denoiser,
    TextEncoder1,
    TextEncoder2,
    TextEncoder3,
    Lllite,
}

/// <summary>Key-prefix style, used to name the file format.</summary>
internal enum PrefixStyle
{
    Kohya,
    OneTrainer,
    Lycoris,
    Peft,
    DiffusionModel,
    Diffusers,
    ComfyText,
    Bare,
}

internal static class LoraKeys
{
    /// <summary>The short name a parameter kind is filed under in a module (<c>down</c>, <c>hada_w1_a</c>, …); null for what is not an adapter factor.</summary>
    public static string? ParamName(ParamKind kind, string key) => kind switch
    {
        ParamKind.Down => "down",
        ParamKind.Up => "up",
        ParamKind.Mid => "mid",
        ParamKind.UpBias => "up_bias",
        ParamKind.Alpha => "alpha",
        ParamKind.DoraScale => "dora_scale",
        ParamKind.Magnitude => "magnitude",
        ParamKind.HadaW1A => "hada_w1_a",
        ParamKind.HadaW1B => "hada_w1_b",
        ParamKind.HadaW2A => "hada_w2_a",
        ParamKind.HadaW2B => "hada_w2_b",
        ParamKind.HadaT => key[(key.LastIndexOf('.') + 1)..],
        ParamKind.LokrW1 => "lokr_w1",
        ParamKind.LokrW1A => "lokr_w1_a",
        ParamKind.LokrW1B => "lokr_w1_b",
        ParamKind.LokrW2 => "lokr_w2",
        ParamKind.LokrW2A => "lokr_w2_a",
        ParamKind.LokrW2B => "lokr_w2_b",
        ParamKind.LokrT2 => "lokr_t2",
        ParamKind.Diff => "diff",
        ParamKind.DiffB => "diff_b",
        ParamKind.EmbeddingA => "embedding_a",
        ParamKind.EmbeddingB => "embedding_b",
        _ => null,
    };

    /// <summary>Splits a tensor name into its module name (always a prefix of the key, given as its length) and parameter kind.</summary>
    public static ParamKind Split(ReadOnlySpan<char> key, out int module)
    {
        var lastDot = key.LastIndexOf('.');
        if (lastDot <= 0)
        {
            module = key.Length;
            return ParamKind.Unknown;
        }
        var last = key[(lastDot + 1)..];
        var head = key[..lastDot];
        var kind = last switch
        {
            "alpha" => ParamKind.Alpha,
            "dora_scale" => ParamKind.DoraScale,
            "lora_magnitude_vector" => ParamKind.Magnitude,
            "hada_w1_a" => ParamKind.HadaW1A,
            "hada_w1_b" => ParamKind.HadaW1B,
            "hada_w2_a" => ParamKind.HadaW2A,
            "hada_w2_b" => ParamKind.HadaW2B,
            "hada_t1" or "hada_t2" => ParamKind.HadaT,
            "lokr_w1" => ParamKind.LokrW1,
            "lokr_w1_a" => ParamKind.LokrW1A,
            "lokr_w1_b" => ParamKind.LokrW1B,
            "lokr_w2" => ParamKind.LokrW2,
            "lokr_w2_a" => ParamKind.LokrW2A,
            "lokr_w2_b" => ParamKind.LokrW2B,
            "lokr_t2" => ParamKind.LokrT2,
            "on_input" => ParamKind.OnInput,
            "diff" => ParamKind.Diff,
            "diff_b" => ParamKind.DiffB,
            "w_norm" => ParamKind.NormW,
            "b_norm" => ParamKind.NormB,
            "oft_blocks" => ParamKind.OftBlocks,
            "rescale" => ParamKind.Rescale,
            "scale" => ParamKind.Scale,
            "reshape_weight" => ParamKind.ReshapeWeight,
            "set_weight" => ParamKind.SetWeight,
            "lora_A" => ParamKind.Down,
            "lora_B" => ParamKind.Up,
            "lora_embedding_A" => ParamKind.EmbeddingA,
            "lora_embedding_B" => ParamKind.EmbeddingB,
            _ => ParamKind.Unknown,
        };
        if (kind != ParamKind.Unknown)
        {
            module = lastDot;
            return kind;
        }
        if (last is not ("weight" or "bias"))
        {
            module = key.Length;
            return ParamKind.Unknown;
        }

        var isBias = last is "bias";
        var secondDot = head.LastIndexOf('.');
        var second = secondDot < 0 ? head : head[(secondDot + 1)..];
        var rest = secondDot < 0 ? ReadOnlySpan<char>.Empty : head[..secondDot];
        if (second is "default")
        {
            // PEFT with an adapter name: <module>.lora_A.default.weight
            var thirdDot = rest.LastIndexOf('.');
            var third = thirdDot < 0 ? rest : rest[(thirdDot + 1)..];
            if (!isBias && third is "lora_A" or "lora_B" && thirdDot > 0)
            {
                module = thirdDot;
                return third is "lora_A" ? ParamKind.Down : ParamKind.Up;
            }
        }
        kind = isBias
            ? second is "lora_B" or "lora_up" ? ParamKind.UpBias : ParamKind.Unknown
            : second switch
            {
                "lora_down" or "lora_A" => ParamKind.Down,
                "lora_up" or "lora_B" => ParamKind.Up,
                "lora_mid" => ParamKind.Mid,
                "a1" => ParamKind.GloraA1,
                "a2" => ParamKind.GloraA2,
                "b1" => ParamKind.GloraB1,
                "b2" => ParamKind.GloraB2,
                "bm" => ParamKind.GloraBm,
                "down" when IsLoraHolder(rest) => ParamKind.Down,
                "up" when IsLoraHolder(rest) => ParamKind.Up,
                _ => ParamKind.Unknown,
            };
        if (kind != ParamKind.Unknown && secondDot > 0)
        {
            if (second is "down" or "up" && rest.EndsWith(".lora") || rest.EndsWith(".lora_linear_layer"))
            {
                // Old diffusers: <module>.lora.down.weight / <module>.lora_linear_layer.down.weight
                module = rest.LastIndexOf('.');
            }
            else
            {
                module = secondDot;
            }
            return kind;
        }
        module = lastDot;
        return isBias ? ParamKind.Unknown : ParamKind.PlainWeight;
    }

    // XLabs (qkv_lora1), old diffusers attention processors (to_q_lora), ".lora." and ".lora_linear_layer.".
    private static bool IsLoraHolder(ReadOnlySpan<char> module)
    {
        var dot = module.LastIndexOf('.');
        var leaf = dot < 0 ? module : module[(dot + 1)..];
        return leaf is "lora" or "lora_linear_layer" || leaf.EndsWith("_lora") || leaf.EndsWith("_lora1") || leaf.EndsWith("_lora2");
    }

    private static readonly (string Prefix, Component Component, PrefixStyle Style)[] KohyaPrefixes =
    [
        ("lora_unet_", Component.Denoiser, PrefixStyle.Kohya),
        ("lora_transformer_", Component.Denoiser, PrefixStyle.OneTrainer),
        ("lora_te1_", Component.TextEncoder1, PrefixStyle.Kohya),
        ("lora_te2_", Component.TextEncoder2, PrefixStyle.Kohya),
        ("lora_te3_", Component.TextEncoder3, PrefixStyle.Kohya),
        ("lora_te_", Component.TextEncoder1, PrefixStyle.Kohya),
        ("lora_prior_unet_", Component.Denoiser, PrefixStyle.Kohya),
        ("lora_prior_te_", Component.TextEncoder1, PrefixStyle.Kohya),
        ("lllite_unet_", Component.Lllite, PrefixStyle.Kohya),
        ("lllite_dit_", Component.Lllite, PrefixStyle.Kohya),
        ("lycoris_", Component.Denoiser, PrefixStyle.Lycoris),
    ];

    /// <summary>
    /// Classifies a module by prefix and writes its name with the prefix removed and dots as underscores into
    /// <paramref name="destination"/> (at least as long as <paramref name="module"/>); returns its length.
    /// </summary>
    public static int Normalize(ReadOnlySpan<char> module, Span<char> destination, out Component component, out PrefixStyle style)
    {
        component = Component.Denoiser;
        var rest = module;
        if (module.StartsWith("lora_") || module.StartsWith("lllite_") || module.StartsWith("lycoris_"))
        {
            style = PrefixStyle.Bare;
            foreach (var (prefix, prefixComponent, prefixStyle) in KohyaPrefixes)
            {
                if (module.StartsWith(prefix))
                {
                    component = prefixComponent;
                    style = prefixStyle;
                    rest = module[prefix.Length..];
                    break;
                }
            }
            return Underscored(rest, destination);
        }

        style = PrefixStyle.Bare;
        if (rest.StartsWith("base_model.model."))
        {
            rest = rest[17..];
            style = PrefixStyle.Peft;
        }
        if (rest.StartsWith("model.diffusion_model."))
        {
            rest = rest[22..];
            style = style == PrefixStyle.Peft ? style : PrefixStyle.DiffusionModel;
        }
        else if (rest.StartsWith("diffusion_model."))
        {
            rest = rest[16..];
            style = style == PrefixStyle.Peft ? style : PrefixStyle.DiffusionModel;
        }
        else if (rest.StartsWith("transformer.") || rest.StartsWith("unet."))
        {
            rest = rest[(rest.IndexOf('.') + 1)..];
            style = style == PrefixStyle.Peft ? style : PrefixStyle.Diffusers;
        }
        else if (rest.StartsWith("text_encoder.") || rest.StartsWith("text_encoder_2.") || rest.StartsWith("text_encoder_3."))
        {
            component = rest[12] == '.' ? Component.TextEncoder1 : rest[13] == '2' ? Component.TextEncoder2 : Component.TextEncoder3;
            rest = rest[(rest.IndexOf('.') + 1)..];
            style = style == PrefixStyle.Peft ? style : PrefixStyle.Diffusers;
        }
        else if (rest.StartsWith("text_encoders."))
        {
            rest = rest[14..];
            component = rest.StartsWith("clip_g.") ? Component.TextEncoder2 : rest.StartsWith("t5xxl.") ? Component.TextEncoder3 : Component.TextEncoder1;
            rest = rest[(rest.IndexOf('.') + 1)..];
            style = PrefixStyle.ComfyText;
        }
        return Underscored(rest, destination);
    }

    private static int Underscored(ReadOnlySpan<char> name, Span<char> destination)
    {
        name.CopyTo(destination);
        destination[..name.Length].Replace('.', '_');
        return name.Length;
    }
}
