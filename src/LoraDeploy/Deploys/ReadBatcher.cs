namespace LoraDeploy.Deploys;

/// <summary>
/// Coalesces concurrent lookups into one query. A lookup waits only while <c>maxRunning</c> queries are already out;
/// the next query to start then takes every lookup waiting (up to <c>maxBatch</c>). An idle server sends each lookup
/// alone, and no lookup ever joins a query that has already started, so it sees every write that committed before
/// it was asked (read-your-writes, as one query per lookup would). Under load, PostgreSQL answers one statement for
/// many polls: per-statement work in Npgsql and in the backend was most of each request's cost (docs/benchmarks.md).
/// </summary>
public sealed class ReadBatcher<TKey, TValue>(
    Func<IReadOnlyCollection<TKey>, Task<IReadOnlyDictionary<TKey, TValue>>> fetch, int maxRunning, int maxBatch)
    where TKey : notnull
    where TValue : class
{
    private readonly Lock _gate = new();
    private readonly Queue<Lookup> _waiting = new();
    private int _running;

    /// <summary>The value for <paramref name="key"/>, or null when the query found none.</summary>
    public Task<TValue?> GetAsync(TKey key)
    {
        // Completed from the query's continuation; each waiting request resumes on its own thread-pool item.
        var lookup = new Lookup(key, new TaskCompletionSource<TValue?>(TaskCreationOptions.RunContinuationsAsynchronously));
        bool start;
        lock (_gate)
        {
            _waiting.Enqueue(lookup);
            start = _running < maxRunning;
            if (start)
            {
                _running++;
            }
        }
        if (start)
        {
            _ = RunAsync();
        }
        return lookup.Done.Task;
    }

    /// <summary>Sends queries until nothing waits. Never throws: a failed query fails its own lookups.</summary>
    private async Task RunAsync()
    {
        while (true)
        {
            var batch = new List<Lookup>();
            lock (_gate)
            {
                while (batch.Count < maxBatch && _waiting.TryDequeue(out var lookup))
                {
                    batch.Add(lookup);
                }
                if (batch.Count == 0)
                {
                    _running--;
                    return;
                }
            }
            try
            {
                var keys = new HashSet<TKey>(batch.Count);
                foreach (var lookup in batch)
                {
                    keys.Add(lookup.Key);
                }
                var found = await fetch(keys);
                foreach (var lookup in batch)
                {
                    lookup.Done.TrySetResult(found.GetValueOrDefault(lookup.Key));
                }
            }
            catch (Exception error)
            {
                foreach (var lookup in batch)
                {
                    lookup.Done.TrySetException(error);
                }
            }
        }
    }

    private readonly record struct Lookup(TKey Key, TaskCompletionSource<TValue?> Done);
}
