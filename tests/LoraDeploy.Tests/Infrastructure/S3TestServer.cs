using System.Diagnostics;
using System.Text.RegularExpressions;
using Amazon.S3;
using Amazon.S3.Model;
using LoraDeploy.Storage;

namespace LoraDeploy.Tests;

/// <summary>
/// A real S3-compatible server (the <c>s3rver</c> npm package) on a loopback port it picks itself, over a temp folder,
/// with one empty bucket. It is found through <c>LORADEPLOY_S3RVER</c> (the executable's path; .ci/run installs it) or on PATH.
/// Missing: S3 tests are skipped, except under <c>CI=true</c>, where that is a failure.
/// </summary>
public sealed partial class S3TestServer : IAsyncDisposable
{
    public const string Variable = "LORADEPLOY_S3RVER";
    public const string AccessKey = "S3RVER"; // s3rver's built-in account
    public const string SecretKey = "S3RVER";

    private readonly Process _process;
    private readonly ProcessOutput _output;

    private S3TestServer(Process process, string directory, string bucket)
    {
        _process = process;
        _output = new ProcessOutput(process, ListeningLine(), match => new Uri($"http://127.0.0.1:{match.Groups[1].Value}"));
        Directory = directory;
        Bucket = bucket;
    }

    /// <summary>The folder s3rver keeps its buckets in (parts of unfinished uploads show there too).</summary>
    public string Directory { get; }
    public Uri Endpoint { get; private set; } = null!;
    public string Bucket { get; }
    public IAmazonS3 Client { get; private set; } = null!;

    public string Output => _output.Text;

    public static string RequireExecutable()
    {
        var configured = Environment.GetEnvironmentVariable(Variable);
        if (!string.IsNullOrWhiteSpace(configured))
        {
            return configured;
        }
        var onPath = (Environment.GetEnvironmentVariable("PATH") ?? "").Split(Path.PathSeparator)
            .Select(dir => Path.Combine(dir, "s3rver"))
            .FirstOrDefault(File.Exists);
        if (onPath is not null)
        {
            return onPath;
        }
        if (TestBackend.IsCi)
        {
            Assert.Fail($"CI=true but s3rver was not found ({Variable} unset, not on PATH): .ci/run must install it for the S3 tests.");
        }
        Assert.Skip($"S3 tests need s3rver (`npm install -g s3rver@3`, or {Variable}=its path); skipped.");
        return "";
    }

    public static async Task<S3TestServer> StartAsync()
    {
        var executable = RequireExecutable();
        var directory = System.IO.Directory.CreateTempSubdirectory("loradeploy-s3-").FullName;
        var start = new ProcessStartInfo(executable)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var arg in new[] { "--directory", directory, "--port", "0", "--address", "127.0.0.1", "--silent" })
        {
            start.ArgumentList.Add(arg);
        }
        var process = Process.Start(start) ?? throw new InvalidOperationException("s3rver did not start");
        var server = new S3TestServer(process, directory, $"blobs-{Guid.NewGuid().ToString("N")[..8]}");
        try
        {
            server.Endpoint = await server._output.ListeningAsync("s3rver", TimeSpan.FromSeconds(30));
            server.Client = S3BlobStore.CreateClient(server.Options());
            await server.Client.PutBucketAsync(new PutBucketRequest { BucketName = server.Bucket });
            return server;
        }
        catch
        {
            await server.DisposeAsync();
            throw;
        }
    }

    /// <summary>Store settings for this server, with <paramref name="prefix"/> under the bucket.</summary>
    public S3StorageOptions Options(string? prefix = null) => new()
    {
        Bucket = Bucket,
        Prefix = prefix,
        Endpoint = Endpoint.ToString(),
        ForcePathStyle = true,
        AccessKey = AccessKey,
        SecretKey = SecretKey,
    };

    /// <summary>The same as host settings (<c>Storage:Provider=s3</c>, <c>Storage:S3:*</c>).</summary>
    public Dictionary<string, string?> Settings(string? prefix = null) => new()
    {
        ["Storage:Provider"] = "s3",
        ["Storage:S3:Bucket"] = Bucket,
        ["Storage:S3:Prefix"] = prefix,
        ["Storage:S3:Endpoint"] = Endpoint.ToString(),
        ["Storage:S3:ForcePathStyle"] = "true",
        ["Storage:S3:AccessKey"] = AccessKey,
        ["Storage:S3:SecretKey"] = SecretKey,
    };

    /// <summary>Every object key in the bucket.</summary>
    public async Task<List<string>> KeysAsync()
    {
        var listed = await Client.ListObjectsV2Async(new ListObjectsV2Request { BucketName = Bucket });
        return (listed.S3Objects ?? []).Select(o => o.Key).ToList();
    }

    public async ValueTask DisposeAsync()
    {
        Client?.Dispose(); // null when the start failed
        if (!_process.HasExited)
        {
            _process.Kill(entireProcessTree: true);
        }
        await _process.WaitForExitAsync();
        _process.Dispose();
        try
        {
            System.IO.Directory.Delete(Directory, recursive: true);
        }
        catch (IOException)
        {
        }
    }

    // Printed by s3rver's command line (bin/s3rver.js) once it listens, also with --silent.
    [GeneratedRegex(@"^S3rver listening on 127\.0\.0\.1:(\d+)$")]
    private static partial Regex ListeningLine();
}
