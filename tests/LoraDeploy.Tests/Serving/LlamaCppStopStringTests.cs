using LoraDeploy.Serving.LlamaCpp;

namespace LoraDeploy.Tests.Serving;

/// <summary>The stop-string matcher alone: stops spanning pieces, several stops, text that only looked like a stop.</summary>
public sealed class LlamaCppStopStringTests
{
    [Theory]
    [InlineData(new[] { "Hel", "lo, wo", "rld!" }, new[] { "o, w" }, "Hell", true)]
    [InlineData(new[] { "a", "b", "c", "d" }, new[] { "bcd" }, "a", true)]
    [InlineData(new[] { "abc", "END", "more" }, new[] { "END", "c" }, "ab", true)]
    [InlineData(new[] { "x<", "<y", "<<z" }, new[] { "<<<" }, "x<<y<<z", false)]
    [InlineData(new[] { "no ", "stop ", "here" }, new[] { "", "zzz" }, "no stop here", false)]
    [InlineData(new[] { "caf", "é!" }, new[] { "é" }, "caf", true)]
    public void Stop_text_is_cut_and_never_emitted(string[] pieces, string[] stops, string expected, bool stopped)
    {
        var matcher = new StopStringMatcher(stops);
        var emitted = "";
        var hit = false;
        foreach (var piece in pieces)
        {
            var (emit, isStop) = matcher.Push(piece);
            emitted += emit;
            if (isStop)
            {
                hit = true;
                break;
            }
        }
        if (!hit)
        {
            emitted += matcher.Flush();
        }
        Assert.Equal(expected, emitted);
        Assert.Equal(stopped, hit);
    }

    [Fact]
    public void Text_that_may_start_a_stop_is_held_until_decided()
    {
        var matcher = new StopStringMatcher(["</end>"]);
        Assert.Equal(("ok ", false), matcher.Push("ok </e"));
        Assert.Equal(("</ex", false), matcher.Push("x"));
        Assert.Equal(("", false), matcher.Push("</"));
        Assert.Equal(("", true), matcher.Push("end> tail"));
    }
}
