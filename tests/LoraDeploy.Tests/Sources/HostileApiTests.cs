using LoraDeploy.Sources;
using LoraDeploy.Tests.Simulator;

namespace LoraDeploy.Tests.Sources;

/// <summary>
/// A CivitAI API that misbehaves on purpose (issue 16): slow answers end, endless bodies are read only up to a limit,
/// and a redirect without a usable Location says so. The deadlines only stop a broken build from hanging the run.
/// </summary>
public class HostileApiTests
{
    // What loopback socket buffers and Kestrel's output pipe can absorb after the client stopped reading.
    private const long BufferedBytes = 16L * 1024 * 1024;
    private const long EndlessBytes = 256L * 1024 * 1024;

    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static CancellationTokenSource Deadline()
    {
        var cts = CancellationTokenSource.CreateLinkedTokenSource(Ct);
        cts.CancelAfter(TimeSpan.FromSeconds(30));
        return cts;
    }

    /// <summary>The server side of an endless answer has stopped, so its byte counter is final.</summary>
    private static async Task EndlessAnswerEndedAsync(CivitaiSimulator sim)
    {
        var deadline = DateTime.UtcNow.AddSeconds(20);
        while (sim.EndlessAnswersEnded == 0)
        {
            Assert.True(DateTime.UtcNow < deadline, "the endless answer is still being sent after the client finished");
            await Task.Delay(20, Ct);
        }
    }

    [Fact]
    public async Task A_trickling_api_answer_times_out()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors());
        await using var h = new SourcesHarness(sim, extra: new() { ["Import:ApiBodyTimeout"] = "00:00:00.500" });
        sim.Hostile.ApiTrickleDelay = TimeSpan.FromMilliseconds(50);
        using var deadline = Deadline();
        Assert.True(CivitaiUrl.TryParse($"https://civitai.com/model-versions/{v.Id}", out var reference, out _));

        var result = await h.Client.ResolveAsync(reference, deadline.Token);

        Assert.Equal(ReasonClass.Network, result.ReasonClass);
        Assert.Contains($"CivitAI's answer for /api/v1/model-versions/{v.Id} did not arrive whole within Import:ApiBodyTimeout (00:00:00.5000000)", result.FailReason);
    }

    [Fact]
    public async Task An_endless_api_error_body_is_read_only_up_to_the_limit()
    {
        var (result, versionId, bytesSent) = await ResolveAgainstEndlessAnswerAsync(hostile => hostile.ApiErrorBodyBytes = EndlessBytes);

        Assert.Equal(ReasonClass.NotFound, result.ReasonClass);
        Assert.Contains($"CivitAI has no published version {versionId}", result.FailReason);
        Assert.InRange(bytesSent, 1, BufferedBytes);
    }

    [Fact]
    public async Task An_endless_error_body_on_the_download_probe_is_read_only_up_to_the_limit()
    {
        var (result, versionId, bytesSent) = await ResolveAgainstEndlessAnswerAsync(hostile => hostile.DownloadErrorBodyBytes = EndlessBytes);

        Assert.Equal(ReasonClass.AuthRequired, result.ReasonClass);
        Assert.Contains($"CivitAI requires a login to download version {versionId}", result.FailReason);
        Assert.InRange(bytesSent, 1, BufferedBytes);
    }

    [Fact]
    public async Task An_endless_json_string_fails_at_the_api_body_limit()
    {
        var (result, versionId, bytesSent) = await ResolveAgainstEndlessAnswerAsync(
            hostile => hostile.ApiJsonStringBytes = EndlessBytes, new() { ["Import:MaxApiBodyBytes"] = "1048576" });

        Assert.Equal(ReasonClass.Upstream, result.ReasonClass);
        Assert.Contains($"CivitAI's answer for /api/v1/model-versions/{versionId} is larger than Import:MaxApiBodyBytes (1048576 bytes)", result.FailReason);
        Assert.InRange(bytesSent, 1, BufferedBytes);
    }

    /// <summary>Resolves a version while the API answers with an endless body; BytesSent is what the API host's transport took in meanwhile.</summary>
    private static async Task<(CivitaiResolveResult Result, int VersionId, long BytesSent)> ResolveAgainstEndlessAnswerAsync(
        Action<SimHostile> endless, Dictionary<string, string?>? settings = null)
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors());
        await using var h = new SourcesHarness(sim, extra: settings);
        endless(sim.Hostile);
        var before = sim.ApiBytesSent;

        var result = await h.ResolveAsync($"https://civitai.com/model-versions/{v.Id}");

        await EndlessAnswerEndedAsync(sim);
        return (result, v.Id, sim.ApiBytesSent - before);
    }

    [Theory]
    [InlineData("http://[oops/file", "(\"http://[oops/file\" is not a URL)")]
    [InlineData("", "(no Location header)")]
    public async Task An_unusable_redirect_location_fails_naming_the_problem(string location, string expected)
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: Ct);
        var v = sim.AddLora(SimContent.Safetensors());
        await using var h = new SourcesHarness(sim);
        var file = await h.ResolveOkAsync($"https://civitai.com/model-versions/{v.Id}");
        sim.Hostile.DownloadRedirectLocation = location;
        using var deadline = Deadline();

        var ex = await Assert.ThrowsAsync<DownloadFailedException>(() => h.Downloader.DownloadAsync(file, h.Blobs, h.StagingName, null, deadline.Token));

        Assert.Equal(ReasonClass.Upstream, ex.ReasonClass);
        Assert.Contains($"CivitAI answered 307 with an unusable redirect Location {expected}", ex.FailReason);
        Assert.Equal(2, sim.Requests.Count(r => r.Host == "api" && r.PathAndQuery.StartsWith("/api/download/", StringComparison.Ordinal))); // probe + one, not retried
    }
}
