using System.Net;
using System.Net.Http.Headers;
using System.Security.Cryptography;
using LoraDeploy.Auth;
using LoraDeploy.Storage;
using LoraDeploy.Tests.Pipeline;
using LoraDeploy.Workers;
using Microsoft.EntityFrameworkCore;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Tests.Storage;

/// <summary>The real host with <c>Storage:Provider=s3</c> against s3rver: CivitAI import, dedup, worker Range reads, GC.</summary>
public sealed class S3StorageTests : IAsyncLifetime
{
    private S3TestServer _s3 = null!;
    private PipelineHarness _h = null!;

    public async ValueTask InitializeAsync()
    {
        _s3 = await S3TestServer.StartAsync();
        var settings = _s3.Settings(prefix: "prod");
        settings["Pipeline:BlobGracePeriod"] = "00:00:00";
        settings["Pipeline:CollectInterval"] = "00:00:00.200";
        _h = await PipelineHarness.StartAsync(settings: settings);
    }

    public async ValueTask DisposeAsync()
    {
        if (_h is not null)
        {
            await _h.DisposeAsync();
        }
        if (_s3 is not null)
        {
            await _s3.DisposeAsync();
        }
    }

    private static string KeyOf(string sha) => $"prod/sha256/{sha[..2]}/{sha}";

    [Fact]
    public async Task A_civitai_import_lands_in_the_bucket_and_a_second_import_of_it_is_deduplicated()
    {
        var content = AdapterFiles.Flux1(seed: 21, rank: 16);
        var version = _h.Simulator.AddLora(content, baseModel: "Flux.1 D");

        (await _h.CreateAndWaitAsync("first", PipelineHarness.ModelUrl(version))).AssertDeploying();
        (await _h.CreateAndWaitAsync("second", PipelineHarness.ModelUrl(version))).AssertDeploying();

        Assert.Equal([KeyOf(version.File.Sha256)], await _s3.KeysAsync());
        Assert.Equal(1, _h.Simulator.DownloadsStarted(version.File.Id));
        Assert.Equal([version.File.Sha256], await _h.Server.QueryAsync(db => db.Blobs.Select(b => b.Sha256).ToListAsync()));
        // Nothing but the (now empty) staging folder on local disk: the bytes live in the bucket only.
        var local = Path.Combine(_h.Server.DataDir, "blobs");
        Assert.False(Directory.Exists(Path.Combine(local, "sha256")));
        Assert.Empty(Directory.GetFiles(Path.Combine(local, "staging")));
        var store = _h.Server.Services.GetRequiredService<IBlobStore>();
        await using var stored = await store.OpenReadAsync(version.File.Sha256, ct: TestContext.Current.CancellationToken);
        Assert.Equal(version.File.Sha256, Convert.ToHexStringLower(await SHA256.HashDataAsync(stored!, TestContext.Current.CancellationToken)));
    }

    [Fact]
    public async Task Workers_read_blobs_with_ranges_through_the_server_from_the_bucket()
    {
        var content = AdapterFiles.Flux1(seed: 22, rank: 16);
        var version = _h.Simulator.AddLora(content, baseModel: "Flux.1 D");
        (await _h.CreateAndWaitAsync("served", PipelineHarness.ModelUrl(version))).AssertDeploying();
        var token = await _h.Server.QueryAsync(db => WorkerTokens.CreateAsync(db, "gpu-box", DateTime.UtcNow, CancellationToken.None));
        using var client = _h.Server.CreateClient(token);
        var path = string.Format(WorkerProtocol.BlobPathFormat, version.File.Sha256);

        Assert.Equal(content, await client.GetByteArrayAsync(path, TestContext.Current.CancellationToken));
        foreach (var (from, to) in new (long, long?)[] { (10, null), (1000, 99_999), (content.Length - 7, null) })
        {
            using var ranged = new HttpRequestMessage(HttpMethod.Get, path) { Headers = { Range = new RangeHeaderValue(from, to) } };
            var partial = await client.SendAsync(ranged, TestContext.Current.CancellationToken);
            Assert.Equal(HttpStatusCode.PartialContent, partial.StatusCode);
            var end = (int)(to ?? content.Length - 1);
            Assert.Equal(content[(int)from..(end + 1)], await partial.Content.ReadAsByteArrayAsync(TestContext.Current.CancellationToken));
        }
        Assert.Equal(HttpStatusCode.NotFound, (await client.GetAsync(string.Format(WorkerProtocol.BlobPathFormat, new string('c', 64)), TestContext.Current.CancellationToken)).StatusCode);
    }

    [Fact]
    public async Task Unreferenced_blobs_are_deleted_from_the_bucket_and_referenced_ones_stay()
    {
        var kept = _h.Simulator.AddLora(AdapterFiles.Flux1(seed: 23), baseModel: "Flux.1 D");
        var dropped = _h.Simulator.AddLora(AdapterFiles.Flux1(seed: 24), baseModel: "Flux.1 D");
        (await _h.CreateAndWaitAsync("kept", PipelineHarness.ModelUrl(kept))).AssertDeploying();
        (await _h.CreateAndWaitAsync("dropped", PipelineHarness.ModelUrl(dropped))).AssertDeploying();
        Assert.Equal(2, (await _s3.KeysAsync()).Count);

        await (await _h.User.Client.DeleteAsync("/v1/lora/dropped")).ExpectAsync(HttpStatusCode.OK);
        await ImportPipelineTests.WaitUntilAsync(async () => !(await _s3.KeysAsync()).Contains(KeyOf(dropped.File.Sha256)));
        Assert.Equal([KeyOf(kept.File.Sha256)], await _s3.KeysAsync());

        await (await _h.User.Client.DeleteAsync("/v1/lora/kept")).ExpectAsync(HttpStatusCode.OK);
        await ImportPipelineTests.WaitUntilAsync(async () => (await _s3.KeysAsync()).Count == 0);
        Assert.Equal(0, await _h.Server.QueryAsync(db => db.Blobs.CountAsync()));
    }

    [Fact]
    public async Task Bad_s3_settings_stop_the_start_naming_each_setting()
    {
        var settings = new Dictionary<string, string?>
        {
            ["Storage:Provider"] = "s3",
            ["Storage:S3:Prefix"] = "/abs//path",
            ["Storage:S3:Endpoint"] = "minio:9000",
            ["Storage:S3:AccessKey"] = "only-the-key",
            ["Storage:S3:PartSizeMiB"] = "1",
            ["Storage:S3:PartsInFlight"] = "0",
        };

        var e = await Assert.ThrowsAsync<OptionsValidationException>(() => LoraDeployServer.StartAsync(settings: settings));

        foreach (var setting in new[] { "Storage:S3:Bucket", "Storage:S3:Prefix", "Storage:S3:Endpoint", "Storage:S3:SecretKey", "Storage:S3:PartSizeMiB", "Storage:S3:PartsInFlight" })
        {
            Assert.Contains(setting, e.Message);
        }
    }
}
