namespace LoraDeploy;

/// <summary>
/// The data folder (<c>--data-dir</c>, setting <c>DataDir</c>): SQLite file and, by default, blobs. One rule for every
/// command: a relative path (and the default <c>data</c>) is taken from the directory the command was run from, so
/// <c>serve</c> and <c>token create</c> run from one place share one database.
/// </summary>
public static class DataDirectory
{
    public const string Key = "DataDir";

    public static string Get(IConfiguration configuration) =>
        Path.GetFullPath(configuration[Key] is { Length: > 0 } dir ? dir : "data");

    /// <summary>The startup line that tells the user where their data is.</summary>
    public static string Describe(IConfiguration configuration) => $"LoraDeploy data in {Get(configuration)}";
}
