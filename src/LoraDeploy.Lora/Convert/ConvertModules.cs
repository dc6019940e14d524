using System.Buffers.Binary;
using System.Globalization;
using LoraDeploy.Lora.Merge;
using LoraDeploy.Lora.Safetensors;

namespace LoraDeploy.Lora.Conversion;

/// <summary>One tensor's bytes as read (or assembled, when <see cref="Built"/>).</summary>
internal sealed record RawTensor(string Dtype, long[] Shape, byte[] Bytes, bool Built = false)
{
    public int ElementSize => SafetensorsDtype.BitSize(Dtype) / 8;

    public long Rows => Shape.Length == 0 ? 1 : Shape[0];

    /// <summary>The value of a one-element tensor (alpha).</summary>
    public double Scalar(string what)
    {
        if (SafetensorsTensor.CountElements(Shape) != 1)
        {
            throw new AdapterConvertException($"{what} has shape {ShapeText(Shape)}; it must hold one value");
        }
        return Dtype switch
        {
            "F64" => BinaryPrimitives.ReadDoubleLittleEndian(Bytes),
            _ when FloatCodec.IsSupported(Dtype) => Decode(),
            _ => throw new AdapterConvertException($"{what} is {Dtype}; alpha must be F64, F32, F16 or BF16"),
        };

        double Decode()
        {
            Span<float> value = stackalloc float[1];
            FloatCodec.Decode(Bytes, Dtype, value);
            return value[0];
        }
    }

    /// <summary>Rows [start, start + count) of the first axis; the bytes are a copy of the input's, untouched.</summary>
    public RawTensor RowSlice(long start, long count, long[]? shape = null)
    {
        var rowBytes = Shape.Length == 0 ? Bytes.Length : Bytes.Length / Shape[0];
        return new RawTensor(Dtype, shape ?? [count, .. Shape[1..]], Bytes.AsSpan((int)(start * rowBytes), (int)(count * rowBytes)).ToArray(), Built);
    }

    /// <summary>A scalar holding <paramref name="value"/> in <paramref name="dtype"/> when that dtype holds it exactly, else in F32.</summary>
    public static RawTensor Alpha(double value, string dtype)
    {
        if (FloatCodec.IsSupported(dtype) && dtype != "F32")
        {
            var bytes = new byte[2];
            FloatCodec.Encode([(float)value], dtype, bytes);
            var back = new RawTensor(dtype, [], bytes, Built: true);
            if (back.Scalar("alpha") == value)
            {
                return back;
            }
        }
        var f32 = new byte[4];
        BinaryPrimitives.WriteSingleLittleEndian(f32, (float)value);
        return new RawTensor("F32", [], f32, Built: true);
    }

    public static string ShapeText(long[] shape) => "[" + string.Join(", ", shape) + "]";
}

/// <summary>An adapter module: its tensors by parameter (down, up, alpha, dora_scale, magnitude, up_bias, hada_*, lokr_*, diff…).</summary>
internal sealed class ConvertModule
{
    /// <summary>The module's name in the input (for messages).</summary>
    public required string Source { get; init; }

    public required ModulePath Path { get; init; }

    /// <summary>LoRA, LoCon, LoCon (Tucker), LoHa, LoKr or Full.</summary>
    public required string Type { get; init; }

    public required Dictionary<string, RawTensor> Params { get; init; }

    /// <summary>The alpha from a PEFT config (already alpha/√r·r with rsLoRA), when the module has no alpha tensor.</summary>
    public double? ConfigAlpha { get; init; }

    public bool IsLora => Type is "LoRA" or "LoCon";

    public RawTensor Down => Params["down"];

    public RawTensor Up => Params["up"];

    public long Rank => Down.Shape[0];

    /// <summary>alpha, or null for "no alpha" (scale 1).</summary>
    public double? Alpha => Params.TryGetValue("alpha", out var alpha) ? alpha.Scalar($"alpha of module '{Source}'") : ConfigAlpha;

    /// <summary>alpha/rank, the factor the delta is applied with.</summary>
    public double Scale => Alpha is { } alpha ? alpha / Rank : 1.0;

    /// <summary>The DoRA magnitude (PEFT's or LyCORIS'), if any.</summary>
    public RawTensor? Dora => Params.GetValueOrDefault("magnitude") ?? Params.GetValueOrDefault("dora_scale");

    /// <summary>True when the DoRA magnitude is per output row ([out] or [out, 1, …]); false per input channel ([1, in, …]).</summary>
    public bool DoraPerOutputRow
    {
        get
        {
            var dora = Dora!;
            return Params.ContainsKey("magnitude") || dora.Shape.Length > 0 && dora.Shape[0] == Up.Shape[0] && (dora.Shape[0] != 1 || Down.Shape[1] == 1);
        }
    }

