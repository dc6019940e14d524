using System.Security.Cryptography;
using System.Text.RegularExpressions;

namespace LoraDeploy.Exports;

/// <summary>
/// The exports folder: <c>{id}.{format}</c> per finished export (the merge library writes <c>.part</c> and renames),
/// and <c>{id}.adapter/</c> holding the adapter copied out of the blob store while its merge runs. Nothing else
/// builds paths in it.
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

    public string OutputPath(string id, string format)
    {
        if (!ExportId().IsMatch(id) || !Format().IsMatch(format))
        {
            throw new ArgumentException("An export file is named by its id and format.", nameof(id));
        }
        return Path.Combine(Root, $"{id}.{format}");
    }

    /// <summary>
    /// Where the adapter goes for the merge: a folder of its own, under the adapter's own file name, because the merge
    /// records that name in the output's metadata.
    /// </summary>
    public string AdapterPath(string id, string? fileName)
    {
        var name = Path.GetFileName(fileName ?? "");
        if (name.Length == 0 || name is "." or ".." || !name.EndsWith(".safetensors", StringComparison.OrdinalIgnoreCase))
        {
            name = "adapter.safetensors";
        }
        return Path.Combine(AdapterFolder(id), name);
    }

    public void DeleteAdapter(string id)
    {
        var folder = AdapterFolder(id);
        if (Directory.Exists(folder))
        {
            Directory.Delete(folder, recursive: true);
        }
    }

    /// <summary>Deletes everything of export <paramref name="id"/>: the file, a leftover <c>.part</c>, the adapter copy.</summary>
    public void Delete(string id)
    {
        foreach (var format in new[] { "safetensors", "gguf" })
        {
            var path = OutputPath(id, format);
            File.Delete(path);
            File.Delete(path + ".part");
        }
        DeleteAdapter(id);
    }

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

    private string AdapterFolder(string id) => OutputPath(id, "safetensors")[..^".safetensors".Length] + ".adapter";
}
