namespace LoraDeploy.Sources;

/// <summary>
/// The one allowance of requests a download may make without getting anywhere: every attempt counts, whether the
/// resilience handler retries a 429/5xx or the downloader resumes, restarts or refreshes its signed link.
/// At most 1 + Import:MaxRetryAttempts + Import:MaxResumeAttempts requests in a row bring no new data; each
/// <see cref="RestoreBytes"/> past the furthest byte ever reached restores the full allowance. Bytes fetched again
/// after a restart are not new, so storage that keeps sending the same prefix cannot loop forever.
/// </summary>
public sealed class DownloadAttemptBudget
{
    /// <summary>Set on each request of a download so <see cref="DownloadAttemptBudgetHandler"/> counts its attempts.</summary>
    public static readonly HttpRequestOptionsKey<DownloadAttemptBudget> Key = new("LoraDeploy.DownloadAttemptBudget");

    public const long RestoreBytes = 1024 * 1024;

    private readonly object _gate = new();
    private int _spent;
    private long _furthest;
    private long _restoredAt;

    public DownloadAttemptBudget(ImportOptions import, long startOffset = 0)
    {
        Allowance = 1 + import.MaxRetryAttempts + import.MaxResumeAttempts;
        _furthest = _restoredAt = startOffset;
    }

    /// <summary>Requests allowed in a row without new data.</summary>
    public int Allowance { get; }

    /// <summary>Requests made since the allowance was last restored.</summary>
    public int Spent
    {
        get
        {
            lock (_gate)
            {
                return _spent;
            }
        }
    }

    /// <summary>The furthest byte offset the staging file ever reached.</summary>
    public long Furthest
    {
        get
        {
            lock (_gate)
            {
                return _furthest;
            }
        }
    }

    /// <summary>What went wrong last, for the fail reason when the budget runs out.</summary>
    public string? LastProblem { get; set; }

    /// <summary>The reason class that goes with <see cref="LastProblem"/>.</summary>
    public string LastProblemClass { get; set; } = ReasonClass.Network;

    /// <summary>Counts one request; false when the allowance is used up.</summary>
    public bool TrySpend()
    {
        lock (_gate)
        {
            if (_spent >= Allowance)
            {
                return false;
            }
            _spent++;
            return true;
        }
    }

    /// <summary>Notes that the staging file now holds <paramref name="offset"/> bytes; true when that is past every earlier offset.</summary>
    public bool NoteOffset(long offset)
    {
        lock (_gate)
        {
            if (offset <= _furthest)
            {
                return false;
            }
            _furthest = offset;
            if (_furthest - _restoredAt >= RestoreBytes)
            {
                _spent = 0;
                _restoredAt = _furthest;
            }
            return true;
        }
    }
}

/// <summary>The budget ran out: the download cannot make real progress.</summary>
public sealed class DownloadAttemptsExhaustedException(DownloadAttemptBudget budget)
    : Exception($"{budget.Allowance} requests in a row brought no new data (last: {budget.LastProblem ?? "no answer"})")
{
    public DownloadAttemptBudget Budget { get; } = budget;
}

/// <summary>
/// Sits inside the resilience handler, so it sees every attempt the retry strategy makes, and refuses the next one
/// once the request's <see cref="DownloadAttemptBudget"/> is used up. Requests without a budget pass through.
/// </summary>
internal sealed class DownloadAttemptBudgetHandler : DelegatingHandler
{
    protected override async Task<HttpResponseMessage> SendAsync(HttpRequestMessage request, CancellationToken cancellationToken)
    {
        if (!request.Options.TryGetValue(DownloadAttemptBudget.Key, out var budget))
        {
            return await base.SendAsync(request, cancellationToken).ConfigureAwait(false);
        }
        if (!budget.TrySpend())
        {
            // Not an HttpRequestException, so the retry strategy stops here instead of trying again.
            throw new DownloadAttemptsExhaustedException(budget);
        }
        try
        {
            var response = await base.SendAsync(request, cancellationToken).ConfigureAwait(false);
            if ((int)response.StatusCode is 429 or >= 500)
            {
                var host = response.RequestMessage?.RequestUri?.IdnHost ?? request.RequestUri?.IdnHost;
                budget.LastProblem = $"{host} answered {(int)response.StatusCode}";
                budget.LastProblemClass = (int)response.StatusCode == 429 ? ReasonClass.RateLimited : ReasonClass.Upstream;
            }
            return response;
        }
        catch (HttpRequestException ex)
        {
            budget.LastProblem = ex.Message;
            budget.LastProblemClass = ReasonClass.Network;
            throw;
        }
    }
}
