using System.ComponentModel.DataAnnotations;
using System.Text.Json;
using LoraDeploy.Sources;

namespace LoraDeploy.Pipeline;

/// <summary>
/// Settings section <c>Policy</c>: the operator's license and content rules for CivitAI LoRAs. Every rule is off by
/// default. A create that breaks one fails; <c>start</c> checks a stopped deploy again, since the rules may have changed.
/// </summary>
public sealed class PolicyOptions : IValidatableObject
{
    public const string Section = "Policy";

    /// <summary>CivitAI's commercial-use values by this setting's names (reference §2.3).</summary>
    public static readonly IReadOnlyDictionary<string, string> CommercialUseValues = new Dictionary<string, string>(StringComparer.OrdinalIgnoreCase)
    {
        ["image"] = "Image",
        ["rentcivit"] = "RentCivit",
        ["rent"] = "Rent",
        ["sell"] = "Sell",
    };

    /// <summary><c>none</c> (default), <c>image</c>, <c>rentcivit</c>, <c>rent</c> or <c>sell</c>: the CivitAI commercial-use permission a model must grant.</summary>
    public string RequireCommercialUse { get; set; } = "none";

    /// <summary>Empty (no limit) or <c>PG</c>, <c>PG13</c>, <c>R</c>, <c>X</c>, <c>XXX</c>: the highest NSFW level a model may be rated.</summary>
    public string? MaxNsfwLevel { get; set; }

    /// <summary>CivitAI usernames whose models are refused (case-insensitive).</summary>
    public List<string> BlockedCreators { get; set; } = [];

    /// <summary>CivitAI model ids that are refused.</summary>
    public List<int> BlockedModels { get; set; } = [];

    /// <summary>The CivitAI value <see cref="RequireCommercialUse"/> asks for, or null for none.</summary>
    public string? RequiredCommercialUse => CommercialUseValues.GetValueOrDefault(RequireCommercialUse.Trim());

    public int? MaxNsfwFlag => string.IsNullOrWhiteSpace(MaxNsfwLevel) ? null : NsfwLevels.FlagOf(MaxNsfwLevel.Trim());

    public IEnumerable<ValidationResult> Validate(ValidationContext validationContext)
    {
        if (!string.Equals(RequireCommercialUse.Trim(), "none", StringComparison.OrdinalIgnoreCase) && RequiredCommercialUse is null)
        {
            yield return new ValidationResult(
                $"Policy:RequireCommercialUse must be none, image, rentcivit, rent or sell; got '{RequireCommercialUse}'", [nameof(RequireCommercialUse)]);
        }
        if (!string.IsNullOrWhiteSpace(MaxNsfwLevel) && (MaxNsfwFlag is not { } flag || flag > 16))
        {
            yield return new ValidationResult($"Policy:MaxNsfwLevel must be empty or one of PG, PG13, R, X, XXX; got '{MaxNsfwLevel}'", [nameof(MaxNsfwLevel)]);
        }
        if (BlockedCreators.Any(string.IsNullOrWhiteSpace))
        {
            yield return new ValidationResult("Policy:BlockedCreators must not contain an empty username", [nameof(BlockedCreators)]);
        }
        if (BlockedModels.Where(id => id <= 0).ToList() is { Count: > 0 } bad)
        {
            yield return new ValidationResult($"Policy:BlockedModels holds CivitAI model ids (positive integers); got {string.Join(", ", bad)}", [nameof(BlockedModels)]);
        }
    }
}

/// <summary>Decides from a CivitAI model's recorded terms whether the operator's <see cref="PolicyOptions"/> allow it.</summary>
public static class PolicyGate
{
    /// <summary>The refusal sentence naming the rule and its setting, or null when every rule passes.</summary>
    public static string? Check(PolicyOptions policy, int? modelId, CivitaiLicense? license)
    {
        if (modelId is { } id && policy.BlockedModels.Contains(id))
        {
            return $"refused by policy: Policy:BlockedModels lists CivitAI model {id}";
        }
        if (policy.BlockedCreators.Count > 0 && license?.Creator is { } creator
            && policy.BlockedCreators.Any(c => string.Equals(c.Trim(), creator, StringComparison.OrdinalIgnoreCase)))
        {
            return $"refused by policy: Policy:BlockedCreators lists {creator}, the creator of this model";
        }
        if (policy.RequiredCommercialUse is { } required)
        {
            if (license?.AllowCommercialUse is not { } granted)
            {
                return $"refused by policy: Policy:RequireCommercialUse is {policy.RequireCommercialUse.Trim().ToLowerInvariant()}, and CivitAI reported no commercial-use terms for this model";
            }
            if (!granted.Contains(required, StringComparer.OrdinalIgnoreCase))
            {
                return $"refused by policy: Policy:RequireCommercialUse is {policy.RequireCommercialUse.Trim().ToLowerInvariant()}, this model allows commercial use {Describe(granted)}, not {required}";
            }
        }
        if (policy.MaxNsfwFlag is { } max)
        {
            var maxName = NsfwLevels.Highest(max)!.Value.Name;
            if (license?.NsfwLevel is not { } level || NsfwLevels.Highest(level) is not { } rated)
            {
                return $"refused by policy: Policy:MaxNsfwLevel is {maxName}, this model has no NSFW rating";
            }
            if (rated.Flag > max)
            {
                return $"refused by policy: Policy:MaxNsfwLevel is {maxName}, this model is rated {rated.Name}";
            }
        }
        return null;
    }

    /// <summary>What a LoRA's row recorded of its CivitAI model's terms; null when nothing was recorded (not CivitAI, or not resolved yet).</summary>
    public static CivitaiLicense? RecordedLicense(Data.Lora lora) =>
        lora.AllowCommercialUseJson is null && lora.AllowDerivatives is null && lora.AllowDifferentLicense is null
        && lora.AllowNoCredit is null && lora.NsfwLevel is null && lora.CivitaiCreator is null
            ? null
            : new CivitaiLicense
            {
                AllowCommercialUse = lora.AllowCommercialUseJson is null ? null : JsonSerializer.Deserialize(lora.AllowCommercialUseJson, ApiJson.Context.ListString),
                AllowDerivatives = lora.AllowDerivatives,
                AllowDifferentLicense = lora.AllowDifferentLicense,
                AllowNoCredit = lora.AllowNoCredit,
                NsfwLevel = lora.NsfwLevel,
                Creator = lora.CivitaiCreator,
            };

    private static string Describe(IReadOnlyList<string> granted) => granted.Count == 0 ? "for nothing (None)" : $"for {string.Join(", ", granted)}";
}
