using System.Buffers;
using System.Net;
using System.Security.Cryptography;
using Amazon;
using Amazon.Runtime;
using Amazon.S3;
using Amazon.S3.Model;

namespace LoraDeploy.Storage;

/// <summary>
/// The blob store in an S3-compatible bucket, same content-addressed names as the folder (<c>{prefix}sha256/ab/abcd…</c>).
/// Uploads stream in parts while hashing, up to PartsInFlight part buffers in memory; an object appears only when the
/// bytes matched and CompleteMultipartUpload (or the single PutObject) succeeded, so a row written afterwards never names
/// a missing or partial object. Staging files stay in a local folder: resumable downloads append to them.
/// </summary>
public sealed partial class S3BlobStore(IAmazonS3 client, S3StorageOptions options, StagingFolder staging, ILogger<S3BlobStore> logger) : IBlobStore
{
    private readonly string _bucket = options.Bucket!;
    private readonly string _prefix = options.KeyPrefix;
    private readonly int _partSize = options.PartSizeMiB * 1024 * 1024;
    private readonly int _partsInFlight = options.PartsInFlight;

    public string Location => $"s3://{_bucket}/{_prefix}";

    /// <summary>The SDK client for these settings: path-style and endpoint for non-AWS servers, keys or the default chain.</summary>
    public static IAmazonS3 CreateClient(S3StorageOptions options)
    {
        var config = new AmazonS3Config
        {
            ForcePathStyle = options.ForcePathStyle,
            // We verify SHA-256 ourselves and send Content-MD5 per part; the SDK's newer trailing checksums
            // (aws-chunked bodies) are not understood by every S3-compatible server.
            RequestChecksumCalculation = RequestChecksumCalculation.WHEN_REQUIRED,
            ResponseChecksumValidation = ResponseChecksumValidation.WHEN_REQUIRED,
        };
        if (options.Endpoint is { } endpoint)
        {
            config.ServiceURL = endpoint;
            config.AuthenticationRegion = options.Region ?? "us-east-1";
        }
        else if (options.Region is { } region)
        {
            config.RegionEndpoint = RegionEndpoint.GetBySystemName(region);
        }
        return string.IsNullOrEmpty(options.AccessKey)
            ? new AmazonS3Client(config)
            : new AmazonS3Client(new BasicAWSCredentials(options.AccessKey, options.SecretKey), config);
    }

    /// <summary>The object key of a blob, e.g. for tests and operators looking into the bucket.</summary>
    public string KeyOf(string sha256)
    {
        if (!FileSystemBlobStore.Sha256Hex().IsMatch(sha256))
        {
            throw new ArgumentException("A blob key is a lowercase SHA-256 hex digest.", nameof(sha256));
        }
        return $"{_prefix}sha256/{sha256[..2]}/{sha256}";
    }

