namespace LoraDeploy;

/// <summary>The data folder (<c>--data-dir</c>, setting <c>DataDir</c>): SQLite file and, by default, blobs.</summary>
public static class DataDirectory
{
    public const string Key = "DataDir";

    public static string Get(IConfiguration configuration) =>
        Path.GetFullPath(configuration[Key] is { Length: > 0 } dir ? dir : "data");
}
