using System.ComponentModel.DataAnnotations;

namespace LoraDeploy.Quotas;

/// <summary>One set of per-user limits; null means unlimited (or, in a per-user override, "as the default").</summary>
public class QuotaLimits
{
    /// <summary>Deploys a user may have that are not deleted (failed ones included).</summary>
    public int? MaxDeploys { get; set; }

    /// <summary>Bytes of adapter files a user's LoRAs may reference, each distinct file counted once.</summary>
    public long? MaxStoredBytes { get; set; }

    /// <summary>Deploys a user may have in the import stages (<c>initializing</c>, <c>downloading</c>) at once.</summary>
    public int? MaxConcurrentImports { get; set; }
}

/// <summary>
/// Settings section <c>Quotas</c>: per-user limits, unlimited by default so a new install needs no setup.
/// <c>Quotas:Users:{user name}:{key}</c> replaces the default for that key only, for that user.
/// </summary>
public sealed class QuotaOptions : QuotaLimits, IValidatableObject
{
    public const string Section = "Quotas";

    // Configuration keys are case-insensitive, so the user names under Users are too.
    public Dictionary<string, QuotaLimits> Users { get; set; } = new(StringComparer.OrdinalIgnoreCase);

    /// <summary>The limits that apply to <paramref name="userName"/>: its overrides, else the defaults.</summary>
    public EffectiveQuota For(string userName)
    {
        var own = Users.GetValueOrDefault(userName);
        return new EffectiveQuota(
            own?.MaxDeploys ?? MaxDeploys,
            own?.MaxStoredBytes ?? MaxStoredBytes,
            own?.MaxConcurrentImports ?? MaxConcurrentImports);
    }

    public IEnumerable<ValidationResult> Validate(ValidationContext validationContext)
    {
        var sets = new List<(string Prefix, QuotaLimits Limits)> { ("Quotas", this) };
        sets.AddRange(Users.Select(u => ($"Quotas:Users:{u.Key}", u.Value)));
        foreach (var (prefix, limits) in sets)
        {
            if (limits.MaxDeploys is < 0)
            {
                yield return new ValidationResult($"{prefix}:MaxDeploys must be 0 or more (absent: unlimited); got {limits.MaxDeploys}", [nameof(MaxDeploys)]);
            }
            if (limits.MaxStoredBytes is < 0)
            {
                yield return new ValidationResult($"{prefix}:MaxStoredBytes must be 0 or more (absent: unlimited); got {limits.MaxStoredBytes}", [nameof(MaxStoredBytes)]);
            }
            if (limits.MaxConcurrentImports is < 0)
            {
                yield return new ValidationResult(
                    $"{prefix}:MaxConcurrentImports must be 0 or more (absent: unlimited); got {limits.MaxConcurrentImports}", [nameof(MaxConcurrentImports)]);
            }
        }
        if (Users.Keys.FirstOrDefault(string.IsNullOrWhiteSpace) is not null)
        {
            yield return new ValidationResult("Quotas:Users must not contain an empty user name", [nameof(Users)]);
        }
    }
}

/// <summary>The limits one user has; null is unlimited.</summary>
public readonly record struct EffectiveQuota(int? MaxDeploys, long? MaxStoredBytes, int? MaxConcurrentImports);
