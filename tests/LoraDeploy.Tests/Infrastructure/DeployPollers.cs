namespace LoraDeploy.Tests;

/// <summary>
/// Clients polling one deploy and its owner's list in a loop, as dashboards and SDKs do, until disposed: they keep the
/// server's reads busy (shared queries on PostgreSQL, kept bodies on SQLite) while a test writes and reads.
/// </summary>
public sealed class DeployPollers : IAsyncDisposable
{
    private readonly CancellationTokenSource _stop = new();
    private readonly List<Task> _pollers;

    public DeployPollers(HttpClient client, string deployId, int count = 8)
    {
        _pollers = Enumerable.Range(0, count).Select(n => Task.Run(async () =>
        {
            while (!_stop.IsCancellationRequested)
            {
                await client.GetAsync(n % 2 == 0 ? $"/deploy/{deployId}" : "/deploy/list", CancellationToken.None);
            }
        })).ToList();
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync();
        await Task.WhenAll(_pollers);
        _stop.Dispose();
    }
}
