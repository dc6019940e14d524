using System.Text;

namespace LoraDeploy.Serving.LlamaCpp;

/// <summary>
/// Finds stop strings in streamed text that may span tokens. Text that could still be the start of a stop string is
/// held back until the next piece decides it, so the stop text itself is never emitted.
/// </summary>
internal sealed class StopStringMatcher(IReadOnlyList<string> stops)
{
    private readonly string[] _stops = stops.Where(s => s.Length > 0).Distinct(StringComparer.Ordinal).ToArray();
    private readonly StringBuilder _held = new();

    /// <summary>Adds decoded text; returns what may be emitted now, and whether a stop string was reached.</summary>
    public (string Emit, bool Stopped) Push(string text)
    {
        if (_stops.Length == 0)
        {
            return (text, false);
        }
        _held.Append(text);
        var buffer = _held.ToString();
        var first = -1;
        foreach (var stop in _stops)
        {
            var at = buffer.IndexOf(stop, StringComparison.Ordinal);
            if (at >= 0 && (first < 0 || at < first))
            {
                first = at;
            }
        }
        if (first >= 0)
        {
            _held.Clear();
            return (buffer[..first], true);
        }
        var hold = 0;
        foreach (var stop in _stops)
        {
            for (var k = Math.Min(stop.Length - 1, buffer.Length); k > hold; k--)
            {
                if (buffer.AsSpan(buffer.Length - k).SequenceEqual(stop.AsSpan(0, k)))
                {
                    hold = k;
                    break;
                }
            }
        }
        _held.Clear().Append(buffer, buffer.Length - hold, hold);
        return (buffer[..^hold], false);
    }

    /// <summary>The text still held back when generation ends for another reason.</summary>
    public string Flush()
    {
        var rest = _held.ToString();
        _held.Clear();
        return rest;
    }
}
