using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;

namespace LoraDeploy.Sources;

/// <summary>
/// What a pasted CivitAI link or AIR points at. Never carries the user's <c>token</c> query parameter:
/// <see cref="CanonicalUrl"/> and <see cref="ToString"/> are safe to store and log.
/// </summary>
public sealed record CivitaiReference
{
    /// <summary>Host the user pasted, lower-cased without <c>www.</c> (the API is always called at Civitai:BaseUrl).</summary>
    public string Host { get; init; } = "civitai.com";
    public int? ModelId { get; init; }
    public int? VersionId { get; init; }
    public int? FileId { get; init; }

    /// <summary>File selector from a download link (<c>type</c>, <c>format</c>, <c>size</c>, <c>fp</c>); ignored when <see cref="FileId"/> is set.</summary>
    public string? FileType { get; init; }
    public string? Format { get; init; }
    public string? Size { get; init; }
    public string? Fp { get; init; }

    /// <summary>The AIR as pasted (normalised to the <c>urn:air:</c> prefix), when the input was an AIR.</summary>
    public string? Air { get; init; }

    public bool HasSelector => FileType is not null || Format is not null || Size is not null || Fp is not null;

    /// <summary>A normalised URL (or AIR) for this reference, without any token.</summary>
    public string CanonicalUrl
    {
        get
        {
            if (Air is not null)
            {
                return Air;
            }

            var query = new List<string>();
            string path;
            if (ModelId is { } mid)
            {
                path = $"/models/{mid}";
                if (VersionId is { } v)
                {
                    query.Add($"modelVersionId={v}");
                }
                if (FileId is { } f)
                {
                    query.Add($"fileId={f}");
                }
            }
            else if (FileId is not null || HasSelector)
            {
                path = $"/api/download/models/{VersionId}";
                if (FileId is { } f)
                {
                    query.Add($"fileId={f}");
                }
                else
                {
                    AddIf(query, "type", FileType);
                    AddIf(query, "format", Format);
                    AddIf(query, "size", Size);
                    AddIf(query, "fp", Fp);
                }
            }
            else
            {
                path = $"/model-versions/{VersionId}";
            }

            return $"https://{Host}{path}" + (query.Count > 0 ? "?" + string.Join('&', query) : "");

            static void AddIf(List<string> q, string key, string? value)
            {
                if (value is not null)
                {
                    q.Add($"{key}={Uri.EscapeDataString(value)}");
                }
            }
        }
    }

    public override string ToString() => CanonicalUrl;
}

/// <summary>Parses every link form CivitAI's site and API emit (see shared/reference/civitai-api.md §1).</summary>
public static partial class CivitaiUrl
{
    /// <summary>Hosts whose links are accepted; the API itself is always called at Civitai:BaseUrl.</summary>
    public static readonly IReadOnlyList<string> AcceptedHosts = ["civitai.com", "civitai.red", "civitai.green"];

    private const string Example = "https://civitai.com/models/123?modelVersionId=456";

    [GeneratedRegex(@"^(?:urn:)?(?:air:)?([a-z0-9_.\-]+):([a-z0-9_.\-]+):([a-z0-9_.\-]+):([0-9]+)(?:@([0-9]+))?(?:\+([0-9]+))?(?:\.([a-z0-9]+))?\z", RegexOptions.IgnoreCase | RegexOptions.CultureInvariant)]
    private static partial Regex AirPattern();

