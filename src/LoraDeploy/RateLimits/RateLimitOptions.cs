using System.ComponentModel.DataAnnotations;

namespace LoraDeploy.RateLimits;

/// <summary>
/// Settings section <c>RateLimits</c>: a per-user request budget on the management routes (everything an API token
/// calls that is not inference), counted in the database so every replica spends from the same budget.
/// </summary>
public sealed class RateLimitOptions : IValidatableObject
{
    public const string Section = "RateLimits";
    public const int MaxRequestsPerMinute = 1_000_000;

    public bool Enabled { get; set; } = true;

    /// <summary>Requests per user per clock minute; generous, so only a runaway script meets it.</summary>
    [Range(1, MaxRequestsPerMinute)]
    public int RequestsPerMinute { get; set; } = 600;

    /// <summary>Per-user overrides by user name: <c>RateLimits:Users:&lt;name&gt;:RequestsPerMinute</c>.</summary>
    public Dictionary<string, UserRateLimit> Users { get; set; } = [];

    public IEnumerable<ValidationResult> Validate(ValidationContext validationContext)
    {
        foreach (var (name, user) in Users)
        {
            if (user.RequestsPerMinute is not { } limit || limit < 1 || limit > MaxRequestsPerMinute)
            {
                yield return new ValidationResult(
                    $"{Section}:Users:{name}:RequestsPerMinute must be a whole number from 1 to {MaxRequestsPerMinute}.",
                    [nameof(Users)]);
            }
        }
    }
}

public sealed class UserRateLimit
{
    public int? RequestsPerMinute { get; set; }
}
