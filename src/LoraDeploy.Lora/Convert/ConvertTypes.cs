namespace LoraDeploy.Lora.Conversion;

// Namespace Conversion, not Convert (the folder): a LoraDeploy.Lora.Convert namespace would hide System.Convert in the whole assembly.

/// <summary>A naming convention an adapter can be re-emitted in.</summary>
public enum AdapterConvention
{
    /// <summary>kohya sd-scripts / LyCORIS: <c>lora_unet_…</c>, <c>lora_te1_…</c>, <c>.lora_down/.lora_up/.alpha</c>; FLUX in BFL block names.</summary>
    Kohya,

    /// <summary>PEFT: <c>base_model.model.…lora_A.weight/lora_B.weight</c>, alpha in an <c>adapter_config.json</c> beside the file.</summary>
    Peft,

    /// <summary>diffusers <c>pipe.load_lora_weights</c>: <c>unet.</c>/<c>text_encoder.</c>/<c>text_encoder_2.</c>/<c>transformer.</c> names with <c>lora_A/lora_B</c> and <c>.alpha</c> scalars.</summary>
    Diffusers,
}

/// <summary>The base model family an adapter belongs to; it decides names that differ between families.</summary>
public enum AdapterArchitecture
{
    SD15,
    SDXL,
    Flux1,
}

public sealed record ConvertOptions
{
    /// <summary>The adapter's base family; null to tell it from the module names, shapes and metadata.</summary>
    public AdapterArchitecture? Architecture { get; init; }

    public TimeProvider TimeProvider { get; init; } = TimeProvider.System;

    /// <summary>Test seam: opens a <c>.part</c> file for writing (a stream that throws stands in for a full disk).</summary>
    internal Func<string, Stream>? OpenOutput { get; init; }
}

/// <summary>What a conversion did.</summary>
/// <param name="ConfigPath">The <c>adapter_config.json</c> written beside the output (PEFT only).</param>
/// <param name="From">The input's convention as recognised (kohya, peft, diffusers, bfl, onetrainer, xlabs, mixed).</param>
/// <param name="Architecture">The base family, null when neither the adapter nor the conversion needed to tell.</param>
/// <param name="ModulesIn">Adapter modules read.</param>
/// <param name="ModulesOut">Adapter modules written (more when fused q/k/v are split, fewer when they are fused).</param>
/// <param name="TensorsCopied">Output tensors whose bytes are the input's, untouched (renamed, or a row slice).</param>
/// <param name="TensorsBuilt">Output tensors assembled or created: fused factors, alpha scalars where there were none.</param>
/// <param name="RankGrown">Fused modules, each as "name: rank r1+r2+r3 → R" (the fused rank is the sum).</param>
/// <param name="NonFiniteTensors">Tensors holding NaN/Inf, carried as they are (conversion does not judge values; merge refuses them).</param>
public sealed record ConvertResult(
    string OutputPath,
    string? ConfigPath,
    string From,
    AdapterConvention To,
    AdapterArchitecture? Architecture,
    int ModulesIn,
    int ModulesOut,
    int TensorsCopied,
    int TensorsBuilt,
    IReadOnlyList<string> RankGrown,
    IReadOnlyList<string> NonFiniteTensors,
    string SourceSha256,
    long BytesWritten,
    TimeSpan Elapsed);

/// <summary>A conversion was refused or failed; the message names the file, module or tensor at fault. No output is left behind.</summary>
public sealed class AdapterConvertException : Exception
{
    public AdapterConvertException(string message)
        : base(message)
    {
    }

    public AdapterConvertException(string message, Exception inner)
        : base(message, inner)
    {
    }
}
