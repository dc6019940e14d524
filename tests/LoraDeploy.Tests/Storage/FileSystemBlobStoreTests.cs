using System.Security.Cryptography;
using LoraDeploy.Storage;

namespace LoraDeploy.Tests.Storage;

/// <summary>The filesystem blob store on a real temp folder: verified puts, never overwriting, ranged reads.</summary>
public sealed class FileSystemBlobStoreTests : IDisposable
{
    private readonly string _root = Directory.CreateTempSubdirectory("loradeploy-blobs-").FullName;
    private readonly FileSystemBlobStore _store;

    public FileSystemBlobStoreTests() => _store = new FileSystemBlobStore(_root);

    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static byte[] Bytes(int length, int seed = 1)
    {
        var bytes = new byte[length];
        new Random(seed).NextBytes(bytes);
        return bytes;
    }

    private static string Sha(byte[] bytes) => Convert.ToHexStringLower(SHA256.HashData(bytes));

    private string BlobPath(string sha) => Path.Combine(_root, "sha256", sha[..2], sha);

    private string[] StagingLeft() => Directory.GetFiles(Path.Combine(_root, "staging"));

    private static async Task<byte[]> ReadAllAsync(Stream stream)
    {
        using var copy = new MemoryStream();
        await stream.CopyToAsync(copy, Ct);
        return copy.ToArray();
    }

    [Fact]
    public async Task Put_stores_matching_bytes_and_they_read_back()
    {
        var bytes = Bytes(3_000_000);
        var sha = Sha(bytes);

        Assert.Equal(BlobPutResult.Stored, await _store.PutAsync(sha, new MemoryStream(bytes), Ct));

        Assert.True(_store.Exists(sha));
        await using var read = await _store.OpenReadAsync(sha, ct: Ct);
        Assert.NotNull(read);
        Assert.Equal(bytes, await ReadAllAsync(read));
        Assert.Empty(StagingLeft());
    }

    [Fact]
    public async Task Put_of_bytes_that_do_not_match_the_hash_stores_nothing_and_leaves_no_temp_file()
    {
        var bytes = Bytes(100_000);
        var claimed = Sha(Bytes(100_000, seed: 2));

        Assert.Equal(BlobPutResult.HashMismatch, await _store.PutAsync(claimed, new MemoryStream(bytes), Ct));

        Assert.False(_store.Exists(claimed));
        Assert.False(File.Exists(BlobPath(claimed)));
        Assert.Null(await _store.OpenReadAsync(claimed, ct: Ct));
        Assert.Empty(StagingLeft());
    }

    [Fact]
    public async Task Put_that_fails_while_reading_leaves_no_temp_file()
    {
        var bytes = Bytes(100_000);
        var sha = Sha(bytes);

        await Assert.ThrowsAsync<IOException>(() => _store.PutAsync(sha, new FailingStream(bytes, failAfter: 50_000), Ct));

        Assert.False(_store.Exists(sha));
        Assert.Empty(StagingLeft());
    }

    [Fact]
    public async Task An_existing_blob_is_never_overwritten()
    {
        var bytes = Bytes(10_000);
        var sha = Sha(bytes);
        Assert.Equal(BlobPutResult.Stored, await _store.PutAsync(sha, new MemoryStream(bytes), Ct));
        // Simulate bytes on disk that a second put must leave alone (same name: the store may not touch them).
        var marker = Bytes(10_000, seed: 3);
        await File.WriteAllBytesAsync(BlobPath(sha), marker, Ct);

        Assert.Equal(BlobPutResult.AlreadyExists, await _store.PutAsync(sha, new MemoryStream(bytes), Ct));
        Assert.Equal(marker, await File.ReadAllBytesAsync(BlobPath(sha), Ct));

        await using (var staging = _store.OpenStaging("again.part"))
        {
            await staging.WriteAsync(bytes, Ct);
        }
        Assert.Equal(BlobPutResult.AlreadyExists, await _store.CommitStagingAsync("again.part", sha, Ct));
        Assert.Equal(marker, await File.ReadAllBytesAsync(BlobPath(sha), Ct));
        Assert.Empty(StagingLeft());
    }

