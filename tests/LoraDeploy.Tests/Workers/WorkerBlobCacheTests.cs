using System.Security.Cryptography;

namespace LoraDeploy.Tests.Workers;

/// <summary>The worker's blob cache: a byte budget, least recently used out first, pinned and in-use files kept.</summary>
public sealed class WorkerBlobCacheTests
{
    private const int BlobBytes = 400 * 1024;

    [Fact]
    public async Task Over_its_byte_budget_the_cache_deletes_the_least_recently_used_unpinned_files()
    {
        // Every heartbeat's answer pins the server's holds (none here) over the test's own pin: no heartbeats after the first.
        await using var worker = await WorkerHarness.StartAsync(new Dictionary<string, string> { ["Worker:CacheBytes"] = (1024 * 1024).ToString() }, heartbeatSeconds: 300);
        var cache = worker.Cache;
        var (a, b, c, d) = (Blob(worker), Blob(worker), Blob(worker), Blob(worker));

        await UseAsync(a);
        await UseAsync(b);
        await UseAsync(a); // b is now the least recently used
        await UseAsync(c); // 1.2 MiB > 1 MiB: b goes
        Assert.True(Cached(a) && !Cached(b) && Cached(c));
        Assert.Equal(2 * BlobBytes, cache.TotalBytes);

        cache.SetPinned([a]);
        await UseAsync(c); // a is the least recently used now, but pinned
        await UseAsync(d); // so c goes
        Assert.True(Cached(a) && !Cached(c) && Cached(d));

        // A file in use is not evicted while its lease is held, even beyond the budget.
        cache.SetPinned([]);
        using (var held = await cache.AcquireAsync(d, BlobBytes, CancellationToken.None))
        {
            await UseAsync(b);
            Assert.True(Cached(d));
        }
        Assert.Equal(2, new[] { a, b, c, d }.Count(Cached));

        bool Cached(string sha) => cache.Contains(sha) && File.Exists(Path.Combine(cache.Location, sha));

        async Task UseAsync(string sha)
        {
            using var lease = await cache.AcquireAsync(sha, BlobBytes, CancellationToken.None);
            Assert.Equal(BlobBytes, new FileInfo(lease.Path).Length);
        }
    }

    [Fact]
    public async Task A_blob_larger_than_the_whole_cache_is_refused_before_fetching()
    {
        await using var worker = await WorkerHarness.StartAsync(new Dictionary<string, string> { ["Worker:CacheBytes"] = (1024 * 1024).ToString() });
        var sha = Blob(worker);
        var refused = await Assert.ThrowsAsync<LoraDeploy.Workers.Host.BlobRefusedException>(
            () => worker.Cache.AcquireAsync(sha, 2L * 1024 * 1024, CancellationToken.None));
        Assert.Contains("Worker:CacheBytes", refused.Message);
        Assert.Empty(worker.Server.BlobRanges);
    }

    [Fact]
    public async Task Concurrent_requests_for_one_blob_fetch_it_once()
    {
        await using var worker = await WorkerHarness.StartAsync();
        var sha = Blob(worker);
        var leases = await Task.WhenAll(Enumerable.Range(0, 8).Select(_ => worker.Cache.AcquireAsync(sha, BlobBytes, CancellationToken.None)));
        foreach (var lease in leases)
        {
            lease.Dispose();
        }
        Assert.Single(worker.Server.BlobRanges);
    }

    [Fact]
    public async Task A_cached_file_deleted_behind_the_caches_back_is_fetched_again()
    {
        await using var worker = await WorkerHarness.StartAsync();
        var sha = Blob(worker);
        using (await worker.Cache.AcquireAsync(sha, BlobBytes, CancellationToken.None))
        {
        }
        File.Delete(Path.Combine(worker.Cache.Location, sha));

        using var lease = await worker.Cache.AcquireAsync(sha, BlobBytes, CancellationToken.None);

        Assert.Equal(BlobBytes, new FileInfo(lease.Path).Length);
        Assert.Equal(2, worker.Server.BlobRanges.Count);
        Assert.Equal(BlobBytes, worker.Cache.TotalBytes);
    }

    private static string Blob(WorkerHarness worker) => worker.Server.AddBlob(RandomNumberGenerator.GetBytes(BlobBytes));
}