    public ConvertModule With(ModulePath path, Dictionary<string, RawTensor>? parameters = null) => new()
    {
        Source = Source, Path = path, Type = Type, Params = parameters ?? Params, ConfigAlpha = ConfigAlpha,
    };
}

/// <summary>FLUX's fused modules split and assembled exactly: only bytes are moved, never values changed.</summary>
internal static class FusedModules
{
    /// <summary>
    /// A fused module (img_attn.qkv, txt_attn.qkv, linear1) as its diffusers parts: each part gets lora_A as it is and
    /// its rows of lora_B, so that its delta is exactly its rows of the fused delta, at the same alpha and rank.
    /// </summary>
    public static List<ConvertModule> Split(ConvertModule fused, IReadOnlyList<string> parts, FluxRelation relation)
    {
        RequireLora(fused, "split into q, k, v" + (relation == FluxRelation.Linear1Part ? " and proj_mlp" : ""));
        var rows = fused.Up.Shape[0];
        var width = fused.Down.Shape[1];
        long[] partRows = relation == FluxRelation.QkvPart
            ? rows % 3 == 0 ? [rows / 3, rows / 3, rows / 3] : throw Problem(fused, $"its lora_up has {rows} rows, not three equal thirds")
            : rows > 3 * width ? [width, width, width, rows - 3 * width] : throw Problem(fused, $"its lora_up has {rows} rows, not q, k, v ({width} each) and an MLP block");
        if (fused.Dora is not null && !fused.DoraPerOutputRow)
        {
            throw Problem(fused, "its DoRA magnitude is per input channel, a norm over all the fused rows that cannot be split exactly");
        }
        var result = new List<ConvertModule>(parts.Count);
        long start = 0;
        for (var i = 0; i < parts.Count; i++)
        {
            var p = new Dictionary<string, RawTensor>(fused.Params, StringComparer.Ordinal)
            {
                ["up"] = fused.Up.RowSlice(start, partRows[i]),
            };
            foreach (var rowwise in (string[])["up_bias", "magnitude", "dora_scale"])
            {
                if (p.TryGetValue(rowwise, out var tensor))
                {
                    p[rowwise] = tensor.RowSlice(start, partRows[i]);
                }
            }
            result.Add(fused.With(new ModulePath(ModelPart.Flux, parts[i]), p));
            start += partRows[i];
        }
        return result;
    }

