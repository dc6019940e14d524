namespace LoraDeploy.Loras;

/// <summary>Validates a pasted CivitAI reference for the create request.</summary>
internal static class CivitaiUrlCheck
{
    // TODO(merge): delegate to Sources.Civitai.CivitaiUrl once the sources branch lands.
    public static bool TryNormalize(string input, out string canonical, out string error)
    {
        canonical = input.Trim();
        error = "";
        if (canonical.StartsWith("urn:air:", StringComparison.OrdinalIgnoreCase))
        {
            return true;
        }
        if (!Uri.TryCreate(canonical, UriKind.Absolute, out var uri) || uri.Host is not ("civitai.com" or "www.civitai.com"))
        {
            error = "Value error, not a CivitAI model, version or download URL or AIR";
            return false;
        }
        return true;
    }
}
