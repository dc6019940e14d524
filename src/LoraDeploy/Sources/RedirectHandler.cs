using System.Diagnostics.CodeAnalysis;
using System.Net;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Sources;

/// <summary>
/// Follows redirects hop by hop (auto-redirect is off on the primary handler) so that every hop goes back
/// through the connect guard, and drops <c>Authorization</c> as soon as the origin changes.
/// </summary>
internal sealed class RedirectHandler(IOptionsMonitor<ImportOptions> import, IOptionsMonitor<CivitaiOptions> civitai) : DelegatingHandler
{
    /// <summary>Set to false on a request to get the 3xx itself (used to probe CivitAI's download endpoint).</summary>
    public static readonly HttpRequestOptionsKey<bool> FollowRedirects = new("LoraDeploy.FollowRedirects");

    protected override async Task<HttpResponseMessage> SendAsync(HttpRequestMessage request, CancellationToken cancellationToken)
    {
        var follow = !request.Options.TryGetValue(FollowRedirects, out var f) || f;
        var maxHops = import.CurrentValue.MaxRedirects;
        var authOrigin = request.Headers.Authorization is not null ? Origin(request.RequestUri!) : null;
        var current = request;
        for (var hop = 0; ; hop++)
        {
            var response = await SendUnwrappedAsync(current, viaRedirect: hop > 0, cancellationToken).ConfigureAwait(false);
            if (!follow || !IsRedirect(response.StatusCode))
            {
                return response;
            }
            if (!TryGetTarget(response, current.RequestUri!, out var target, out var problem))
            {
                var status = (int)response.StatusCode;
                response.Dispose();
                // Not transient (the same answer would come again), so not an HttpRequestException the retry would repeat.
                throw new UpstreamAnswerException($"{Who(current.RequestUri!)} answered {status} with an unusable redirect Location ({problem})", ReasonClass.Upstream);
            }
            if (hop >= maxHops)
            {
                response.Dispose();
                // A redirect loop will not fix itself, so this is a refusal rather than a retryable network error.
                throw new OutboundRequestRefusedException($"gave up after {maxHops} redirects starting at {Redact(request.RequestUri!)}; raise Import:MaxRedirects if this is expected");
            }

            response.Dispose();
            if (target.Scheme != Uri.UriSchemeHttp && target.Scheme != Uri.UriSchemeHttps)
            {
                throw new OutboundRequestRefusedException($"refused to follow a redirect to a {target.Scheme}: URL; only http and https are fetched");
            }

            var next = new HttpRequestMessage(HttpMethod.Get, target) { Version = current.Version, VersionPolicy = current.VersionPolicy };
            foreach (var header in current.Headers)
            {
                // Host and Cookie belong to the previous hop; Range, Accept and User-Agent carry over.
                if (!header.Key.Equals("Host", StringComparison.OrdinalIgnoreCase) && !header.Key.Equals("Cookie", StringComparison.OrdinalIgnoreCase))
                {
                    next.Headers.TryAddWithoutValidation(header.Key, header.Value);
                }
            }
            foreach (var option in current.Options)
            {
                ((IDictionary<string, object?>)next.Options)[option.Key] = option.Value;
            }
            // Never hand a credential to an origin other than the one it was set for (signed storage links reject it anyway).
            if (authOrigin is null || Origin(target) != authOrigin)
            {
                next.Headers.Authorization = null;
            }
            if (!ReferenceEquals(current, request))
            {
                current.Dispose();
            }
            current = next;
        }
    }

    private async Task<HttpResponseMessage> SendUnwrappedAsync(HttpRequestMessage request, bool viaRedirect, CancellationToken cancellationToken)
    {
        try
        {
            return await base.SendAsync(request, cancellationToken).ConfigureAwait(false);
        }
        catch (HttpRequestException ex) when (ex.InnerException is OutboundRequestRefusedException refused)
        {
            // Surface the refusal itself so the retry strategy does not treat it as a transient network error.
            throw viaRedirect ? refused.ForRedirect() : refused;
        }
    }

    /// <summary>The absolute target of a 3xx, or why its Location cannot be followed.</summary>
    private static bool TryGetTarget(HttpResponseMessage response, Uri current, [NotNullWhen(true)] out Uri? target, [NotNullWhen(false)] out string? problem)
    {
        target = null;
        if (response.Headers.Location is { } location)
        {
            if (location.IsAbsoluteUri ? (target = location) is not null : Uri.TryCreate(current, location, out target))
            {
                problem = null;
                return true;
            }
        }
        // An unparsable Location is dropped by the typed header but kept among the raw ones.
        problem = response.Headers.NonValidated.TryGetValues("Location", out var raw) && raw.Count > 0
            ? $"\"{Printable(raw.ToString())}\" is not a URL"
            : "no Location header";
        return false;
    }

    private static string Printable(string raw)
    {
        var cleaned = new string(raw.Select(c => char.IsControl(c) ? '?' : c).ToArray());
        return cleaned.Length > 200 ? cleaned[..200] + "…" : cleaned;
    }

    private string Who(Uri uri) =>
        Origin(uri) == Origin(civitai.CurrentValue.GetBaseUri()) ? "CivitAI" : $"the host {uri.IdnHost}";

    private static bool IsRedirect(HttpStatusCode status) => status is HttpStatusCode.MovedPermanently or HttpStatusCode.Found
        or HttpStatusCode.SeeOther or HttpStatusCode.TemporaryRedirect or HttpStatusCode.PermanentRedirect;

    private static string Origin(Uri uri) => $"{uri.Scheme}://{uri.IdnHost}:{uri.Port}".ToLowerInvariant();

    /// <summary>A URL for messages: no query (signed links and tokens live there).</summary>
    internal static string Redact(Uri uri) => uri.GetLeftPart(UriPartial.Path);
}
