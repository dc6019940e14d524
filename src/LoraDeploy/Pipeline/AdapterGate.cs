using LoraDeploy.BaseModels;
using LoraDeploy.Lora;

namespace LoraDeploy.Pipeline;

/// <summary>
/// Decides from the probe whether a LoRA can be deployed on the chosen base model. The tensors decide;
/// CivitAI's <c>baseModel</c> label only earns a warning when it disagrees with them.
/// </summary>
public static class AdapterGate
{
    public static (string? FailClass, string? FailReason, List<string> Warnings) Check(
        ProbeReport report, string baseModel, string? civitaiBaseModel, BaseModelRegistry registry)
    {
        var warnings = new List<string>(report.Warnings);
        if (!report.IsAdapter)
        {
            return (PipelineReasonClass.NotAdapter,
                $"This file is not a LoRA adapter{Because(report.NotApplicableReason)}; pick the LoRA file of the CivitAI model version.",
                warnings);
        }
        if (report.Architecture == "unknown")
        {
            return (PipelineReasonClass.UnknownArchitecture,
                "The base-model architecture this LoRA targets could not be determined from its tensor names and shapes, so it cannot be deployed safely; there is no override yet.",
                warnings);
        }
        if (!report.Applicable)
        {
            return (PipelineReasonClass.NotApplicable,
                $"A text-to-image server cannot apply this adapter{Because(report.NotApplicableReason)}.",
                warnings);
        }
        if (!registry.TryGetFamily(baseModel, out var family))
        {
            return (PipelineReasonClass.ArchitectureMismatch,
                $"base_model {baseModel} is no longer in this server's BaseModels registry; ask the operator to add it.",
                warnings);
        }
        if (!string.Equals(report.Architecture, family, StringComparison.Ordinal))
        {
            var target = ArchitectureFamilies.Display(report.Architecture);
            var chosen = ArchitectureFamilies.Display(family);
            return (PipelineReasonClass.ArchitectureMismatch,
                $"This LoRA targets {target}; base_model {baseModel} is {chosen}. Deploy it on a {target} base model, or pick a LoRA made for {chosen}.",
                warnings);
        }
        var labelled = BaseModelRegistry.FamilyOfCivitaiBaseModel(civitaiBaseModel);
        if (labelled is not null && labelled != report.Architecture)
        {
            warnings.Add($"CivitAI lists this version's base model as '{civitaiBaseModel}' ({ArchitectureFamilies.Display(labelled)}), but its tensors are {ArchitectureFamilies.Display(report.Architecture)}; the tensors were trusted.");
        }
        return (null, null, warnings);
    }

    private static string Because(string? reason) => string.IsNullOrWhiteSpace(reason) ? "" : $" ({reason.TrimEnd('.')})";
}
