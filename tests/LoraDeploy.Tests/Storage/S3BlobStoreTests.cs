using System.Security.Cryptography;
using Amazon.S3.Model;
using LoraDeploy.Storage;
using Microsoft.Extensions.Logging.Abstractions;

namespace LoraDeploy.Tests.Storage;

/// <summary>The S3 blob store against a real S3-compatible server (s3rver): verified puts, never overwriting, ranged reads, parts.</summary>
public sealed class S3BlobStoreTests : IAsyncLifetime
{
    private const int PartSize = 8 * 1024 * 1024;

    private readonly string _staging = Directory.CreateTempSubdirectory("loradeploy-s3-staging-").FullName;
    private S3TestServer _s3 = null!;
    private S3BlobStore _store = null!;

    public async ValueTask InitializeAsync()
    {
        _s3 = await S3TestServer.StartAsync();
        _store = new S3BlobStore(_s3.Client, _s3.Options(prefix: "tenant-a/"), new StagingFolder(_staging), NullLogger<S3BlobStore>.Instance);
    }

    public async ValueTask DisposeAsync()
    {
        if (_s3 is not null)
        {
            await _s3.DisposeAsync();
        }
        Directory.Delete(_staging, recursive: true);
    }

    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static byte[] Bytes(int length, int seed = 1)
    {
        var bytes = new byte[length];
        new Random(seed).NextBytes(bytes);
        return bytes;
    }

    private static string Sha(byte[] bytes) => Convert.ToHexStringLower(SHA256.HashData(bytes));

    private static async Task<byte[]> ReadAllAsync(Stream stream)
    {
        using var copy = new MemoryStream();
        await stream.CopyToAsync(copy, Ct);
        return copy.ToArray();
    }

    private async Task<byte[]> ObjectBytesAsync(string key)
    {
        using var response = await _s3.Client.GetObjectAsync(new GetObjectRequest { BucketName = _s3.Bucket, Key = key }, Ct);
        return await ReadAllAsync(response.ResponseStream);
    }

    [Fact]
    public async Task Put_stores_under_the_content_address_and_reads_back_whole_and_in_ranges()
    {
        var bytes = Bytes(3_000_000);
        var sha = Sha(bytes);

        Assert.Equal(BlobPutResult.Stored, await _store.PutAsync(sha, new MemoryStream(bytes), Ct));

        Assert.Equal([$"tenant-a/sha256/{sha[..2]}/{sha}"], await _s3.KeysAsync());
        Assert.True(_store.Exists(sha));
        await using (var whole = await _store.OpenReadAsync(sha, ct: Ct))
        {
            Assert.NotNull(whole);
            Assert.Equal(bytes.Length, whole.Length);
            Assert.Equal(bytes, await ReadAllAsync(whole));
        }
        await using (var range = await _store.OpenReadAsync(sha, offset: 1000, length: 5000, ct: Ct))
        {
            Assert.NotNull(range);
            Assert.Equal(5000, range.Length);
            Assert.Equal(bytes.AsSpan(1000, 5000).ToArray(), await ReadAllAsync(range));
            range.Position = 4000; // back and forth, as the prober and the worker route do
            var tail = new byte[2000];
            Assert.Equal(1000, range.ReadAtLeast(tail, tail.Length, throwOnEndOfStream: false));
            Assert.Equal(bytes.AsSpan(5000, 1000).ToArray(), tail.AsSpan(0, 1000).ToArray());
            range.Position = 10;
            Assert.Equal(bytes[1010], (byte)range.ReadByte());
        }
        await using (var toEnd = await _store.OpenReadAsync(sha, offset: 2_999_000, ct: Ct))
        {
            Assert.NotNull(toEnd);
            Assert.Equal(bytes.AsSpan(2_999_000).ToArray(), await ReadAllAsync(toEnd));
        }

        Assert.True(_store.Delete(sha));
        Assert.False(_store.Exists(sha));
        Assert.False(_store.Delete(sha));
        Assert.Null(await _store.OpenReadAsync(sha, ct: Ct));
        Assert.Empty(await _s3.KeysAsync());
    }

    [Fact]
    public async Task Parts_sent_several_at_once_make_the_object_in_order()
    {
        // Nine parts, four in flight (the default): whichever send finishes first, the object is the bytes in order.
        var bytes = Bytes(PartSize * 8 + 4321, seed: 7);
        var sha = Sha(bytes);

        Assert.Equal(BlobPutResult.Stored, await _store.PutAsync(sha, new MemoryStream(bytes), Ct));

        Assert.Equal(bytes, await ObjectBytesAsync(_store.KeyOf(sha)));
    }

    [Theory]
    [InlineData(100_000)]
    [InlineData(PartSize * 2 + 12345)] // through the multipart path
    public async Task Put_of_bytes_that_do_not_match_the_hash_leaves_no_object(int length)
    {
        var bytes = Bytes(length);
        var claimed = Sha(Bytes(length, seed: 2));

        Assert.Equal(BlobPutResult.HashMismatch, await _store.PutAsync(claimed, new MemoryStream(bytes), Ct));

        Assert.False(_store.Exists(claimed));
        Assert.Null(await _store.OpenReadAsync(claimed, ct: Ct));
        Assert.Empty(await _s3.KeysAsync());
    }