    public async Task<Stream?> OpenReadAsync(string sha256, long offset = 0, long? length = null, CancellationToken ct = default)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(offset);
        if (length is { } l)
        {
            ArgumentOutOfRangeException.ThrowIfNegative(l, nameof(length));
        }
        var key = KeyOf(sha256);
        if (await SizeOfAsync(key, ct) is not { } size)
        {
            return null;
        }
        var start = Math.Min(offset, size);
        var end = length is { } len ? Math.Min(size, start + len) : size;
        return new S3ObjectStream(client, _bucket, key, start, end - start);
    }

    public async Task<BlobPutResult> PutAsync(string sha256, Stream content, CancellationToken ct = default)
    {
        var key = KeyOf(sha256);
        if (await SizeOfAsync(key, ct) is not null)
        {
            return BlobPutResult.AlreadyExists;
        }
        return await UploadAsync(key, sha256, content, ct);
    }

    // The interface is synchronous (a file check); here it is one HEAD request, run on the caller's thread.
    public bool Exists(string sha256) => SizeOfAsync(KeyOf(sha256), CancellationToken.None).GetAwaiter().GetResult() is not null;

    public bool Delete(string sha256)
    {
        var key = KeyOf(sha256);
        if (!Exists(sha256))
        {
            return false;
        }
        client.DeleteObjectAsync(new DeleteObjectRequest { BucketName = _bucket, Key = key }).GetAwaiter().GetResult();
        return true;
    }

    public Stream OpenStaging(string name) => staging.Open(name);

    public long StagingLength(string name) => staging.Length(name);

    public IEnumerable<(string Name, DateTime LastWriteUtc)> StagingFiles() => staging.Files();

    public bool DeleteStaging(string name) => staging.Delete(name);

    /// <summary>
    /// Uploads the staging file while hashing it, so the object's bytes are verified as they leave. The staging file
    /// stays when the upload fails (the caller may try again) and goes otherwise.
    /// </summary>
    public async Task<BlobPutResult> CommitStagingAsync(string name, string sha256, CancellationToken ct = default)
    {
        var key = KeyOf(sha256);
        var staged = staging.PathOf(name);
        BlobPutResult result;
        if (await SizeOfAsync(key, ct) is not null)
        {
            result = BlobPutResult.AlreadyExists;
        }
        else
        {
            await using var file = new FileStream(staged, FileMode.Open, FileAccess.Read, FileShare.None, bufferSize: 0, FileOptions.Asynchronous | FileOptions.SequentialScan);
            result = await UploadAsync(key, sha256, file, ct);
        }
        File.Delete(staged);
        return result;
    }

    private async Task<long?> SizeOfAsync(string key, CancellationToken ct)
    {
        try
        {
            var head = await client.GetObjectMetadataAsync(new GetObjectMetadataRequest { BucketName = _bucket, Key = key }, ct);
            return head.ContentLength;
        }
        catch (AmazonS3Exception e) when (e.StatusCode == HttpStatusCode.NotFound)
        {
            return null;
        }
    }

    /// <summary>
    /// One part buffer at a time: a blob smaller than a part is hashed first and sent only when it matches; a larger
    /// one goes up part by part and the upload is completed only when the whole stream hashed right (aborted otherwise).
    /// </summary>
    private async Task<BlobPutResult> UploadAsync(string key, string sha256, Stream content, CancellationToken ct)
    {
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        var buffer = ArrayPool<byte>.Shared.Rent(_partSize);
        try
        {
            var filled = await FillAsync(content, buffer, ct);
            hash.AppendData(buffer, 0, filled);
            if (filled < _partSize)
            {
                if (!Matches(hash, sha256))
                {
                    return BlobPutResult.HashMismatch;
                }
                using var body = new MemoryStream(buffer, 0, filled, writable: false);
                await client.PutObjectAsync(new PutObjectRequest
                {
                    BucketName = _bucket,
                    Key = key,
                    InputStream = body,
                    AutoCloseStream = false,
                    MD5Digest = Md5Of(buffer, filled),
                    UseChunkEncoding = false,
                    ContentType = "application/octet-stream",
                }, ct);
                return BlobPutResult.Stored;
            }

            var upload = await client.InitiateMultipartUploadAsync(new InitiateMultipartUploadRequest
            {
                BucketName = _bucket,
                Key = key,
                ContentType = "application/octet-stream",
            }, ct);
            var parts = new List<Task<PartETag>>();
            using var slots = new SemaphoreSlim(_partsInFlight);
            try
            {
                // Up to PartsInFlight parts go up at once, each from its own buffer (handed over to the send, which
                // returns it); the next part is read and hashed meanwhile. ETags are listed in part order however
                // the sends finish.
                while (filled > 0)
                {
                    await slots.WaitAsync(ct);
                    if (parts.FirstOrDefault(p => p.IsFaulted) is { } failed)
                    {
                        await failed; // a part that failed ends the upload now, not after the rest of the file is sent
                    }
                    parts.Add(SendPartAsync(key, upload.UploadId, parts.Count + 1, buffer, filled, slots, ct));
                    buffer = ArrayPool<byte>.Shared.Rent(_partSize);
                    filled = await FillAsync(content, buffer, ct);
                    hash.AppendData(buffer, 0, filled);
                }
                var etags = await Task.WhenAll(parts);
                if (!Matches(hash, sha256))
                {
                    await AbortAsync(key, upload.UploadId);
                    return BlobPutResult.HashMismatch;
                }
                await client.CompleteMultipartUploadAsync(new CompleteMultipartUploadRequest
                {
                    BucketName = _bucket,
                    Key = key,
                    UploadId = upload.UploadId,
                    PartETags = [.. etags],
                }, ct);
                return BlobPutResult.Stored;
            }
            catch
            {
                // Parts still being sent finish (or fail) before the abort, so none lands after it.
                await ((Task)Task.WhenAll(parts)).ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
                await AbortAsync(key, upload.UploadId);
                throw;
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <summary>Best effort: an upload never completed is invisible anyway; its parts are only storage until a lifecycle rule removes them.</summary>
    private async Task AbortAsync(string key, string uploadId)
    {
        try
        {
            await client.AbortMultipartUploadAsync(new AbortMultipartUploadRequest { BucketName = _bucket, Key = key, UploadId = uploadId });
        }
        catch (Exception e) when (e is AmazonServiceException or HttpRequestException or IOException)
        {
            LogAbortFailed(key, uploadId, e.Message);
        }
    }

    /// <summary>Sends one part from <paramref name="buffer"/>, then returns the buffer to the pool and frees its slot.</summary>
    private async Task<PartETag> SendPartAsync(string key, string uploadId, int number, byte[] buffer, int length, SemaphoreSlim slots, CancellationToken ct)
    {
        try
        {
            using var body = new MemoryStream(buffer, 0, length, writable: false);
            var part = await client.UploadPartAsync(new UploadPartRequest
            {
                BucketName = _bucket,
                Key = key,
                UploadId = uploadId,
                PartNumber = number,
                InputStream = body,
                PartSize = length,
                MD5Digest = Md5Of(buffer, length),
                UseChunkEncoding = false,
            }, ct);
            return new PartETag(number, part.ETag);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
            slots.Release();
        }
    }

    private async Task<int> FillAsync(Stream content, byte[] buffer, CancellationToken ct)
    {
        var filled = 0;
        int n;
        while (filled < _partSize && (n = await content.ReadAsync(buffer.AsMemory(filled, _partSize - filled), ct)) > 0)
        {
            filled += n;
        }
        return filled;
    }

    private static bool Matches(IncrementalHash hash, string sha256) =>
        string.Equals(Convert.ToHexStringLower(hash.GetHashAndReset()), sha256, StringComparison.Ordinal);

    private static string Md5Of(byte[] buffer, int count) => Convert.ToBase64String(MD5.HashData(buffer.AsSpan(0, count)));

    [LoggerMessage(Level = LogLevel.Warning, Message = "Could not abort the multipart upload {UploadId} of {Key} ({Reason}); it stays invisible, and a bucket lifecycle rule removes its parts")]
    private partial void LogAbortFailed(string key, string uploadId, string reason);
}

/// <summary>
/// A seekable window of an S3 object read through ranged GETs. Sequential reads share one GET to the end of the
/// window; after a seek (the prober's small positioned reads) a GET asks only for a bounded window first.
/// </summary>
internal sealed class S3ObjectStream(IAmazonS3 client, string bucket, string key, long start, long length) : Stream
{
    private const long AfterSeekWindow = 1024 * 1024;

    private GetObjectResponse? _response;
    private long _position;
    private long _bodyAt;
    private long _bodyEnd;
    private bool _sought;

    public override bool CanRead => true;
    public override bool CanSeek => true;
    public override bool CanWrite => false;
    public override long Length => length;

    public override long Position
    {
        get => _position;
        set => Seek(value, SeekOrigin.Begin);
    }

    public override long Seek(long offset, SeekOrigin origin)
    {
        var target = origin switch
        {
            SeekOrigin.Begin => offset,
            SeekOrigin.Current => _position + offset,
            _ => length + offset,
        };
        ArgumentOutOfRangeException.ThrowIfNegative(target, nameof(offset));
        if (target != _position)
        {
            _sought = true;
        }
        _position = target;
        return _position;
    }

    public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        if (_position >= length || buffer.Length == 0)
        {
            return 0;
        }
        if (_response is null || _bodyAt != _position || _bodyAt >= _bodyEnd)
        {
            await OpenAsync(cancellationToken);
        }
        var wanted = (int)Math.Min(buffer.Length, _bodyEnd - _bodyAt);
        var n = await _response!.ResponseStream.ReadAsync(buffer[..wanted], cancellationToken);
        if (n == 0)
        {
            throw new IOException($"S3 object {key} ended at byte {start + _bodyAt}, before the {start + _bodyEnd} it promised.");
        }
        _position += n;
        _bodyAt += n;
        return n;
    }

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    // The safetensors reader and prober read synchronously.
    public override int Read(byte[] buffer, int offset, int count) => ReadAsync(buffer.AsMemory(offset, count)).AsTask().GetAwaiter().GetResult();

    private async Task OpenAsync(CancellationToken ct)
    {
        CloseBody();
        var end = _sought ? Math.Min(length, _position + AfterSeekWindow) : length;
        _sought = false;
        _response = await client.GetObjectAsync(new GetObjectRequest
        {
            BucketName = bucket,
            Key = key,
            ByteRange = new ByteRange(start + _position, start + end - 1),
        }, ct);
        _bodyAt = _position;
        _bodyEnd = end;
    }

    private void CloseBody()
    {
        _response?.Dispose();
        _response = null;
    }

    public override void Flush()
    {
    }

    public override void SetLength(long value) => throw new NotSupportedException();

    public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            CloseBody();
        }
        base.Dispose(disposing);
    }
}
