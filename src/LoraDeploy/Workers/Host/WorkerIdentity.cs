using System.Security.Cryptography;
using System.Text.RegularExpressions;

namespace LoraDeploy.Workers.Host;

/// <summary>
/// A worker's registration id: <c>Worker:Id</c>, else one chosen once and kept in <c>{data-dir}/worker-id</c>, so a
/// restarted worker comes back as itself (the server keeps its placement).
/// </summary>
public static partial class WorkerIdentity
{
    public const string FileName = "worker-id";

    public static string Get(WorkerOptions options, IConfiguration configuration)
    {
        if (options.Id is { Length: > 0 } configured)
        {
            return configured;
        }
        var dataDir = DataDirectory.Get(configuration);
        var path = Path.Combine(dataDir, FileName);
        if (File.Exists(path) && File.ReadAllText(path).Trim() is var kept && WorkerOptions.IdPattern().IsMatch(kept))
        {
            return kept;
        }
        var host = NotIdCharacters().Replace(Environment.MachineName, "-").Trim('-', '.', '_');
        var id = $"{(host.Length == 0 ? "worker" : host[..Math.Min(host.Length, 40)])}-{RandomNumberGenerator.GetHexString(8, lowercase: true)}";
        Directory.CreateDirectory(dataDir);
        var staging = path + ".tmp";
        File.WriteAllText(staging, id + "\n");
        File.Move(staging, path, overwrite: true);
        return id;
    }

    /// <summary>The id of one engine's registration when a process serves several engines.</summary>
    public static string ForEngine(string id, string engine)
    {
        var suffix = "-" + engine;
        return (id.Length + suffix.Length > 64 ? id[..(64 - suffix.Length)] : id) + suffix;
    }

    [GeneratedRegex("[^A-Za-z0-9._-]+")]
    private static partial Regex NotIdCharacters();
}
