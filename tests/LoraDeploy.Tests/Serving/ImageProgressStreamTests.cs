using System.Text;
using System.Text.Json;
using LoraDeploy.Inference;
using Microsoft.AspNetCore.Http;

namespace LoraDeploy.Tests.Serving;

/// <summary>The image progress stream alone: what the writer puts on the wire, and the reader reading it back.</summary>
public sealed class ImageProgressStreamTests
{
    [Fact]
    public async Task Progress_then_result_round_trip()
    {
        var ct = TestContext.Current.CancellationToken;
        var (http, body) = NewResponse();
        await ImageProgressStream.WriteProgressAsync(http.Response, 1, 20, ct);
        await ImageProgressStream.WriteProgressAsync(http.Response, 20, 20, ct);
        var answer = """{"images":["data:image/png;base64,iVBORw0KGgo="],"seed":42,"request_id":"r1"}""";
        await ImageProgressStream.WriteResultAsync(http.Response, Encoding.UTF8.GetBytes(answer), ct);

        Assert.Equal("text/event-stream", http.Response.ContentType);
        Assert.Equal("no-cache", http.Response.Headers.CacheControl.ToString());
        var wire = Encoding.UTF8.GetString(body.ToArray());
        Assert.StartsWith("event: progress\ndata: {\"step\":1,\"steps\":20}\n\n", wire);

        var events = await ReadAllAsync(body.ToArray());
        Assert.Equal(3, events.Count);
        Assert.Equal(new ImageStreamProgress(1, 20), events[0]);
        Assert.Equal(new ImageStreamProgress(20, 20), events[1]);
        var result = Assert.IsType<ImageStreamResult>(events[2]);
        Assert.Equal(42, result.Answer.GetProperty("seed").GetInt32());
        Assert.Equal("r1", result.Answer.GetProperty("request_id").GetString());
    }

    [Fact]
    public async Task Indented_result_json_survives_as_several_data_lines()
    {
        var ct = TestContext.Current.CancellationToken;
        var (http, body) = NewResponse();
        var indented = "{\r\n  \"seed\": 7,\n  \"images\": [\r  \"a\"\n  ]\n}";
        await ImageProgressStream.WriteResultAsync(http.Response, Encoding.UTF8.GetBytes(indented), ct);

        var wire = Encoding.UTF8.GetString(body.ToArray());
        Assert.DoesNotContain("\r", wire);
        Assert.Equal(6, wire.Split('\n').Count(l => l.StartsWith("data: ", StringComparison.Ordinal)));
        var result = Assert.IsType<ImageStreamResult>(Assert.Single(await ReadAllAsync(body.ToArray())));
        Assert.Equal(7, result.Answer.GetProperty("seed").GetInt32());
        Assert.Equal("a", result.Answer.GetProperty("images")[0].GetString());
    }

    [Fact]
    public async Task Error_round_trip_keeps_status_and_message()
    {
        var ct = TestContext.Current.CancellationToken;
        var (http, body) = NewResponse();
        await ImageProgressStream.WriteProgressAsync(http.Response, 3, 20, ct);
        await ImageProgressStream.WriteErrorAsync(http.Response, 503, "ComfyUI stopped answering: \"quoted\"\nsecond line", ct);

        var events = await ReadAllAsync(body.ToArray());
        Assert.Equal(new ImageStreamError(503, "ComfyUI stopped answering: \"quoted\"\nsecond line"), events[1]);
    }

    [Fact]
    public async Task Comments_unknown_events_and_crlf_are_read_as_sse_says()
    {
        var wire = ": keep-alive\r\n\r\nevent: ping\r\ndata: {}\r\n\r\nevent:progress\r\ndata:{\"step\":2,\"steps\":4}\r\n\r\nevent: result\ndata: {\"seed\":1}";
        var events = await ReadAllAsync(Encoding.UTF8.GetBytes(wire));
        Assert.Equal(2, events.Count);
        Assert.Equal(new ImageStreamProgress(2, 4), events[0]);
        Assert.IsType<ImageStreamResult>(events[1]);
    }

    [Theory]
    [InlineData("event: progress\ndata: {\"step\":\"x\",\"steps\":4}\n\n", "step")]
    [InlineData("event: result\ndata: not json\n\n", "not JSON")]
    [InlineData("event: result\ndata: [1]\n\n", "JSON object")]
    [InlineData("event: error\ndata: {\"status\":500}\n\n", "string error")]
    public async Task A_broken_frame_says_what_is_wrong(string wire, string expected)
    {
        var e = await Assert.ThrowsAsync<InvalidDataException>(() => ReadAllAsync(Encoding.UTF8.GetBytes(wire)));
        Assert.Contains(expected, e.Message, StringComparison.Ordinal);
    }

    private static (DefaultHttpContext Http, MemoryStream Body) NewResponse()
    {
        var body = new MemoryStream();
        var http = new DefaultHttpContext();
        http.Response.Body = body;
        return (http, body);
    }

    private static async Task<List<ImageStreamEvent>> ReadAllAsync(byte[] wire)
    {
        var events = new List<ImageStreamEvent>();
        await foreach (var e in ImageProgressStream.ReadAsync(new MemoryStream(wire), TestContext.Current.CancellationToken))
        {
            events.Add(e);
        }
        return events;
    }
}
