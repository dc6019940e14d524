using System.Threading.RateLimiting;

namespace LoraDeploy.RateLimits;

/// <summary>
/// One user's limiter on this replica: a fixed one-minute window whose count lives in the database
/// (<see cref="RateLimitCounter"/>), so the budget holds across replicas. It hands out permits it claimed from the
/// window's row in batches, and claims the next batch when those run out.
/// </summary>
/// <remarks>
/// ASP.NET Core's rate-limiting middleware first calls the synchronous <see cref="RateLimiter.AttemptAcquire"/> and,
/// when that fails, <see cref="RateLimiter.AcquireAsync"/>. The synchronous call only takes a permit already held in
/// memory; claiming more needs a database round trip, which on the request thread would be sync over async, so it
/// declines instead and the asynchronous call claims.
/// </remarks>
internal sealed class DatabaseWindowLimiter(RateLimitCounter counter, long userId, int limit, TimeProvider time) : RateLimiter
{
    private readonly Lock _held = new();
    private readonly SemaphoreSlim _claiming = new(1, 1);
    private long _heldWindow = long.MinValue;
    private int _heldPermits;
    private long _spentWindow = long.MinValue;
    private long _lastUsed = time.GetTimestamp();

    public override TimeSpan? IdleDuration => time.GetElapsedTime(Volatile.Read(ref _lastUsed));

    public override RateLimiterStatistics? GetStatistics() => null;

    protected override RateLimitLease AttemptAcquireCore(int permitCount)
    {
        CheckOnePermit(permitCount);
        return TakeHeld(counter.Current().Window) ? WindowLease.Acquired : WindowLease.NotTried;
    }

    protected override async ValueTask<RateLimitLease> AcquireAsyncCore(int permitCount, CancellationToken cancellationToken)
    {
        CheckOnePermit(permitCount);
        Volatile.Write(ref _lastUsed, time.GetTimestamp());
        var (now, resetNow) = counter.Current();
        if (TakeHeld(now))
        {
            return WindowLease.Acquired;
        }
        // A spent window stays spent (no replica gives permits back): refuse without asking the database again.
        if (Volatile.Read(ref _spentWindow) == now)
        {
            return WindowLease.Refused(limit, resetNow);
        }
        // One claim at a time per user on this replica: requests that arrive meanwhile take from the batch it brings.
        await _claiming.WaitAsync(cancellationToken);
        try
        {
            var (window, resetAfter) = counter.Current();
            if (TakeHeld(window))
            {
                return WindowLease.Acquired;
            }
            var claimed = await counter.ClaimAsync(userId, limit, window, cancellationToken);
            if (claimed == 0)
            {
                Volatile.Write(ref _spentWindow, window);
                return WindowLease.Refused(limit, resetAfter);
            }
            lock (_held)
            {
                _heldWindow = window;
                _heldPermits = claimed - 1;
            }
            return WindowLease.Acquired;
        }
        finally
        {
            _claiming.Release();
        }
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            _claiming.Dispose();
        }
        base.Dispose(disposing);
    }

    private bool TakeHeld(long window)
    {
        lock (_held)
        {
            if (_heldWindow != window || _heldPermits == 0)
            {
                return false;
            }
            _heldPermits--;
            return true;
        }
    }

    private static void CheckOnePermit(int permitCount)
    {
        if (permitCount != 1)
        {
            throw new ArgumentOutOfRangeException(nameof(permitCount), permitCount, "The management rate limit takes one permit per request.");
        }
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
