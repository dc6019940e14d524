using System.Text.Json;

namespace LoraDeploy.Sources;

/// <summary>
/// A CivitAI model's license terms, NSFW level and creator, as its <c>/api/v1/models/{id}</c> body reports them
/// (reference §2.3). Any part is null when CivitAI did not say.
/// </summary>
public sealed record CivitaiLicense
{
    /// <summary>CivitAI's commercial-use permissions (<c>Image</c>, <c>RentCivit</c>, <c>Rent</c>, <c>Sell</c>); empty for none.</summary>
    public IReadOnlyList<string>? AllowCommercialUse { get; init; }
    public bool? AllowDerivatives { get; init; }
    public bool? AllowDifferentLicense { get; init; }
    public bool? AllowNoCredit { get; init; }
    /// <summary>The model's level: an OR of <see cref="NsfwLevels"/> flags (e.g. 31); 0 when unrated.</summary>
    public int? NsfwLevel { get; init; }
    /// <summary>Username of the creator; null for CivitAI's system user.</summary>
    public string? Creator { get; init; }

    internal static CivitaiLicense From(CivitaiModelDto model) => new()
    {
        AllowCommercialUse = ParseCommercialUse(model.AllowCommercialUse),
        AllowDerivatives = model.AllowDerivatives,
        AllowDifferentLicense = model.AllowDifferentLicense,
        AllowNoCredit = model.AllowNoCredit,
        NsfwLevel = model.NsfwLevel,
        Creator = string.IsNullOrWhiteSpace(model.Creator?.Username) ? null : model.Creator.Username.Trim(),
    };

    /// <summary>
    /// Normalises <c>allowCommercialUse</c>: the array-literal string <c>"{Image,RentCivit}"</c> (what CivitAI ships),
    /// a JSON array, or an older single string (<c>"Rent"</c>); <c>"None"</c> and <c>"{}"</c> mean no permission at all.
    /// Null when the field is absent or of another JSON kind.
    /// </summary>
    public static IReadOnlyList<string>? ParseCommercialUse(JsonElement? value)
    {
        if (value is not { } v)
        {
            return null;
        }
        IEnumerable<string> items;
        switch (v.ValueKind)
        {
            case JsonValueKind.String:
                var text = v.GetString()!.Trim();
                if (text.StartsWith('{') && text.EndsWith('}'))
                {
                    text = text[1..^1];
                }
                items = text.Split(',');
                break;
            case JsonValueKind.Array:
                items = v.EnumerateArray().Where(e => e.ValueKind == JsonValueKind.String).Select(e => e.GetString()!);
                break;
            default:
                return null;
        }
        return items
            .Select(i => i.Trim().Trim('"').Trim())
            .Where(i => i.Length > 0 && !string.Equals(i, "None", StringComparison.OrdinalIgnoreCase))
            .Distinct(StringComparer.OrdinalIgnoreCase)
            .ToList();
    }
}

/// <summary>CivitAI's NSFW level bit flags (reference §3.4).</summary>
public static class NsfwLevels
{
    public static readonly IReadOnlyList<(string Name, int Flag)> Flags =
        [("PG", 1), ("PG13", 2), ("R", 4), ("X", 8), ("XXX", 16), ("Blocked", 32)];

    /// <summary>The highest flag set in <paramref name="level"/>, or null when none is (unrated).</summary>
    public static (string Name, int Flag)? Highest(int level)
    {
        for (var i = Flags.Count - 1; i >= 0; i--)
        {
            if ((level & Flags[i].Flag) != 0)
            {
                return Flags[i];
            }
        }
        return null;
    }

    public static int? FlagOf(string name) =>
        Flags.FirstOrDefault(f => string.Equals(f.Name, name, StringComparison.OrdinalIgnoreCase)) is { Name: not null } hit ? hit.Flag : null;
}
