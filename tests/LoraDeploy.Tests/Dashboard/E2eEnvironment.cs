using System.Net.Http.Json;
using System.Text.Json;
using LoraDeploy.Tests.Simulator;

namespace LoraDeploy.Tests.Dashboard;

/// <summary>
/// The real server (<see cref="LoraDeployServer"/>: the real host on loopback, throwaway SQLite) with its
/// pipeline on, resolving and downloading from the <see cref="CivitaiSimulator"/>, which lists one FLUX.1 LoRA.
/// A token for a fresh user. Started on first use, so a test that skips starts nothing.
/// </summary>
public sealed class E2eEnvironment : IAsyncDisposable
{
    public const string Flux = "black-forest-labs/FLUX-1-dev";

    private readonly SemaphoreSlim _gate = new(1, 1);
    private readonly Dictionary<string, string?> _settings = [];
    private CivitaiSimulator? _civitai;
    private LoraDeployServer? _server;
    private TestUser? _user;
    private SimVersion? _lora;

    public CivitaiSimulator Civitai => _civitai ?? throw NotStarted();

    public LoraDeployServer Server => _server ?? throw NotStarted();

    public Uri BaseUrl => Server.BaseUrl;

    public string User => (_user ?? throw NotStarted()).Name;

    public string Token => (_user ?? throw NotStarted()).Token;

    /// <summary>The adapter file CivitAI lists for <see cref="GoodUrl"/>.</summary>
    public byte[] File => (_lora ?? throw NotStarted()).File.Content;

    public string Sha256 => (_lora ?? throw NotStarted()).File.Sha256;

    /// <summary>What a user pastes: CivitAI's own host; the server asks Civitai:BaseUrl (the simulator).</summary>
    public string GoodUrl => $"https://civitai.com/models/{_lora!.Model.Id}?modelVersionId={_lora.Id}";

    /// <summary>A version CivitAI does not have: the deploy fails with a reason.</summary>
    public string MissingUrl => $"https://civitai.com/models/{_lora!.Model.Id}?modelVersionId=987654";

    /// <summary>An environment whose server also gets these settings (serving pools, say).</summary>
    public static E2eEnvironment WithSettings(IReadOnlyDictionary<string, string?> settings)
    {
        var env = new E2eEnvironment();
        foreach (var (key, value) in settings)
        {
            env._settings[key] = value;
        }
        return env;
    }

    public async Task StartAsync()
    {
        await _gate.WaitAsync();
        try
        {
            if (_user is not null)
            {
                return;
            }
            _civitai ??= await CivitaiSimulator.StartAsync();
            _lora ??= _civitai.AddLora(AdapterFiles.Flux1(rank: 4), baseModel: "Flux.1 D",
                fileName: "pixel-sprites.safetensors", trainedWords: ["pxlsprite"], modelName: "Pixel sprites");
            var settings = new Dictionary<string, string?>(_civitai.Configuration());
            foreach (var (key, value) in _settings)
            {
                settings[key] = value;
            }
            _server ??= await LoraDeployServer.StartAsync(TestDatabase.Sqlite, settings);
            _user = await _server.CreateUserAsync("e2e");
        }
        finally
        {
            _gate.Release();
        }
    }

    /// <summary>The environment for a client command: server and token given the way a user would.</summary>
    public IReadOnlyDictionary<string, string?> ClientEnv => new Dictionary<string, string?>
    {
        ["LORADEPLOY_SERVER"] = BaseUrl.ToString().TrimEnd('/'),
        ["LORADEPLOY_TOKEN"] = Token,
    };

    public Task<CliResult> CliAsync(params string[] args) => LoraDeployExe.RunAsync(args, ClientEnv, TimeSpan.FromSeconds(120));

    public HttpClient Http() => Server.CreateClient(Token);

    /// <summary>Creates a LoRA through the API (not the code under test) and returns the <c>DeploymentOut</c>.</summary>
    public async Task<JsonElement> CreateViaApiAsync(string name, string civitUrl, bool isPrivate = true, string description = "")
    {
        using var http = Http();
        using var response = await http.PostAsJsonAsync("v1/lora/create", new Dictionary<string, object>
        {
            ["lora_name"] = name,
            ["base_model"] = Flux,
            ["source"] = new Dictionary<string, string> { ["type"] = "civitai", ["civit_url"] = civitUrl },
            ["private"] = isPrivate,
            ["description"] = description,
        });
        var text = await response.Content.ReadAsStringAsync();
        Assert.True(response.IsSuccessStatusCode, $"create {name}: {(int)response.StatusCode} {text}");
        return JsonDocument.Parse(text).RootElement.Clone();
    }

    public async Task<JsonElement> GetJsonAsync(string path)
    {
        using var http = Http();
        var text = await http.GetStringAsync(path);
        return JsonDocument.Parse(text).RootElement.Clone();
    }

    private static InvalidOperationException NotStarted() => new("call StartAsync first");

    public async ValueTask DisposeAsync()
    {
        if (_server is not null)
        {
            await _server.DisposeAsync();
        }
        if (_civitai is not null)
        {
            await _civitai.DisposeAsync();
        }
        _gate.Dispose();
    }
}
