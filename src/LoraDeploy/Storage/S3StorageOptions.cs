using System.Text.RegularExpressions;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Storage;

/// <summary>
/// Settings section <c>Storage:S3</c>: an S3-compatible bucket (AWS, MinIO, Ceph, R2). Credentials not given here come
/// from the SDK's usual chain (<c>AWS_ACCESS_KEY_ID</c>/<c>AWS_SECRET_ACCESS_KEY</c>, <c>~/.aws</c>, instance roles).
/// </summary>
public sealed partial class S3StorageOptions
{
    public const string Section = "Storage:S3";

    public string? Bucket { get; set; }

    /// <summary>Key prefix, e.g. <c>loradeploy/</c>; blobs live under <c>{Prefix}sha256/ab/abcd…</c>.</summary>
    public string? Prefix { get; set; }

    /// <summary>The server's URL for anything but AWS itself (<c>http://minio:9000</c>, R2's account URL).</summary>
    public string? Endpoint { get; set; }

    /// <summary>AWS region; with <see cref="Endpoint"/> only the signing region (default <c>us-east-1</c>).</summary>
    public string? Region { get; set; }

    /// <summary><c>endpoint/bucket/key</c> instead of <c>bucket.endpoint/key</c>: MinIO, Ceph and most self-hosted servers want it.</summary>
    public bool ForcePathStyle { get; set; }

    public string? AccessKey { get; set; }

    public string? SecretKey { get; set; }

    /// <summary>Multipart part size. S3 wants at least 5 MiB.</summary>
    public int PartSizeMiB { get; set; } = 8;

    /// <summary>Parts of one upload sent at once; an upload holds this many part buffers in memory.</summary>
    public int PartsInFlight { get; set; } = 4;

    /// <summary>The key prefix as used: empty, or ending in '/'.</summary>
    internal string KeyPrefix => string.IsNullOrEmpty(Prefix) ? "" : Prefix.EndsWith('/') ? Prefix : Prefix + "/";

    // AWS's rules for new buckets, a subset every S3-compatible server accepts.
    [GeneratedRegex(@"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\z")]
    private static partial Regex BucketName();

    [GeneratedRegex(@"^[A-Za-z0-9!_.*'()/-]*\z")]
    private static partial Regex PrefixCharacters();

    [GeneratedRegex(@"^[a-z0-9-]{1,40}\z")]
    private static partial Regex RegionName();

    internal sealed class Validation : IValidateOptions<StorageOptions>
    {
        public ValidateOptionsResult Validate(string? name, StorageOptions options)
        {
            if (options.Provider != StorageProvider.S3)
            {
                return ValidateOptionsResult.Success;
            }
            var s3 = options.S3;
            var errors = new List<string>();
            if (string.IsNullOrWhiteSpace(s3.Bucket))
            {
                errors.Add($"{Section}:Bucket is not set: Storage:Provider is s3, so name the bucket that holds the blobs.");
            }
            else if (!BucketName().IsMatch(s3.Bucket) || s3.Bucket.Contains(".."))
            {
                errors.Add($"{Section}:Bucket '{s3.Bucket}' is not a bucket name (3-63 lowercase letters, digits, '.', '-').");
            }
            if (s3.Prefix is { Length: > 0 } prefix
                && (!PrefixCharacters().IsMatch(prefix) || prefix.StartsWith('/') || prefix.Contains("//") || prefix.Split('/').Any(p => p is "." or "..")))
            {
                errors.Add($"{Section}:Prefix '{prefix}' must be a relative key prefix (letters, digits, '/', '-', '_', '.'; no leading '/', no '//', no '..').");
            }
            if (s3.Endpoint is not null
                && !(Uri.TryCreate(s3.Endpoint, UriKind.Absolute, out var endpoint) && endpoint.Scheme is "http" or "https"))
            {
                errors.Add($"{Section}:Endpoint '{s3.Endpoint}' is not an http(s) URL (e.g. http://minio:9000).");
            }
            if (s3.Region is not null && !RegionName().IsMatch(s3.Region))
            {
                errors.Add($"{Section}:Region '{s3.Region}' is not a region name (e.g. eu-central-1).");
            }
            if (string.IsNullOrEmpty(s3.AccessKey) != string.IsNullOrEmpty(s3.SecretKey))
            {
                errors.Add($"{Section}:AccessKey and {Section}:SecretKey go together: give both, or neither to use the AWS credential chain.");
            }
            if (s3.PartSizeMiB is < 5 or > 1024)
            {
                errors.Add($"{Section}:PartSizeMiB {s3.PartSizeMiB} is not from 5 to 1024 (S3's smallest part is 5 MiB).");
            }
            if (s3.PartsInFlight is < 1 or > 16)
            {
                errors.Add($"{Section}:PartsInFlight {s3.PartsInFlight} is not from 1 to 16 (parts of one upload sent at once).");
            }
            return errors.Count == 0 ? ValidateOptionsResult.Success : ValidateOptionsResult.Fail(errors);
        }
    }
}
