using System.Text.RegularExpressions;

namespace LoraDeploy.Sources;

/// <summary>A Hugging Face model repo and, optionally, the revision (branch, tag or commit) asked for.</summary>
public sealed partial record HuggingFaceRepoRef
{
    private const string Forms = "owner/repo, owner/repo@revision or https://huggingface.co/owner/repo[/tree/revision]";

    /// <summary>Hosts whose links are accepted besides HuggingFace:BaseUrl's own; the Hub is always called at BaseUrl.</summary>
    public static readonly IReadOnlyList<string> AcceptedHosts = ["huggingface.co", "www.huggingface.co", "hf.co"];

    public required string Owner { get; init; }
    public required string Name { get; init; }

    /// <summary>The branch, tag or commit asked for; null means the repo's default branch.</summary>
    public string? Revision { get; init; }

    /// <summary><c>owner/repo</c>, as the Hub's API spells it.</summary>
    public string RepoId => $"{Owner}/{Name}";

    /// <summary><c>owner/repo</c> or <c>owner/repo@revision</c>: safe to store and log.</summary>
    public override string ToString() => Revision is null ? RepoId : $"{RepoId}@{Revision}";

    // huggingface_hub's REPO_ID_REGEX: word characters, '-' and '.', starting and ending with a word character, at most 96.
    [GeneratedRegex(@"^[A-Za-z0-9_](?:[A-Za-z0-9_.\-]{0,94}[A-Za-z0-9_])?\z", RegexOptions.CultureInvariant)]
    private static partial Regex NamePattern();

    /// <summary>
    /// Parses what a user gave as <c>hf_model_name</c>. Links may point at huggingface.co, hf.co or
    /// <paramref name="hubBaseUrl"/> (HuggingFace:BaseUrl). On failure <paramref name="error"/> is a sentence naming the
    /// expected forms, fit for a 422 response.
    /// </summary>
    public static bool TryParse(string? input, Uri? hubBaseUrl, out HuggingFaceRepoRef reference, out string error)
    {
        reference = null!;
        var text = input?.Trim() ?? "";
        if (text.Length == 0)
        {
            error = $"the Hugging Face repo is empty; give it as {Forms}";
            return false;
        }
        if (text.Any(char.IsControl))
        {
            error = $"the Hugging Face repo contains control characters; give it as {Forms}";
            return false;
        }

        var lower = text.ToLowerInvariant();
        if (!text.Contains("://", StringComparison.Ordinal) && AcceptedHosts.Any(h => lower.StartsWith(h + "/", StringComparison.Ordinal)))
        {
            text = "https://" + text;
        }
        return text.Contains("://", StringComparison.Ordinal)
            ? TryParseUrl(text, hubBaseUrl, out reference, out error)
            : TryParseId(text, out reference, out error);
    }

    private static bool TryParseId(string text, out HuggingFaceRepoRef reference, out string error)
    {
        reference = null!;
        string? revision = null;
        var at = text.IndexOf('@', StringComparison.Ordinal);
        if (at >= 0)
        {
            revision = text[(at + 1)..];
            text = text[..at];
            if (revision.Length == 0)
            {
                error = $"'{text}@' names no revision after '@'; give it as {Forms}";
                return false;
            }
        }
        var parts = text.Split('/');
        if (parts.Length != 2)
        {
            error = parts.Length == 1
                ? $"'{text}' names no owner; give the repo as {Forms} (e.g. meta-llama/Llama-3.2-1B)"
                : $"'{text}' is not owner/repo; give it as {Forms}";
            return false;
        }
        return TryCreate(parts[0], parts[1], revision, out reference, out error);
    }

    private static bool TryParseUrl(string text, Uri? hubBaseUrl, out HuggingFaceRepoRef reference, out string error)
    {
        reference = null!;
        if (!Uri.TryCreate(text, UriKind.Absolute, out var uri) || (uri.Scheme != Uri.UriSchemeHttps && uri.Scheme != Uri.UriSchemeHttp))
        {
            error = $"the Hugging Face link is not an http(s) URL; give the repo as {Forms}";
            return false;
        }
        var host = uri.IdnHost.ToLowerInvariant();
        var isBase = hubBaseUrl is not null && Uri.Compare(uri, hubBaseUrl, UriComponents.SchemeAndServer, UriFormat.Unescaped, StringComparison.OrdinalIgnoreCase) == 0;
        if (!isBase && !AcceptedHosts.Contains(host, StringComparer.Ordinal))
        {
            error = $"{host} is not a Hugging Face host; give the repo as {Forms}";
            return false;
        }

        // Below a BaseUrl with a path (a mirror at https://host/hf/), the repo path starts after it.
        var path = uri.AbsolutePath;
        if (isBase && hubBaseUrl!.AbsolutePath.Length > 1 && path.StartsWith(hubBaseUrl.AbsolutePath, StringComparison.Ordinal))
        {
            path = path[hubBaseUrl.AbsolutePath.Length..];
        }
        // Split before unescaping, so a revision like refs%2Fpr%2F1 stays one segment.
        var segments = path.Split('/', StringSplitOptions.RemoveEmptyEntries).Select(Uri.UnescapeDataString).ToArray();
        if (segments.Length > 0 && segments[0] is "datasets" or "spaces")
        {
            error = $"the link points at a Hugging Face {(segments[0] == "datasets" ? "dataset" : "Space")}, not a model repo; give a model repo as {Forms}";
            return false;
        }
        switch (segments)
        {
            case [var owner, var name]:
                return TryCreate(owner, name, null, out reference, out error);
            case [var owner, var name, "tree", var revision]:
                return TryCreate(owner, name, revision, out reference, out error);
            case [_, _, "tree", _, ..]:
                error = $"the link points at a folder inside the repo ({string.Join('/', segments[4..])}); only an adapter at the top of a repo can be imported, so give {Forms}";
                return false;
            case [var owner, var name, "blob" or "resolve", var revision, _, ..]:
                // A link to one of the repo's files (e.g. its adapter_config.json) still names the repo and revision.
                return TryCreate(owner, name, revision, out reference, out error);
            case [_]:
                error = $"the link names no repo, only '{segments[0]}'; give it as {Forms}";
                return false;
            case []:
                error = $"the link names no repo; give it as {Forms}";
                return false;
            default:
                error = $"the link is not a repo page; give it as {Forms}";
                return false;
        }
    }

    private static bool TryCreate(string owner, string name, string? revision, out HuggingFaceRepoRef reference, out string error)
    {
        reference = null!;
        foreach (var (part, what) in new[] { (owner, "owner"), (name, "repo name") })
        {
            if (!NamePattern().IsMatch(part) || part.Contains("--", StringComparison.Ordinal) || part.Contains("..", StringComparison.Ordinal))
            {
                error = $"'{Printable(part)}' is not a valid Hugging Face {what} (letters, digits, '-', '_' and '.', at most 96, no '--' or '..'); give the repo as {Forms}";
                return false;
            }
        }
        if (name.EndsWith(".git", StringComparison.OrdinalIgnoreCase))
        {
            error = $"'{Printable(name)}' ends with .git; give the repo as {Forms}";
            return false;
        }
        if (revision is not null && (revision.Length > 256 || string.IsNullOrWhiteSpace(revision) || revision.Any(char.IsControl)))
        {
            error = $"the revision after the repo is not a branch, tag or commit name; give it as {Forms}";
            return false;
        }
        reference = new HuggingFaceRepoRef { Owner = owner, Name = name, Revision = revision };
        error = "";
        return true;
    }

    private static string Printable(string s) => s.Length > 100 ? s[..100] + "…" : s;
}