    [Fact]
    public async Task An_existing_object_is_never_overwritten_by_a_put_or_a_commit()
    {
        var bytes = Bytes(10_000);
        var sha = Sha(bytes);
        Assert.Equal(BlobPutResult.Stored, await _store.PutAsync(sha, new MemoryStream(bytes), Ct));
        // Other bytes under that name, which a second put must leave alone.
        var marker = Bytes(10_000, seed: 3);
        await _s3.Client.PutObjectAsync(new PutObjectRequest { BucketName = _s3.Bucket, Key = _store.KeyOf(sha), InputStream = new MemoryStream(marker), UseChunkEncoding = false }, Ct);

        Assert.Equal(BlobPutResult.AlreadyExists, await _store.PutAsync(sha, new MemoryStream(bytes), Ct));
        Assert.Equal(marker, await ObjectBytesAsync(_store.KeyOf(sha)));

        await using (var staging = _store.OpenStaging("again.part"))
        {
            await staging.WriteAsync(bytes, Ct);
        }
        Assert.Equal(BlobPutResult.AlreadyExists, await _store.CommitStagingAsync("again.part", sha, Ct));
        Assert.Equal(marker, await ObjectBytesAsync(_store.KeyOf(sha)));
        Assert.Empty(_store.StagingFiles());
    }

    [Fact]
    public async Task A_staging_file_is_committed_through_parts_and_stays_local_until_then()
    {
        var bytes = Bytes(PartSize + 5_000_000, seed: 4);
        var sha = Sha(bytes);
        await using (var staging = _store.OpenStaging("download-1.part"))
        {
            await staging.WriteAsync(bytes.AsMemory(0, 1_000_000), Ct);
        }
        Assert.Equal(1_000_000, _store.StagingLength("download-1.part"));
        Assert.Equal(["download-1.part"], _store.StagingFiles().Select(f => f.Name));
        Assert.True(File.Exists(Path.Combine(_staging, "download-1.part")));
        await using (var staging = _store.OpenStaging("download-1.part"))
        {
            staging.Seek(0, SeekOrigin.End); // a resumed download appends
            await staging.WriteAsync(bytes.AsMemory(1_000_000), Ct);
        }

        Assert.Equal(BlobPutResult.Stored, await _store.CommitStagingAsync("download-1.part", sha, Ct));

        Assert.Empty(_store.StagingFiles());
        Assert.Equal(bytes, await ObjectBytesAsync(_store.KeyOf(sha)));
    }

    [Fact]
    public async Task A_40_MiB_blob_goes_up_part_by_part_while_it_is_read_and_appears_only_when_complete()
    {
        const int length = 40 * 1024 * 1024;
        var sha = Sha(GatedStream.Content(length));
        // The source withholds its fourth part until the server has stored the first: a store that buffered the
        // whole blob before sending would wait forever here (and the test time out).
        var visibleEarly = (bool?)null;
        var source = new GatedStream(length, gateAt: 3L * PartSize, async () =>
        {
            await WaitForAsync(() => FirstPartStored(), "the first part never reached the server before the fourth was read");
            visibleEarly = _store.Exists(sha) || (await _s3.KeysAsync()).Count > 0;
        });

        Assert.Equal(BlobPutResult.Stored, await _store.PutAsync(sha, source, Ct));

        Assert.False(visibleEarly, "the object was visible before its upload completed");
        Assert.True(source.Gated, "the gate was never reached");
        await using var read = await _store.OpenReadAsync(sha, ct: Ct);
        Assert.NotNull(read);
        Assert.Equal(length, read.Length);
        Assert.Equal(sha, Convert.ToHexStringLower(await SHA256.HashDataAsync(read, Ct)));
    }

    [Fact]
    public async Task An_upload_cancelled_half_way_leaves_no_object()
    {
        const int length = 30 * 1024 * 1024;
        var sha = Sha(GatedStream.Content(length));
        using var cancel = CancellationTokenSource.CreateLinkedTokenSource(Ct);
        var source = new GatedStream(length, gateAt: 2L * PartSize, async () =>
        {
            await WaitForAsync(() => FirstPartStored(), "the first part never reached the server");
            await cancel.CancelAsync();
        });

        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => _store.PutAsync(sha, source, cancel.Token));

        Assert.False(_store.Exists(sha));
        Assert.Empty(await _s3.KeysAsync());
    }

    private bool FirstPartStored() =>
        Directory.EnumerateFiles(_s3.Directory, "1.md5", SearchOption.AllDirectories).Any();

    private static async Task WaitForAsync(Func<bool> condition, string failure)
    {
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (!condition())
        {
            if (DateTime.UtcNow > deadline)
            {
                Assert.Fail(failure);
            }
            await Task.Delay(20);
        }
    }

    /// <summary>Deterministic bytes made on the fly (never held whole); runs <c>gate</c> once before reading past <c>gateAt</c>.</summary>
    private sealed class GatedStream(long length, long gateAt, Func<Task> gate) : Stream
    {
        private long _position;

        public bool Gated { get; private set; }

        public static byte[] Content(int length)
        {
            var bytes = new byte[length];
            Fill(bytes, 0);
            return bytes;
        }

        private static void Fill(Span<byte> target, long at)
        {
            for (var i = 0; i < target.Length; i++)
            {
                var p = at + i;
                target[i] = (byte)((p * 2654435761L >> 13) ^ p);
            }
        }

        public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
        {
            if (!Gated && _position + buffer.Length > gateAt)
            {
                if (_position < gateAt)
                {
                    buffer = buffer[..(int)(gateAt - _position)];
                }
                else
                {
                    Gated = true;
                    await gate();
                }
            }
            var n = (int)Math.Min(buffer.Length, length - _position);
            Fill(buffer.Span[..n], _position);
            _position += n;
            return n;
        }

        public override int Read(byte[] buffer, int offset, int count) => ReadAsync(buffer.AsMemory(offset, count)).AsTask().GetAwaiter().GetResult();

        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => false;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => _position; set => throw new NotSupportedException(); }
        public override void Flush() { }
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    }
}
