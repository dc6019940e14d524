using System.Text.Json;
using LoraDeploy.Lora.Tests.Support;

namespace LoraDeploy.Lora.Tests;

/// <summary>
/// The 20 real-world layouts from InvokeAI's test data (Apache-2.0, see Fixtures/realworld-lora-headers/README.md),
/// written as sparse safetensors files and probed; compared with expected.json on the fields it marks reliable.
/// </summary>
public sealed class RealWorldHeaderTests : IClassFixture<RealWorldHeaderTests.Files>
{
    private static readonly string Root = Path.Combine(AppContext.BaseDirectory, "Fixtures", "realworld-lora-headers");
    private readonly Files _files;

    public RealWorldHeaderTests(Files files) => _files = files;

    public static TheoryData<string> Names()
    {
        using var doc = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(Root, "expected.json")));
        var data = new TheoryData<string>();
        foreach (var file in doc.RootElement.GetProperty("files").EnumerateObject())
        {
            data.Add(file.Name);
        }
        return data;
    }

    [Fact]
    public void There_are_twenty_layouts() => Assert.Equal(20, Names().Count);

    [Theory]
    [MemberData(nameof(Names))]
    public void Probe_matches_expected(string name)
    {
        using var doc = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(Root, "expected.json")));
        var entry = doc.RootElement.GetProperty("files").GetProperty(name);
        var expected = entry.GetProperty("expected");
        var reliable = entry.GetProperty("reliable_for").EnumerateArray().Select(e => e.GetString()!).ToHashSet();

        var report = LoraProber.ProbeFile(_files.PathOf(name, entry.GetProperty("header").GetString()!));

        if (reliable.Contains("architecture"))
        {
            Assert.Contains(report.Architecture, Accepted(expected, "architecture"));
        }
        if (reliable.Contains("network"))
        {
            Assert.Contains(report.Network, Accepted(expected, "network"));
        }
        if (reliable.Contains("format"))
        {
            Assert.Contains(report.Format, Accepted(expected, "format"));
        }
        if (reliable.Contains("lora_family"))
        {
            Assert.Equal(expected.GetProperty("lora_family").GetBoolean(), report.IsAdapter);
        }
        if (reliable.Contains("t2i_applicable"))
        {
            Assert.True(expected.GetProperty("t2i_applicable").GetBoolean() == report.Applicable, report.NotApplicableReason);
        }
        var stats = entry.GetProperty("stats");
        Assert.Equal(stats.GetProperty("tensors").GetInt32(), report.TensorCount);
        if (report.IsAdapter)
        {
            Assert.Equal(stats.GetProperty("modules").GetInt32(), report.ModuleCount);
        }
    }

    // expected.json spells ids of models outside its core vocabulary "other-known:<name>".
    private static HashSet<string> Accepted(JsonElement expected, string field)
    {
        var accepted = new HashSet<string>(StringComparer.Ordinal) { expected.GetProperty(field).GetString()! };
        if (expected.TryGetProperty(field + "_accept", out var list))
        {
            accepted.UnionWith(list.EnumerateArray().Select(e => e.GetString()!));
        }
        return accepted.Select(a => a.StartsWith("other-known:", StringComparison.Ordinal) ? a["other-known:".Length..] : a).ToHashSet();
    }

    /// <summary>Writes each header once per test run into a temp folder (sparse files).</summary>
    public sealed class Files : IDisposable
    {
        private readonly string _dir = TempFiles.Directory();
        private readonly Dictionary<string, string> _paths = [];
        private readonly Lock _lock = new();

        public string PathOf(string name, string header)
        {
            lock (_lock)
            {
                if (!_paths.TryGetValue(name, out var path))
                {
                    path = SafetensorsWriter.FromFixture(Path.Combine(Root, header)).WriteTo(Path.Combine(_dir, name + ".safetensors"));
                    _paths[name] = path;
                }
                return path;
            }
        }

        public void Dispose() => Directory.Delete(_dir, recursive: true);
    }
}
