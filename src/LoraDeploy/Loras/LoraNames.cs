using System.Text.RegularExpressions;

namespace LoraDeploy.Loras;

public static partial class LoraNames
{
    public const int MaxLength = 64;

    /// <summary>1–64 chars of <c>[A-Za-z0-9._-]</c>, starting alphanumeric.</summary>
    [GeneratedRegex(@"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\z")]
    public static partial Regex Pattern();

    public static bool IsValid(string name) => Pattern().IsMatch(name);
}
