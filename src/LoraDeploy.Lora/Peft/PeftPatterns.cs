using System.Text.RegularExpressions;

namespace LoraDeploy.Lora.Peft;

/// <summary>
/// PEFT's module-name matching, in .NET regex. Gaps with Python's <c>re</c>: Python-only syntax such as
/// <c>(?P&lt;name&gt;…)</c> or <c>(?P=name)</c> is refused as an invalid pattern rather than translated; .NET accepts a
/// few constructs Python rejects (e.g. variable-length lookbehind), which a config saved by PEFT cannot contain anyway.
/// Patterns run with a time limit so a hostile pattern cannot stall the converter.
/// </summary>
internal static class PeftPatterns
{
    private static readonly TimeSpan MatchTimeout = TimeSpan.FromSeconds(1);

    /// <summary>
    /// The key of <paramref name="pattern"/> that applies to <paramref name="module"/> under PEFT's
    /// <c>get_pattern_key</c>: an exact key first, else the first key with
    /// <c>re.match(rf"(.*\.)?({key})$", module)</c>; null when none does.
    /// </summary>
    public static string? MatchingKey<T>(IReadOnlyList<KeyValuePair<string, T>> pattern, string module, string field)
    {
        foreach (var (key, _) in pattern)
        {
            if (key == module)
            {
                return key;
            }
        }
        foreach (var (key, _) in pattern)
        {
            if (IsMatch(@"\A(?:.*\.)?(?:" + key + ")$", module, field, key))
            {
                return key;
            }
        }
        return null;
    }

    /// <summary>Whether <paramref name="module"/> is one of PEFT's <c>target_modules</c>.</summary>
    public static bool IsTarget(PeftAdapterConfig config, string module, bool isEmbedding)
    {
        if (config.TargetModules is { } names)
        {
            // PEFT: an exact name, or a suffix after a dot.
            return names.Any(name => module == name || module.EndsWith("." + name, StringComparison.Ordinal));
        }
        if (config.TargetModulesRegex is { } regex)
        {
            // "all-linear" is expanded by PEFT at load time to every linear layer except the output one; saved configs
            // may still carry it. Embeddings are not linear.
            return regex == "all-linear"
                ? !isEmbedding
                : IsMatch(@"\A(?:" + regex + @")\z", module, "target_modules", regex);
        }
        // No target_modules: PEFT picked its defaults for the model type; the tensors are the only evidence.
        return true;
    }

    private static bool IsMatch(string regex, string input, string field, string key)
    {
        try
        {
            return Regex.IsMatch(input, regex, RegexOptions.CultureInvariant, MatchTimeout);
        }
        catch (ArgumentException e)
        {
            throw new PeftAdapterException($"adapter_config.json '{field}' entry '{key}' is not a regex this converter can read ({e.Message}); note Python-only syntax such as (?P<name>…) is not supported", e);
        }
        catch (RegexMatchTimeoutException e)
        {
            throw new PeftAdapterException($"adapter_config.json '{field}' entry '{key}' took too long to match module '{input}'", e);
        }
    }
}
