using System.Globalization;
using System.Text.RegularExpressions;

namespace LoraDeploy.Cli.Client;

/// <summary><c>--timeout</c> values: <c>90</c> or <c>90s</c>, <c>10m</c>, <c>1h</c>, <c>500ms</c>, or a TimeSpan (<c>00:10:00</c>).</summary>
internal static partial class Durations
{
    [GeneratedRegex(@"^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?$")]
    private static partial Regex WithUnit();

    public static TimeSpan Parse(string text, string option)
    {
        text = text.Trim();
        var match = WithUnit().Match(text);
        TimeSpan value;
        if (match.Success)
        {
            var number = double.Parse(match.Groups[1].Value, CultureInfo.InvariantCulture);
            value = match.Groups[2].Value switch
            {
                "ms" => TimeSpan.FromMilliseconds(number),
                "m" => TimeSpan.FromMinutes(number),
                "h" => TimeSpan.FromHours(number),
                _ => TimeSpan.FromSeconds(number),
            };
        }
        else if (!TimeSpan.TryParse(text, CultureInfo.InvariantCulture, out value))
        {
            throw new ClientException($"{option} must be a duration such as 90s, 10m or 1h, got '{text}'", ExitCodes.Usage);
        }
        return value > TimeSpan.Zero
            ? value
            : throw new ClientException($"{option} must be longer than zero, got '{text}'", ExitCodes.Usage);
    }

    public static string Format(TimeSpan value) =>
        value.TotalHours >= 1 && value.TotalHours == Math.Floor(value.TotalHours) ? $"{value.TotalHours:0} h"
        : value.TotalMinutes >= 1 && value.TotalMinutes == Math.Floor(value.TotalMinutes) ? $"{value.TotalMinutes:0} min"
        : value.TotalSeconds >= 1 ? string.Create(CultureInfo.InvariantCulture, $"{value.TotalSeconds:0.#} s")
        : $"{value.TotalMilliseconds:0} ms";
}
