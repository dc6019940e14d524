using Microsoft.Extensions.Caching.Memory;

namespace LoraDeploy.Auth;

/// <summary>
/// Token ids recently looked up and not found. Without it each probe of an id costs a database query, which also made
/// unknown ids answer measurably slower than known ones. Kept briefly (a token created meanwhile would need a random
/// 12-character id that was just probed) and in a cache of its own with a size limit, so a flood of made-up ids can
/// neither grow memory nor push out the verified tokens.
/// </summary>
public sealed class UnknownTokenIds : IDisposable
{
    public const int MaxEntries = 10_000;
    public static readonly TimeSpan RememberFor = TimeSpan.FromSeconds(10);

    private static readonly object Present = new();
    private readonly MemoryCache _ids = new(new MemoryCacheOptions { SizeLimit = MaxEntries });

    public bool Contains(string tokenId) => _ids.TryGetValue(tokenId, out _);

    public void Add(string tokenId) =>
        _ids.Set(tokenId, Present, new MemoryCacheEntryOptions { AbsoluteExpirationRelativeToNow = RememberFor, Size = 1 });

    public void Dispose() => _ids.Dispose();
}
