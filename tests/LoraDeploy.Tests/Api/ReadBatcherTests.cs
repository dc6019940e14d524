using LoraDeploy.Deploys;

namespace LoraDeploy.Tests.Api;

/// <summary>
/// The coalescing under the PostgreSQL deploy reads, with a fetch the test holds open: what shares a query, what
/// never does, and what a failed query takes down.
/// </summary>
public sealed class ReadBatcherTests
{
    /// <summary>A fetch that records each call's keys and completes when the test says so.</summary>
    private sealed class HeldFetch
    {
        private readonly List<(string[] Keys, TaskCompletionSource<IReadOnlyDictionary<string, string>> Answer)> _calls = [];

        public int Calls
        {
            get
            {
                lock (_calls)
                {
                    return _calls.Count;
                }
            }
        }

        public Task<IReadOnlyDictionary<string, string>> FetchAsync(IReadOnlyCollection<string> keys)
        {
            var answer = new TaskCompletionSource<IReadOnlyDictionary<string, string>>(TaskCreationOptions.RunContinuationsAsynchronously);
            lock (_calls)
            {
                _calls.Add(([.. keys], answer));
            }
            return answer.Task;
        }

        public string[] KeysOf(int call)
        {
            lock (_calls)
            {
                return [.. _calls[call].Keys.Order(StringComparer.Ordinal)];
            }
        }

        /// <summary>Answers call <paramref name="call"/>: every key it asked for except "missing" is found as "value of KEY".</summary>
        public void Answer(int call)
        {
            TaskCompletionSource<IReadOnlyDictionary<string, string>> answer;
            string[] keys;
            lock (_calls)
            {
                (keys, answer) = _calls[call];
            }
            answer.SetResult(keys.Where(k => k != "missing").ToDictionary(k => k, k => $"value of {k}"));
        }

        public void Fail(int call, Exception error)
        {
            lock (_calls)
            {
                _calls[call].Answer.SetException(error);
            }
        }

        public async Task WaitForCallsAsync(int count)
        {
            for (var i = 0; i < 500 && Calls < count; i++)
            {
                await Task.Delay(10, TestContext.Current.CancellationToken);
            }
            Assert.Equal(count, Calls);
        }
    }

    [Fact]
    public async Task A_lone_lookup_is_sent_at_once_and_lookups_that_wait_share_the_next_query()
    {
        var fetch = new HeldFetch();
        var batcher = new ReadBatcher<string, string>(fetch.FetchAsync, maxRunning: 1, maxBatch: 256);

        var first = batcher.GetAsync("a");
        Assert.Equal(1, fetch.Calls);
        Assert.Equal(["a"], fetch.KeysOf(0));

        // While that query is out, these wait; the same key twice is asked for once.
        var waiting = new[] { batcher.GetAsync("b"), batcher.GetAsync("c"), batcher.GetAsync("c"), batcher.GetAsync("missing") };
        Assert.Equal(1, fetch.Calls);
        Assert.All(waiting, lookup => Assert.False(lookup.IsCompleted));

        fetch.Answer(0);
        Assert.Equal("value of a", await first);
        await fetch.WaitForCallsAsync(2);
        Assert.Equal(["b", "c", "missing"], fetch.KeysOf(1));
        fetch.Answer(1);
        Assert.Equal(["value of b", "value of c", "value of c", null], await Task.WhenAll(waiting));

        // Idle again: the next lookup goes out alone and at once.
        var later = batcher.GetAsync("d");
        await fetch.WaitForCallsAsync(3);
        Assert.Equal(["d"], fetch.KeysOf(2));
        fetch.Answer(2);
        Assert.Equal("value of d", await later);
    }

    [Fact]
    public async Task A_lookup_never_joins_a_query_already_sent()
    {
        // Read-your-writes: a query sent before a lookup was asked may predate a write the caller just made, so the
        // lookup must be answered by a query that starts after it.
        var fetch = new HeldFetch();
        var batcher = new ReadBatcher<string, string>(fetch.FetchAsync, maxRunning: 2, maxBatch: 256);

        var first = batcher.GetAsync("x");
        var second = batcher.GetAsync("x");
        Assert.Equal(2, fetch.Calls);
        var third = batcher.GetAsync("x");
        Assert.Equal(2, fetch.Calls);

        fetch.Answer(0);
        fetch.Answer(1);
        await fetch.WaitForCallsAsync(3);
        Assert.Equal(["x"], fetch.KeysOf(2));
        Assert.False(third.IsCompleted);
        fetch.Answer(2);
        Assert.Equal(["value of x", "value of x", "value of x"], await Task.WhenAll(first, second, third));
    }

    [Fact]
    public async Task A_failed_query_fails_its_own_lookups_only()
    {
        var fetch = new HeldFetch();
        var batcher = new ReadBatcher<string, string>(fetch.FetchAsync, maxRunning: 1, maxBatch: 256);

        var first = batcher.GetAsync("a");
        var waiting = batcher.GetAsync("b");
        fetch.Fail(0, new InvalidOperationException("the database went away"));
        Assert.Equal("the database went away", (await Assert.ThrowsAsync<InvalidOperationException>(() => first)).Message);

        await fetch.WaitForCallsAsync(2);
        fetch.Answer(1);
        Assert.Equal("value of b", await waiting);

        var after = batcher.GetAsync("c");
        await fetch.WaitForCallsAsync(3);
        fetch.Answer(2);
        Assert.Equal("value of c", await after);
    }

    [Fact]
    public async Task A_query_takes_at_most_max_batch_lookups_in_arrival_order()
    {
        var fetch = new HeldFetch();
        var batcher = new ReadBatcher<string, string>(fetch.FetchAsync, maxRunning: 1, maxBatch: 2);

        var lookups = new[] { "k0", "k1", "k2", "k3", "k4", "k5" }.Select(batcher.GetAsync).ToArray();
        Assert.Equal(["k0"], fetch.KeysOf(0));
        fetch.Answer(0);
        await fetch.WaitForCallsAsync(2);
        Assert.Equal(["k1", "k2"], fetch.KeysOf(1));
        fetch.Answer(1);
        await fetch.WaitForCallsAsync(3);
        Assert.Equal(["k3", "k4"], fetch.KeysOf(2));
        fetch.Answer(2);
        await fetch.WaitForCallsAsync(4);
        Assert.Equal(["k5"], fetch.KeysOf(3));
        fetch.Answer(3);
        Assert.Equal(lookups.Select((_, i) => $"value of k{i}"), await Task.WhenAll(lookups));
    }
}