    /// <summary>
    /// Parses a pasted CivitAI URL or AIR. On failure <paramref name="error"/> is a sentence fit for a 422
    /// response; it never echoes the query string (which may hold a token).
    /// </summary>
    public static bool TryParse(string? input, out CivitaiReference reference, out string error)
    {
        reference = new CivitaiReference();
        error = "";
        var text = input?.Trim() ?? "";
        if (text.Length == 0)
        {
            error = $"the CivitAI URL is empty; paste a link like {Example}";
            return false;
        }

        if (LooksLikeAir(text))
        {
            return TryParseAir(text, out reference, out error);
        }

        if (!text.Contains("://", StringComparison.Ordinal))
        {
            text = "https://" + text;
        }

        if (!Uri.TryCreate(text, UriKind.Absolute, out var uri) || (uri.Scheme != Uri.UriSchemeHttps && uri.Scheme != Uri.UriSchemeHttp))
        {
            error = $"this is not a CivitAI link or AIR; paste a link like {Example}";
            return false;
        }

        var host = uri.IdnHost.ToLowerInvariant();
        if (host.StartsWith("www.", StringComparison.Ordinal))
        {
            host = host[4..];
        }
        if (!AcceptedHosts.Contains(host))
        {
            error = $"only CivitAI links are accepted ({string.Join(", ", AcceptedHosts)}); '{uri.IdnHost}' is not a CivitAI host";
            return false;
        }
        if (!uri.IsDefaultPort)
        {
            error = $"CivitAI links do not carry a port; '{uri.Authority}' is not a CivitAI host";
            return false;
        }

        var segments = uri.AbsolutePath.Split('/', StringSplitOptions.RemoveEmptyEntries)
            .Select(Uri.UnescapeDataString).ToArray();
        var query = ParseQuery(uri.Query);

        string? First(string key) => query.FirstOrDefault(p => string.Equals(p.Key, key, StringComparison.OrdinalIgnoreCase)).Value;

        bool Matches(params string[] prefix) =>
            segments.Length >= prefix.Length + 1
            && prefix.Select((p, i) => string.Equals(segments[i], p, StringComparison.OrdinalIgnoreCase)).All(b => b);

        if (Matches("models"))
        {
            if (!TryParseId(segments[1], "model", out var mid, out error))
            {
                return false;
            }
            int? vid = null;
            if (First("modelVersionId") is { } rawVid)
            {
                if (!TryParseId(rawVid, "version", out var v, out error))
                {
                    return false;
                }
                vid = v;
            }
            reference = new CivitaiReference { Host = host, ModelId = mid, VersionId = vid };
            return true;
        }

        if (Matches("model-versions") && segments.Length == 2)
        {
            return TryVersionOnly(host, segments[1], out reference, out error);
        }

        if (Matches("api", "download", "models") && segments.Length == 4)
        {
            if (!TryParseId(segments[3], "version", out var vid, out error))
            {
                return false;
            }
            int? fid = null;
            if (First("fileId") is { } rawFid)
            {
                if (!TryParseId(rawFid, "file", out var f, out error))
                {
                    return false;
                }
                fid = f;
            }
            reference = new CivitaiReference
            {
                Host = host,
                VersionId = vid,
                FileId = fid,
                FileType = NullIfEmpty(First("type")),
                Format = NullIfEmpty(First("format")),
                Size = NullIfEmpty(First("size")),
                Fp = NullIfEmpty(First("fp")),
            };
            return true;
        }

        if (Matches("api", "v1", "model-versions") && segments.Length == 5 && string.Equals(segments[3], "by-hash", StringComparison.OrdinalIgnoreCase))
        {
            error = "CivitAI hash look-ups are not supported; paste the model page or download link instead";
            return false;
        }

        if (Matches("api", "v1", "model-versions") && segments.Length == 4)
        {
            return TryVersionOnly(host, segments[3], out reference, out error);
        }

        if (Matches("api", "v1", "models") && segments.Length == 4)
        {
            if (!TryParseId(segments[3], "model", out var mid, out error))
            {
                return false;
            }
            reference = new CivitaiReference { Host = host, ModelId = mid };
            return true;
        }

        error = $"'{uri.AbsolutePath}' is not a CivitAI model link; paste a model page (/models/123), a version (/model-versions/456) or a download link (/api/download/models/456)";
        return false;
    }

