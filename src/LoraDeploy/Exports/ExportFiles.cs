using System.Security.Cryptography;
using System.Text.RegularExpressions;

namespace LoraDeploy.Exports;

/// <summary>
/// The exports folder. Each start of a job writes its own <c>{id}.{attempt}.{format}</c> (the merge library writes
/// <c>.part</c> and renames) and copies the adapter into <c>{id}.{attempt}.adapter/</c>, so a runner that lost its
/// lease but still runs never writes over the file of the runner that took the job over. Nothing else builds paths in it.
/// </summary>
public sealed partial class ExportFiles
{
    public ExportFiles(string root)
    {
        Root = Path.GetFullPath(root);
        Directory.CreateDirectory(Root);
    }

    public string Root { get; }

    [GeneratedRegex("^[a-z0-9]{1,32}\\z")]
    private static partial Regex ExportId();

    [GeneratedRegex("^(safetensors|gguf)\\z")]
    private static partial Regex Format();

    public string OutputPath(string id, int attempt, string format)
    {
        if (!Format().IsMatch(format))
        {
            throw new ArgumentException("An export file is a safetensors or gguf file.", nameof(format));
        }
        return Path.Combine(Root, $"{Prefix(id, attempt)}{format}");
    }

    /// <summary>
    /// Where the adapter goes for the merge: a folder of its own, under the adapter's own file name, because the merge
    /// records that name in the output's metadata. Without one (an LLM LoRA, stored as a llama.cpp LoRA GGUF) it is
    /// <c>adapter.gguf</c> for a GGUF export; the merge reads the kind from the bytes either way.
    /// </summary>
    public string AdapterPath(string id, int attempt, string? fileName, string format)
    {
        var name = Path.GetFileName(fileName ?? "");
        if (name.Length == 0 || name is "." or ".."
            || !(name.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase) || name.EndsWith(".gguf", StringComparison.OrdinalIgnoreCase)))
        {
            name = format == "gguf" ? "adapter.gguf" : "adapter.safetensors";
        }
        return Path.Combine(AdapterFolder(id, attempt), name);
    }

    public void DeleteAdapter(string id, int attempt)
    {
        var folder = AdapterFolder(id, attempt);
        if (Directory.Exists(folder))
        {
            Directory.Delete(folder, recursive: true);
        }
    }

    /// <summary>Deletes everything of export <paramref name="id"/>: every start's file, <c>.part</c> and adapter copy.</summary>
    public void Delete(string id) => DeleteWhere(id, _ => true);

    /// <summary>Deletes what one start of the job wrote.</summary>
    public void DeleteAttempt(string id, int attempt) => DeleteWhere(id, name => name.StartsWith(Prefix(id, attempt), StringComparison.Ordinal));

    /// <summary>Deletes what earlier (dead) starts of the job left.</summary>
    public void DeleteOtherAttempts(string id, int attempt) => DeleteWhere(id, name => !name.StartsWith(Prefix(id, attempt), StringComparison.Ordinal));

    /// <summary>The export ids that have anything in the folder, with the newest write among their entries.</summary>
    public IEnumerable<(string Id, DateTime LastWriteUtc)> Entries() =>
        new DirectoryInfo(Root).EnumerateFileSystemInfos()
            .Select(entry => (Id: entry.Name.Split('.')[0], entry.LastWriteTimeUtc))
            .Where(entry => ExportId().IsMatch(entry.Id))
            .GroupBy(entry => entry.Id, StringComparer.Ordinal)
            .Select(group => (group.Key, group.Max(entry => entry.LastWriteTimeUtc)));

    public static async Task<string> Sha256Async(string path, CancellationToken ct)
    {
        await using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 0, FileOptions.Asynchronous | FileOptions.SequentialScan);
        return Convert.ToHexStringLower(await SHA256.HashDataAsync(file, ct));
    }

    private void DeleteWhere(string id, Func<string, bool> match)
    {
        foreach (var entry in new DirectoryInfo(Root).EnumerateFileSystemInfos($"{Prefix(id)}*").Where(e => match(e.Name)))
        {
            if (entry is DirectoryInfo folder)
            {
                folder.Delete(recursive: true);
            }
            else
            {
                entry.Delete();
            }
        }
    }

    private static string Prefix(string id, int? attempt = null)
    {
        if (!ExportId().IsMatch(id) || attempt < 0)
        {
            throw new ArgumentException("An export file is named by its id (and start).", nameof(id));
        }
        return attempt is { } a ? $"{id}.{a}." : $"{id}.";
    }

    private string AdapterFolder(string id, int attempt) => Path.Combine(Root, $"{Prefix(id, attempt)}adapter");
}
