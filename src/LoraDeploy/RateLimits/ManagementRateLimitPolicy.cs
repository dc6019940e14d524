using System.Globalization;
using System.Threading.RateLimiting;
using LoraDeploy.Auth;
using Microsoft.AspNetCore.RateLimiting;
using Microsoft.Extensions.Options;

namespace LoraDeploy.RateLimits;

/// <summary>
/// The management routes' policy: one partition per authenticated user, limited to the user's requests per minute.
/// Anonymous requests (the few anonymous management routes) and everything when limits are off pass unlimited.
/// </summary>
public sealed class ManagementRateLimitPolicy : IRateLimiterPolicy<long>
{
    public const string Name = "management";

    private const long Unlimited = -1; // user ids start at 1
    private const string DefaultMessage = "Rate limited";

    private readonly RateLimitOptions _options;
    private readonly Dictionary<string, int> _overrides;
    private readonly RateLimitCounter _counter;
    private readonly TimeProvider _time;

    public ManagementRateLimitPolicy(IOptions<RateLimitOptions> options, RateLimitCounter counter, TimeProvider time)
    {
        _options = options.Value;
        // Configuration keys are case-insensitive, so the user names under RateLimits:Users are too.
        _overrides = _options.Users.ToDictionary(u => u.Key, u => u.Value.RequestsPerMinute ?? _options.RequestsPerMinute,
            StringComparer.OrdinalIgnoreCase);
        _counter = counter;
        _time = time;
    }

    public bool Enabled => _options.Enabled;

    /// <summary>The user's requests per minute: the override for this name, else the default.</summary>
    public int LimitFor(string userName) => _overrides.TryGetValue(userName, out var limit) ? limit : _options.RequestsPerMinute;

    public RateLimitPartition<long> GetPartition(HttpContext httpContext)
    {
        if (!_options.Enabled || httpContext.User.Identity?.IsAuthenticated != true)
        {
            return RateLimitPartition.GetNoLimiter(Unlimited);
        }
        var user = CurrentUser.From(httpContext.User);
        var limit = LimitFor(user.Name);
        return RateLimitPartition.Get(user.Id, id => new DatabaseWindowLimiter(_counter, id, limit, _time));
    }

    public Func<OnRejectedContext, CancellationToken, ValueTask>? OnRejected { get; } = WriteRejectionAsync;

    /// <summary>429 <c>{"error": "Rate limited…"}</c> with <c>Retry-After</c>: whole seconds until the window resets, at least 1.</summary>
    private static async ValueTask WriteRejectionAsync(OnRejectedContext context, CancellationToken ct)
    {
        var http = context.HttpContext;
        if (context.Lease.TryGetMetadata(MetadataName.RetryAfter, out var retryAfter))
        {
            var seconds = Math.Max(1, (int)Math.Ceiling(retryAfter.TotalSeconds));
            http.Response.Headers.RetryAfter = seconds.ToString(CultureInfo.InvariantCulture);
        }
        var message = context.Lease.TryGetMetadata(MetadataName.ReasonPhrase, out var reason) && reason is not null ? reason : DefaultMessage;
        await ApiErrors.Error(StatusCodes.Status429TooManyRequests, message).ExecuteAsync(http);
    }
}
