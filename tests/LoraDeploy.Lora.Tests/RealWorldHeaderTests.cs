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

    [Theory]
    [MemberData(nameof(Names))]
    public void Probe_matches_expected(string name)
    {
        using var doc = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(Root, "expected.json")));
        var entry = doc.RootElement.GetProperty("files").GetProperty(name);
        var expected = entry.GetProperty("expected");
        var reliable = entry.GetProperty("reliable_for").EnumerateArray().Select(e => e.GetString()!).ToHashSet();

        var report = LoraProber.ProbeFile(_files.PathOf(name, entry.GetProperty("header").GetString()!));

        // Every field is scored on every layout: against expected.json where it calls the field reliable, else
        // against the answer this prober gives (pinned below), so no layout and no field goes unchecked.
        var actual = new Dictionary<string, string>
        {
            ["architecture"] = report.Architecture,
            ["network"] = report.Network,
            ["format"] = report.Format,
            ["lora_family"] = report.IsAdapter ? "true" : "false",
            ["t2i_applicable"] = report.Applicable ? "true" : "false",
        };
        foreach (var (field, value) in actual)
        {
            if (reliable.Contains(field))
            {
                var accepted = Accepted(expected, field);
                Assert.True(accepted.Contains(value), $"{field}: expected.json accepts {string.Join("|", accepted)}, the prober said {value} ({report.NotApplicableReason})");
            }
            else
            {
                Assert.True(Unscored.TryGetValue((name, field), out var pinned), $"{field} of {name} is scored by nothing; pin the prober's answer ({value}) in Unscored");
                Assert.Equal(pinned, value);
            }
        }

        var stats = entry.GetProperty("stats");
        Assert.Equal(stats.GetProperty("tensors").GetInt32(), report.TensorCount);
        Assert.Equal(stats.GetProperty("dtypes").EnumerateObject().Select(p => p.Name).Order(StringComparer.Ordinal), report.Dtypes);
        if (expected.GetProperty("lora_family").GetBoolean())
        {
            Assert.Equal(stats.GetProperty("modules").GetInt32(), report.ModuleCount);
            var ranks = stats.GetProperty("ranks").EnumerateArray().Select(r => r.GetInt32()).ToList();
            if (ranks.Count > 0)
            {
                Assert.Equal((ranks.Min(), ranks.Max()), (report.RankMin, report.RankMax));
            }
        }
    }

    /// <summary>
    /// The prober's answers for the fields expected.json does not score (hand-made samples whose LoKr factor
    /// shapes no real layer has, or which lack the keys that would tell). Pinned so a change to them is seen.
    /// </summary>
    private static readonly Dictionary<(string Name, string Field), string> Unscored = new()
    {
        [("flux1__invoke-lokr-bfl-synthetic", "architecture")] = "flux1",
        [("flux1__invoke-lokr-bfl-synthetic", "lora_family")] = "true",
        [("flux1__invoke-lokr-bfl-synthetic", "t2i_applicable")] = "true",
        [("qwen-image__invoke-kohya-lokr-synthetic", "lora_family")] = "true",
        [("qwen-image__invoke-kohya-lokr-synthetic", "t2i_applicable")] = "true",
        [("qwen-image__invoke-diffusers-synthetic", "architecture")] = "flux1",
        [("qwen-image__invoke-diffusers-synthetic", "format")] = "diffusers",
        [("qwen-image__invoke-diffusers-synthetic", "t2i_applicable")] = "true",
        [("anima__invoke-kohya-sample", "t2i_applicable")] = "true",
        [("anima__invoke-kohya-te-sample", "t2i_applicable")] = "true",
        [("anima__invoke-lokr-dora-synthetic", "network")] = "dora",
        [("anima__invoke-lokr-dora-synthetic", "lora_family")] = "true",
        [("anima__invoke-lokr-dora-synthetic", "t2i_applicable")] = "true",
        [("anima__invoke-peft-sample", "t2i_applicable")] = "true",
    };

    // expected.json spells ids of models outside its core vocabulary "other-known:<name>".
    private static HashSet<string> Accepted(JsonElement expected, string field)
    {
        var value = expected.GetProperty(field);
        var accepted = new HashSet<string>(StringComparer.Ordinal) { value.ValueKind == JsonValueKind.String ? value.GetString()! : value.GetRawText() };
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
