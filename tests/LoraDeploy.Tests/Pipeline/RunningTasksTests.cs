using LoraDeploy.Pipeline;
using LoraDeploy.Tests.Workers;

namespace LoraDeploy.Tests.Pipeline;

/// <summary>The background loops' record of what runs: a key is there from before its work starts until it ends.</summary>
public sealed class RunningTasksTests
{
    [Fact]
    public async Task A_run_that_ends_at_once_leaves_no_key_behind_and_can_start_again()
    {
        var running = new RunningTasks<int>();
        // A run that ends before the starter gets to record it is the race: repeat it until it would have shown.
        for (var i = 0; i < 2000; i++)
        {
            var ended = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            Assert.True(running.TryStart(1, () => Task.CompletedTask, () => ended.SetResult()));
            await ended.Task;
            Assert.False(running.Contains(1), $"run {i} left its key behind");
            Assert.Equal(0, running.Count);
        }
    }

    [Fact]
    public async Task A_key_that_runs_is_not_started_twice_and_WhenAll_waits_for_every_run()
    {
        var running = new RunningTasks<string>();
        var release = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var starts = 0;
        var ends = 0;
        Func<Task> work = async () =>
        {
            Interlocked.Increment(ref starts);
            await release.Task;
        };

        Assert.True(running.TryStart("a", work, () => Interlocked.Increment(ref ends)));
        Assert.False(running.TryStart("a", work, () => Interlocked.Increment(ref ends)));
        Assert.True(running.TryStart("b", work, () => Interlocked.Increment(ref ends)));
        Assert.Equal(2, running.Count);

        var all = running.WhenAll();
        await Task.Delay(50);
        Assert.False(all.IsCompleted);
        release.SetResult();
        await all;
        await Eventually.TrueAsync(() => Volatile.Read(ref ends) == 2, "both runs end");
        Assert.Equal(2, starts);
        Assert.Equal(0, running.Count);
    }

    [Fact]
    public async Task A_run_that_throws_still_removes_its_key()
    {
        var running = new RunningTasks<int>();
        var ended = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        Assert.True(running.TryStart(7, () => throw new InvalidOperationException("boom"), () => ended.SetResult()));
        await ended.Task;
        Assert.False(running.Contains(7));
        Assert.True(running.TryStart(7, () => Task.CompletedTask, () => { }));
    }
}
