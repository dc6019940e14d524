using System.Collections.Concurrent;

namespace LoraDeploy.Pipeline;

/// <summary>
/// The work a background loop has started and not seen end, by key (a download, a deploy, an export). A key is added
/// before its work starts and removed when it ends. Started the other way round (<c>dict[key] = Task.Run(…)</c>, with
/// the task removing its own key), a run that ended at once removed nothing and its key stayed for good: the item was
/// never started again and one slot of the loop's limit was lost.
/// </summary>
public sealed class RunningTasks<TKey> where TKey : notnull
{
    private readonly ConcurrentDictionary<TKey, Task> _running = new();

    public int Count => _running.Count;

    public bool Contains(TKey key) => _running.ContainsKey(key);

    /// <summary>Every run still going, for a host that waits for them as it stops.</summary>
    public Task WhenAll() => Task.WhenAll(_running.Values);

    /// <summary>
    /// Starts <paramref name="work"/> on the thread pool under <paramref name="key"/> unless that key is already running;
    /// <paramref name="ended"/> is called once the key is gone (to wake the loop, which may start more then).
    /// </summary>
    public bool TryStart(TKey key, Func<Task> work, Action ended)
    {
        var run = new Task<Task>(async () =>
        {
            try
            {
                await work();
            }
            finally
            {
                _running.TryRemove(key, out _);
                ended();
            }
        });
        if (!_running.TryAdd(key, run.Unwrap()))
        {
            return false; // never started
        }
        run.Start(TaskScheduler.Default);
        return true;
    }
}
