using System.ComponentModel.DataAnnotations;
using System.Net;

namespace LoraDeploy.Sources;

/// <summary>Settings section <c>Civitai</c>.</summary>
public sealed class CivitaiOptions : IValidatableObject
{
    public const string SectionName = "Civitai";

    /// <summary>Where the CivitAI API is called, whatever host the user pasted.</summary>
    public string BaseUrl { get; set; } = "https://civitai.com";

    /// <summary>Personal API key; sent as a Bearer header to the BaseUrl host only.</summary>
    public string? Token { get; set; }

    public Uri GetBaseUri() => new(BaseUrl.TrimEnd('/') + "/");

    public bool HasToken => !string.IsNullOrWhiteSpace(Token);

    public IEnumerable<ValidationResult> Validate(ValidationContext validationContext)
    {
        if (!Uri.TryCreate(BaseUrl, UriKind.Absolute, out var uri) || (uri.Scheme != Uri.UriSchemeHttps && uri.Scheme != Uri.UriSchemeHttp))
        {
            yield return new ValidationResult($"Civitai:BaseUrl must be an absolute http(s) URL; got '{BaseUrl}'", [nameof(BaseUrl)]);
        }
        if (Token is { } t && t.Any(char.IsWhiteSpace) && !string.IsNullOrWhiteSpace(t))
        {
            yield return new ValidationResult("Civitai:Token must not contain whitespace", [nameof(Token)]);
        }
    }
}

/// <summary>Settings section <c>HuggingFace</c>. There is no token setting: each import brings its own hf_token and nothing keeps it.</summary>
public sealed class HuggingFaceOptions : IValidatableObject
{
    public const string SectionName = "HuggingFace";

    /// <summary>Where the Hub's API and files are fetched; links on huggingface.co or on this host are accepted.</summary>
    public string BaseUrl { get; set; } = "https://huggingface.co";

    public Uri GetBaseUri() => new(BaseUrl.TrimEnd('/') + "/");

    public IEnumerable<ValidationResult> Validate(ValidationContext validationContext)
    {
        if (!Uri.TryCreate(BaseUrl, UriKind.Absolute, out var uri) || (uri.Scheme != Uri.UriSchemeHttps && uri.Scheme != Uri.UriSchemeHttp))
        {
            yield return new ValidationResult($"HuggingFace:BaseUrl must be an absolute http(s) URL; got '{BaseUrl}'", [nameof(BaseUrl)]);
        }
        else if (uri.Query.Length > 0 || uri.Fragment.Length > 0 || uri.UserInfo.Length > 0)
        {
            yield return new ValidationResult($"HuggingFace:BaseUrl must be a plain URL like https://huggingface.co, without user, query or fragment; got '{BaseUrl}'", [nameof(BaseUrl)]);
        }
    }
}

/// <summary>Settings section <c>Network</c>: what the outbound guard lets through.</summary>
public sealed class NetworkOptions : IValidatableObject
{
    public const string SectionName = "Network";

    /// <summary>CIDR ranges (e.g. <c>127.0.0.1/32</c>, <c>10.0.0.0/8</c>) of otherwise-refused addresses that may be contacted.</summary>
    public List<string> AllowedPrivateRanges { get; set; } = [];

    /// <summary>TCP connect timeout per address.</summary>
    public TimeSpan ConnectTimeout { get; set; } = TimeSpan.FromSeconds(15);

    internal IReadOnlyList<IPNetwork> ParsedRanges()
    {
        var list = new List<IPNetwork>();
        foreach (var entry in Entries())
        {
            if (TryParseRange(entry, out var net))
            {
                list.Add(net);
            }
        }
        return list;
    }

    // A single entry may hold a comma-separated list, so `--Network:AllowedPrivateRanges:0=a,b` works too.
    private IEnumerable<string> Entries() =>
        AllowedPrivateRanges.SelectMany(e => (e ?? "").Split([',', ';', ' '], StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries));

    private static bool TryParseRange(string entry, out IPNetwork network)
    {
        if (IPNetwork.TryParse(entry, out network))
        {
            // Insist on a clean base address: "192.168.1.5/16" is more likely a typo than a wish to allow a /16.
            return HostBitsAreZero(network, entry);
        }
        // A bare address means just that address.
        if (IPAddress.TryParse(entry, out var address))
        {
            network = new IPNetwork(address, address.AddressFamily == System.Net.Sockets.AddressFamily.InterNetwork ? 32 : 128);
            return true;
        }
        return false;
    }

    private static bool HostBitsAreZero(IPNetwork network, string entry)
    {
        var slash = entry.IndexOf('/', StringComparison.Ordinal);
        if (slash < 0 || !IPAddress.TryParse(entry[..slash], out var written))
        {
            return true;
        }
        var bytes = written.GetAddressBytes();
        for (var bit = network.PrefixLength; bit < bytes.Length * 8; bit++)
        {
            if ((bytes[bit / 8] & (0x80 >> (bit % 8))) != 0)
            {
                return false;
            }
        }
        return true;
    }

    public IEnumerable<ValidationResult> Validate(ValidationContext validationContext)
    {
        foreach (var entry in Entries())
        {
            if (!TryParseRange(entry, out _))
            {
                yield return new ValidationResult(
                    $"Network:AllowedPrivateRanges entry '{entry}' is not a CIDR range like 10.0.0.0/8 or fd00::/8 (host bits must be zero)",
                    [nameof(AllowedPrivateRanges)]);
            }
        }
        if (ConnectTimeout <= TimeSpan.Zero)
        {
            yield return new ValidationResult("Network:ConnectTimeout must be positive", [nameof(ConnectTimeout)]);
        }
    }
}