    /// <summary>
    /// diffusers q/k/v (and proj_mlp) parts as one fused module: lora_A stacked, lora_B block-diagonal, the rank the
    /// sum of the parts' ranks and alpha scaled with it, so each part's rows get exactly their delta. Absent parts get
    /// zero rows. The parts must share alpha/rank, else no single alpha would do.
    /// </summary>
    public static ConvertModule Fuse(string bflPath, ConvertModule?[] parts, FluxRelation relation, out string grown)
    {
        var present = parts.Where(p => p is not null).Select(p => p!).ToList();
        var first = present[0];
        var name = $"'{bflPath}' (from {string.Join(", ", present.Select(p => $"'{p.Source}'"))})";
        foreach (var part in present)
        {
            RequireLora(part, $"fused into {bflPath}");
            if (part.Down.Shape.Length != 2 || part.Down.Shape[1] != first.Down.Shape[1] || part.Down.Dtype != first.Down.Dtype || part.Up.Dtype != first.Up.Dtype)
            {
                throw new AdapterConvertException($"cannot fuse {name}: their lora_A shapes or dtypes differ ({string.Join(", ", present.Select(p => $"{p.Down.Dtype} {RawTensor.ShapeText(p.Down.Shape)}"))})");
            }
        }
        var scales = present.Select(p => p.Scale).Distinct().ToList();
        if (scales.Count > 1)
        {
            throw new AdapterConvertException($"cannot fuse {name} exactly: their alpha/rank differ ({string.Join(", ", present.Select(p => $"{p.Alpha?.ToString(CultureInfo.InvariantCulture) ?? "none"}/{p.Rank}"))}), and one fused module has one alpha");
        }
        var dora = present.Count(p => p.Dora is not null);
        if (dora > 0 && (dora < parts.Length || present.Any(p => !p.DoraPerOutputRow) || present.Select(p => p.Params.ContainsKey("magnitude")).Distinct().Count() > 1))
        {
            throw new AdapterConvertException($"cannot fuse {name} exactly: DoRA normalises rows, which needs every part with a per-output-row magnitude of one convention");
        }

        var width = first.Down.Shape[1];
        long[] rows = [.. parts.Select((p, i) => p?.Up.Shape[0] ?? (relation == FluxRelation.Linear1Part && i == 3 ? 4 * width : width))];
        long[] ranks = [.. parts.Select(p => p?.Rank ?? 0)];
        var rank = ranks.Sum();
        var size = first.Up.ElementSize;

        var down = new byte[present.Sum(p => p.Down.Bytes.Length)];
        var offset = 0;
        foreach (var part in present)
        {
            part.Down.Bytes.CopyTo(down, offset);
            offset += part.Down.Bytes.Length;
        }
        var up = new byte[rows.Sum() * rank * size];
        long row = 0, column = 0;
        for (var i = 0; i < parts.Length; i++)
        {
            if (parts[i] is { } part)
            {
                var rowBytes = (int)(ranks[i] * size);
                for (var o = 0; o < rows[i]; o++)
                {
                    part.Up.Bytes.AsSpan(o * rowBytes, rowBytes).CopyTo(up.AsSpan((int)(((row + o) * rank + column) * size)));
                }
            }
            row += rows[i];
            column += ranks[i];
        }

        var p = new Dictionary<string, RawTensor>(StringComparer.Ordinal)
        {
            ["down"] = new RawTensor(first.Down.Dtype, [rank, width], down, Built: true),
            ["up"] = new RawTensor(first.Up.Dtype, [rows.Sum(), rank], up, Built: true),
        };
        if (present.Any(q => q.Alpha is not null))
        {
            var alphaDtype = present.Select(q => q.Params.GetValueOrDefault("alpha")?.Dtype).FirstOrDefault(d => d is not null) ?? first.Up.Dtype;
            p["alpha"] = RawTensor.Alpha(scales[0] * rank, alphaDtype);
        }
        foreach (var rowwise in (string[])["up_bias", "magnitude", "dora_scale"])
        {
            if (present.FirstOrDefault(q => q.Params.ContainsKey(rowwise)) is { } holder)
            {
                var sample = holder.Params[rowwise];
                var rowBytes = sample.Bytes.Length / sample.Rows;
                var bytes = new byte[rows.Sum() * rowBytes];
                long at = 0;
                for (var i = 0; i < parts.Length; i++)
                {
                    if (parts[i]?.Params.GetValueOrDefault(rowwise) is { } tensor)
                    {
                        if (tensor.Dtype != sample.Dtype)
                        {
                            throw new AdapterConvertException($"cannot fuse {name}: their {rowwise} dtypes differ");
                        }
                        tensor.Bytes.CopyTo(bytes, at * rowBytes);
                    }
                    at += rows[i];
                }
                p[rowwise] = new RawTensor(sample.Dtype, [rows.Sum(), .. sample.Shape[1..]], bytes, Built: true);
            }
        }
        grown = $"{bflPath}: rank {string.Join("+", ranks)} → {rank}";
        return new ConvertModule
        {
            Source = string.Join("+", present.Select(q => q.Source)),
            Path = new ModulePath(ModelPart.Flux, bflPath, Bfl: true),
            Type = "LoRA",
            Params = p,
        };
    }

    /// <summary><c>norm_out.linear</c> ⇄ <c>final_layer.adaLN_modulation.1</c>: the two halves of the output rows trade places.</summary>
    public static ConvertModule SwapHalves(ConvertModule module, ModulePath path)
    {
        RequireLora(module, "mapped between norm_out.linear and final_layer.adaLN_modulation.1 (row halves swapped)");
        var p = new Dictionary<string, RawTensor>(module.Params, StringComparer.Ordinal);
        foreach (var rowwise in (string[])["up", "up_bias", "magnitude", "dora_scale"])
        {
            if (!p.TryGetValue(rowwise, out var tensor) || rowwise == "dora_scale" && !module.DoraPerOutputRow)
            {
                // A per-input-channel norm runs over all rows, so reordering them leaves it as it is.
                continue;
            }
            if (tensor.Rows % 2 != 0)
            {
                throw Problem(module, $"its {rowwise} has {tensor.Rows} rows, not two halves");
            }
            var half = tensor.Bytes.Length / 2;
            var bytes = new byte[tensor.Bytes.Length];
            tensor.Bytes.AsSpan(half).CopyTo(bytes);
            tensor.Bytes.AsSpan(0, half).CopyTo(bytes.AsSpan(half));
            p[rowwise] = tensor with { Bytes = bytes, Built = true };
        }
        return module.With(path, p);
    }

    private static void RequireLora(ConvertModule module, string what)
    {
        if (!module.IsLora || module.Params.ContainsKey("mid"))
        {
            throw Problem(module, $"it is {module.Type}; only LoRA modules can be {what}");
        }
    }

    private static AdapterConvertException Problem(ConvertModule module, string problem) => new($"module '{module.Source}': {problem}");
}
