using LoraDeploy.Sources;

namespace LoraDeploy.Loras;

/// <summary>Validates a pasted CivitAI reference for the create request; the stored form never carries a token.</summary>
internal static class CivitaiUrlCheck
{
    public static bool TryNormalize(string input, out string canonical, out string error)
    {
        if (CivitaiUrl.TryParse(input, out var reference, out var parseError))
        {
            canonical = reference.CanonicalUrl;
            error = "";
            return true;
        }
        canonical = "";
        error = $"Value error, {parseError}";
        return false;
    }
}
