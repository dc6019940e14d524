namespace LoraDeploy.Lora.Peft;

/// <summary>What a PEFT adapter is, as validated against a base model (and, after a conversion, what was written).</summary>
public sealed record PeftConversionReport
{
    /// <summary>The base model's (and so the adapter GGUF's) <c>general.architecture</c>.</summary>
    public required string Architecture { get; init; }
    public required int ConverterVersion { get; init; }
    /// <summary>adapter_config.json's <c>base_model_name_or_path</c>, for display (not checked: the registry decides the base).</summary>
    public string? BaseModelNameOrPath { get; init; }
    public required bool UseRslora { get; init; }
    /// <summary>The distinct ranks, ascending.</summary>
    public required IReadOnlyList<int> Ranks { get; init; }
    /// <summary>The distinct short module names adapted (<c>q_proj</c>, <c>lm_head</c>…).</summary>
    public required IReadOnlyList<string> TargetModules { get; init; }
    /// <summary>Layers with at least one adapted module, ascending.</summary>
    public required IReadOnlyList<int> Layers { get; init; }
    /// <summary>Tensors in the adapter GGUF (two per module).</summary>
    public required int TensorCount { get; init; }
    public required long ParameterCount { get; init; }
    public required IReadOnlyList<PeftModuleReport> Modules { get; init; }
}

/// <summary>One adapted module.</summary>
/// <param name="Module">Hugging Face module name, e.g. <c>model.layers.3.self_attn.q_proj</c>.</param>
/// <param name="BaseTensor">The llama.cpp tensor it patches, e.g. <c>blk.3.attn_q.weight</c>.</param>
/// <param name="Layer">Layer index, or null for <c>embed_tokens</c>/<c>lm_head</c>.</param>
/// <param name="Alpha">The alpha in effect (alpha_pattern or lora_alpha).</param>
/// <param name="Scale">PEFT's scale, folded into lora_b: alpha/r, or alpha/√r with rsLoRA.</param>
/// <param name="SourceDtype">The safetensors dtype of lora_B (lora_A's may differ).</param>
/// <param name="OutputType">ggml type written for lora_b.</param>
/// <param name="RowsPermuted">Whether lora_b's rows got Llama's q/k RoPE permutation.</param>
public sealed record PeftModuleReport(
    string Module,
    string BaseTensor,
    int? Layer,
    int Rank,
    double Alpha,
    double Scale,
    long InFeatures,
    long OutFeatures,
    string SourceDtype,
    string OutputType,
    bool RowsPermuted);
