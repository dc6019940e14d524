using LoraDeploy.Lora.Peft;

namespace LoraDeploy.Lora.Merge;

/// <summary>One adapter to merge and the user strength it is merged with (1 = as trained).</summary>
/// <param name="Path">The adapter's .safetensors file.</param>
/// <param name="Strength">User strength (kohya's multiplier, diffusers' <c>lora_scale</c>); multiplies alpha/rank.</param>
/// <param name="PeftConfig">
/// The PEFT <c>adapter_config.json</c> for a PEFT adapter (r, lora_alpha, rsLoRA, rank/alpha patterns,
/// layers_to_transform); null to use the <c>adapter_config.json</c> beside <paramref name="Path"/> if there is one.
/// </param>
public sealed record MergeAdapter(string Path, double Strength = 1.0, PeftAdapterConfig? PeftConfig = null);

/// <summary>Element type of the merged file's floating-point tensors.</summary>
public enum MergeDtype
{
    /// <summary>Each tensor keeps the base's dtype.</summary>
    Base,
    F32,
    F16,
    BF16,
}

/// <summary>How far a merge has got; reported after each tensor.</summary>
public sealed record MergeProgress(int TensorsDone, int TensorCount, long BytesDone, long BytesTotal);

public sealed record MergeOptions
{
    /// <summary>dtype of the output's F32/F16/BF16 tensors; other dtypes (e.g. I64 position ids) are always copied.</summary>
    public MergeDtype OutputDtype { get; init; } = MergeDtype.Base;

    public IProgress<MergeProgress>? Progress { get; init; }

    public TimeProvider TimeProvider { get; init; } = TimeProvider.System;

    /// <summary>Test seam: opens the <c>.part</c> file for writing (a stream that throws stands in for a full disk).</summary>
    internal Func<string, Stream>? OpenOutput { get; init; }
}

/// <summary>What a merge did.</summary>
/// <param name="TensorsMerged">Base tensors an adapter changed.</param>
/// <param name="TensorsCopied">Base tensors written unchanged (byte-identical unless converted to another dtype).</param>
/// <param name="TensorsConverted">Of the unchanged tensors, those written in another dtype.</param>
/// <param name="ModulesApplied">Adapter modules applied, over all adapters.</param>
/// <param name="BytesWritten">Size of the output file.</param>
public sealed record MergeResult(
    string OutputPath,
    int TensorsMerged,
    int TensorsCopied,
    int TensorsConverted,
    int ModulesApplied,
    long BytesWritten,
    TimeSpan Elapsed,
    IReadOnlyList<MergedAdapterRecord> Adapters);

/// <summary>One merged adapter as recorded in the output's <c>__metadata__</c>.</summary>
public sealed record MergedAdapterRecord(string File, string Sha256, double Strength, int Modules);