    [Fact]
    public async Task OpenRead_with_a_range_reads_only_that_range_and_can_seek_in_it()
    {
        var bytes = Bytes(1_000_000);
        var sha = Sha(bytes);
        await _store.PutAsync(sha, new MemoryStream(bytes), Ct);

        await using (var range = await _store.OpenReadAsync(sha, offset: 1000, length: 5000, ct: Ct))
        {
            Assert.NotNull(range);
            Assert.Equal(5000, range.Length);
            Assert.Equal(bytes.AsSpan(1000, 5000).ToArray(), await ReadAllAsync(range));
            range.Position = 4000;
            var tail = new byte[2000];
            Assert.Equal(1000, range.ReadAtLeast(tail, tail.Length, throwOnEndOfStream: false));
            Assert.Equal(bytes.AsSpan(5000, 1000).ToArray(), tail.AsSpan(0, 1000).ToArray());
        }
        await using (var toEnd = await _store.OpenReadAsync(sha, offset: 999_000, ct: Ct))
        {
            Assert.NotNull(toEnd);
            Assert.Equal(bytes.AsSpan(999_000).ToArray(), await ReadAllAsync(toEnd));
        }
        await using (var pastEnd = await _store.OpenReadAsync(sha, offset: 2_000_000, length: 10, ct: Ct))
        {
            Assert.NotNull(pastEnd);
            Assert.Empty(await ReadAllAsync(pastEnd));
        }
    }

    [Fact]
    public async Task OpenRead_of_an_absent_blob_is_null_and_Delete_removes_a_blob()
    {
        var bytes = Bytes(1000);
        var sha = Sha(bytes);
        Assert.Null(await _store.OpenReadAsync(sha, ct: Ct));
        Assert.False(_store.Delete(sha));

        await _store.PutAsync(sha, new MemoryStream(bytes), Ct);
        Assert.True(_store.Delete(sha));

        Assert.False(_store.Exists(sha));
        Assert.Null(await _store.OpenReadAsync(sha, ct: Ct));
    }

    [Fact]
    public async Task A_staging_file_resumes_across_opens_and_commits_only_when_its_bytes_match()
    {
        var bytes = Bytes(200_000);
        var sha = Sha(bytes);
        await using (var first = _store.OpenStaging("download-7.part"))
        {
            await first.WriteAsync(bytes.AsMemory(0, 80_000), Ct);
        }
        Assert.Equal(80_000, _store.StagingLength("download-7.part"));
        await using (var resumed = _store.OpenStaging("download-7.part"))
        {
            Assert.Equal(80_000, resumed.Length);
            resumed.Seek(0, SeekOrigin.End);
            await resumed.WriteAsync(bytes.AsMemory(80_000), Ct);
        }

        Assert.Equal(BlobPutResult.HashMismatch, await _store.CommitStagingAsync("download-7.part", Sha(Bytes(10)), Ct));
        Assert.Empty(StagingLeft());

        await using (var again = _store.OpenStaging("download-7.part"))
        {
            await again.WriteAsync(bytes, Ct);
        }
        Assert.Equal(["download-7.part"], _store.StagingFiles().Select(f => f.Name));
        Assert.Equal(BlobPutResult.Stored, await _store.CommitStagingAsync("download-7.part", sha, Ct));
        Assert.Equal(bytes, await File.ReadAllBytesAsync(BlobPath(sha), Ct));
        Assert.Empty(StagingLeft());
        Assert.Equal(0, _store.StagingLength("download-7.part"));
    }

    [Fact]
    public void Keys_and_staging_names_that_could_escape_the_store_are_refused()
    {
        Assert.Throws<ArgumentException>(() => _store.Exists("../../etc/passwd"));
        Assert.Throws<ArgumentException>(() => _store.Exists(new string('A', 64)));
        Assert.Throws<ArgumentException>(() => _store.OpenStaging("../x"));
        Assert.Throws<ArgumentException>(() => _store.DeleteStaging("a/b"));
    }

    public void Dispose()
    {
        try
        {
            Directory.Delete(_root, recursive: true);
        }
        catch (IOException)
        {
            // Temp folder; leftovers are harmless.
        }
    }

    /// <summary>Gives some bytes, then fails like a dropped connection.</summary>
    private sealed class FailingStream(byte[] bytes, int failAfter) : MemoryStream(bytes)
    {
        public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
        {
            if (Position >= failAfter)
            {
                throw new IOException("connection reset");
            }
            return base.ReadAsync(buffer[..(int)Math.Min(buffer.Length, failAfter - Position)], cancellationToken);
        }
    }
}
