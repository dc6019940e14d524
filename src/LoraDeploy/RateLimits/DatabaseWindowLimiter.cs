using System.Threading.RateLimiting;

namespace LoraDeploy.RateLimits;

/// <summary>
/// One user's limiter: a fixed one-minute window whose count lives in the database (<see cref="RateLimitCounter"/>),
/// so the budget holds across replicas. This object holds no count; it only names the user and the limit.
/// </summary>
/// <remarks>
/// ASP.NET Core's rate-limiting middleware first calls the synchronous <see cref="RateLimiter.AttemptAcquire"/> and,
/// when that fails, <see cref="RateLimiter.AcquireAsync"/>. Answering the synchronous call would need a database round
/// trip on the request thread (sync over async), so it always declines without looking; the middleware drops that
/// lease and the real decision is made in the asynchronous call, which awaits one upsert.
/// </remarks>
internal sealed class DatabaseWindowLimiter(RateLimitCounter counter, long userId, int limit, TimeProvider time) : RateLimiter
{
    private long _lastUsed = time.GetTimestamp();

    public override TimeSpan? IdleDuration => time.GetElapsedTime(Volatile.Read(ref _lastUsed));

    public override RateLimiterStatistics? GetStatistics() => null;

    protected override RateLimitLease AttemptAcquireCore(int permitCount) => WindowLease.NotTried;

    protected override async ValueTask<RateLimitLease> AcquireAsyncCore(int permitCount, CancellationToken cancellationToken)
    {
        if (permitCount != 1)
        {
            throw new ArgumentOutOfRangeException(nameof(permitCount), permitCount, "The management rate limit takes one permit per request.");
        }
        Volatile.Write(ref _lastUsed, time.GetTimestamp());
        var decision = await counter.TryTakeAsync(userId, limit, cancellationToken);
        return decision.Allowed ? WindowLease.Acquired : WindowLease.Refused(limit, decision.ResetAfter);
    }

    private sealed class WindowLease(bool acquired, TimeSpan? retryAfter, string? reason) : RateLimitLease
    {
        public static readonly WindowLease Acquired = new(true, null, null);
        public static readonly WindowLease NotTried = new(false, null, null);

        public static WindowLease Refused(int limit, TimeSpan retryAfter) =>
            new(false, retryAfter, $"Rate limited: at most {limit} requests per minute on the management API");

        public override bool IsAcquired => acquired;

        public override IEnumerable<string> MetadataNames =>
            retryAfter is null ? [] : [MetadataName.RetryAfter.Name, MetadataName.ReasonPhrase.Name];

        public override bool TryGetMetadata(string metadataName, out object? metadata)
        {
            metadata = metadataName == MetadataName.RetryAfter.Name ? retryAfter
                : metadataName == MetadataName.ReasonPhrase.Name ? reason
                : null;
            return metadata is not null;
        }
    }
}