    private static bool TryVersionOnly(string host, string raw, out CivitaiReference reference, out string error)
    {
        reference = new CivitaiReference();
        if (!TryParseId(raw, "version", out var vid, out error))
        {
            return false;
        }
        reference = new CivitaiReference { Host = host, VersionId = vid };
        return true;
    }

    private static bool LooksLikeAir(string text) =>
        text.StartsWith("urn:", StringComparison.OrdinalIgnoreCase)
        || text.StartsWith("air:", StringComparison.OrdinalIgnoreCase)
        || (!text.Contains('/', StringComparison.Ordinal) && text.Contains(":civitai:", StringComparison.OrdinalIgnoreCase));

    private static bool TryParseAir(string text, out CivitaiReference reference, out string error)
    {
        reference = new CivitaiReference();
        var m = AirPattern().Match(text);
        if (!m.Success)
        {
            error = "this AIR is malformed; expected urn:air:{ecosystem}:{type}:civitai:{modelId}@{versionId}";
            return false;
        }
        if (!string.Equals(m.Groups[3].Value, "civitai", StringComparison.OrdinalIgnoreCase))
        {
            error = $"only CivitAI AIRs are accepted; this one points at '{m.Groups[3].Value}'";
            return false;
        }
        if (!TryParseId(m.Groups[4].Value, "model", out var mid, out error))
        {
            return false;
        }
        int? vid = null, fid = null;
        if (m.Groups[5].Success)
        {
            if (!TryParseId(m.Groups[5].Value, "version", out var v, out error))
            {
                return false;
            }
            vid = v;
        }
        if (m.Groups[6].Success)
        {
            if (vid is null)
            {
                error = "an AIR with a +fileId must also name the version (@versionId)";
                return false;
            }
            if (!TryParseId(m.Groups[6].Value, "file", out var f, out error))
            {
                return false;
            }
            fid = f;
        }

        var air = new StringBuilder("urn:air:")
            .Append(m.Groups[1].Value.ToLowerInvariant()).Append(':')
            .Append(m.Groups[2].Value.ToLowerInvariant()).Append(":civitai:").Append(mid);
        if (vid is not null)
        {
            air.Append('@').Append(vid);
        }
        if (fid is not null)
        {
            air.Append('+').Append(fid);
        }
        if (m.Groups[7].Success)
        {
            air.Append('.').Append(m.Groups[7].Value.ToLowerInvariant());
        }

        reference = new CivitaiReference { ModelId = mid, VersionId = vid, FileId = fid, Air = air.ToString() };
        return true;
    }

    /// <summary>CivitAI ids are Postgres int4 and positive.</summary>
    internal static bool TryParseId(string raw, string what, out int id, out string error)
    {
        error = "";
        if (raw.Length is > 0 and <= 12
            && raw.All(char.IsAsciiDigit)
            && int.TryParse(raw, NumberStyles.None, CultureInfo.InvariantCulture, out id)
            && id > 0)
        {
            return true;
        }
        id = 0;
        var shown = raw.Length > 20 ? raw[..20] + "…" : raw;
        error = $"'{shown}' is not a valid CivitAI {what} id (expected a whole number from 1 to 2147483647)";
        return false;
    }

    private static List<KeyValuePair<string, string>> ParseQuery(string query)
    {
        var result = new List<KeyValuePair<string, string>>();
        foreach (var part in query.TrimStart('?').Split('&', StringSplitOptions.RemoveEmptyEntries))
        {
            var eq = part.IndexOf('=', StringComparison.Ordinal);
            var key = Decode(eq < 0 ? part : part[..eq]);
            var value = eq < 0 ? "" : Decode(part[(eq + 1)..]);
            result.Add(new(key, value));
        }
        return result;

        static string Decode(string s) => Uri.UnescapeDataString(s.Replace('+', ' '));
    }

    private static string? NullIfEmpty(string? s) => string.IsNullOrWhiteSpace(s) ? null : s;
}