/// <summary>Settings section <c>Import</c>: limits and retry knobs for fetching adapters.</summary>
public sealed class ImportOptions : IValidatableObject
{
    public const string SectionName = "Import";

    /// <summary>Largest adapter file accepted (default 4 GiB).</summary>
    public long MaxFileBytes { get; set; } = 4L * 1024 * 1024 * 1024;

    /// <summary>
    /// Retries after the first attempt for 429/5xx/timeouts (so at most this + 1 attempts per request). A download's
    /// retries and resumes share one budget of 1 + this + <see cref="MaxResumeAttempts"/> requests without new data.
    /// </summary>
    public int MaxRetryAttempts { get; set; } = 4;

    /// <summary>First backoff delay; later ones grow exponentially with jitter.</summary>
    public TimeSpan RetryBaseDelay { get; set; } = TimeSpan.FromSeconds(1);

    /// <summary>Cap on any single retry delay, including one asked for by Retry-After.</summary>
    public TimeSpan RetryMaxDelay { get; set; } = TimeSpan.FromSeconds(30);

    /// <summary>Time allowed for one attempt to get response headers.</summary>
    public TimeSpan AttemptTimeout { get; set; } = TimeSpan.FromSeconds(30);

    /// <summary>A body read that makes no progress for this long counts as a dropped connection.</summary>
    public TimeSpan ReadIdleTimeout { get; set; } = TimeSpan.FromSeconds(60);

    /// <summary>How many times a download may resume (Range) or refresh its signed link in a row without new bytes.</summary>
    public int MaxResumeAttempts { get; set; } = 5;

    /// <summary>A download slower than this over <see cref="MinRateWindow"/> fails, so it frees its slot (0 turns the check off).</summary>
    public long MinBytesPerSecond { get; set; } = 4096;

    /// <summary>The span over which <see cref="MinBytesPerSecond"/> is measured.</summary>
    public TimeSpan MinRateWindow { get; set; } = TimeSpan.FromMinutes(1);

    /// <summary>Largest CivitAI API (JSON) answer read; real ones are a few hundred KiB at most.</summary>
    public long MaxApiBodyBytes { get; set; } = 8L * 1024 * 1024;

    /// <summary>Time allowed for a whole API (JSON or error) body once its headers arrived.</summary>
    public TimeSpan ApiBodyTimeout { get; set; } = TimeSpan.FromSeconds(30);

    /// <summary>Redirect hops followed per request.</summary>
    public int MaxRedirects { get; set; } = 5;

    public IEnumerable<ValidationResult> Validate(ValidationContext validationContext)
    {
        if (MaxFileBytes <= 0)
        {
            yield return new ValidationResult("Import:MaxFileBytes must be positive", [nameof(MaxFileBytes)]);
        }
        if (MaxRetryAttempts is < 0 or > 20)
        {
            yield return new ValidationResult("Import:MaxRetryAttempts must be between 0 and 20", [nameof(MaxRetryAttempts)]);
        }
        if (RetryBaseDelay < TimeSpan.Zero || RetryMaxDelay < RetryBaseDelay)
        {
            yield return new ValidationResult("Import:RetryBaseDelay must be ≥ 0 and ≤ Import:RetryMaxDelay", [nameof(RetryBaseDelay)]);
        }
        // Polly refuses attempt timeouts outside 10 ms .. 1 day.
        if (AttemptTimeout < TimeSpan.FromMilliseconds(10) || AttemptTimeout > TimeSpan.FromDays(1) || ReadIdleTimeout <= TimeSpan.Zero)
        {
            yield return new ValidationResult("Import:AttemptTimeout must be between 10 ms and 1 day, and Import:ReadIdleTimeout positive", [nameof(AttemptTimeout)]);
        }
        if (RetryMaxDelay > TimeSpan.FromDays(1))
        {
            yield return new ValidationResult("Import:RetryMaxDelay must be at most 1 day", [nameof(RetryMaxDelay)]);
        }
        if (MaxResumeAttempts is < 0 or > 100)
        {
            yield return new ValidationResult("Import:MaxResumeAttempts must be between 0 and 100", [nameof(MaxResumeAttempts)]);
        }
        if (MinBytesPerSecond < 0)
        {
            yield return new ValidationResult("Import:MinBytesPerSecond must be ≥ 0 (0 turns the check off)", [nameof(MinBytesPerSecond)]);
        }
        if (MinRateWindow <= TimeSpan.Zero || MinRateWindow > TimeSpan.FromDays(1))
        {
            yield return new ValidationResult("Import:MinRateWindow must be positive and at most 1 day", [nameof(MinRateWindow)]);
        }
        if (MaxApiBodyBytes < 1024)
        {
            yield return new ValidationResult("Import:MaxApiBodyBytes must be at least 1024", [nameof(MaxApiBodyBytes)]);
        }
        if (ApiBodyTimeout <= TimeSpan.Zero || ApiBodyTimeout > TimeSpan.FromDays(1))
        {
            yield return new ValidationResult("Import:ApiBodyTimeout must be positive and at most 1 day", [nameof(ApiBodyTimeout)]);
        }
        if (MaxRedirects is < 0 or > 20)
        {
            yield return new ValidationResult("Import:MaxRedirects must be between 0 and 20", [nameof(MaxRedirects)]);
        }
    }
}
