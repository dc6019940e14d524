namespace LoraDeploy.Storage;

/// <summary>
/// The local folder of named partial writes (resumable downloads) that both stores keep: a download needs a file it
/// can append to and reopen after a restart, whatever holds the finished blobs.
/// </summary>
public sealed class StagingFolder
{
    public StagingFolder(string path)
    {
        Path = System.IO.Path.GetFullPath(path);
        Directory.CreateDirectory(Path);
    }

    public string Path { get; }

    public Stream Open(string name) =>
        new FileStream(PathOf(name), FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None, bufferSize: 1, FileOptions.Asynchronous);

    public long Length(string name)
    {
        var file = new FileInfo(PathOf(name));
        return file.Exists ? file.Length : 0;
    }

    public IEnumerable<(string Name, DateTime LastWriteUtc)> Files() =>
        new DirectoryInfo(Path).EnumerateFiles().Select(f => (f.Name, f.LastWriteTimeUtc));

    public bool Delete(string name)
    {
        var path = PathOf(name);
        if (!File.Exists(path))
        {
            return false;
        }
        File.Delete(path);
        return true;
    }

    public string PathOf(string name)
    {
        if (name.Length == 0 || name.Contains('/') || name.Contains('\\') || name.Contains(".."))
        {
            throw new ArgumentException("Staging names are plain file names.", nameof(name));
        }
        return System.IO.Path.Combine(Path, name);
    }
}
