using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Text.Json;

namespace LoraDeploy.Tests.Dashboard;

/// <summary>
/// A real LoraDeploy server (its own process, throwaway data dir) wired to <see cref="MiniCivitai"/>, and a
/// token for user <c>alice</c>. Started on first use, so a test that skips starts nothing.
/// </summary>
public sealed class E2eEnvironment : IAsyncDisposable
{
    private readonly SemaphoreSlim _gate = new(1, 1);
    private MiniCivitai? _civitai;
    private LoraDeployProcess? _server;
    private string? _token;

    public MiniCivitai Civitai => _civitai ?? throw new InvalidOperationException("call StartAsync first");

    public LoraDeployProcess Server => _server ?? throw new InvalidOperationException("call StartAsync first");

    public Uri BaseUrl => Server.BaseUrl;

    public string Token => _token ?? throw new InvalidOperationException("call StartAsync first");

    public const string User = "alice";

    public const string Flux = "black-forest-labs/FLUX-1-dev";

    public async Task StartAsync()
    {
        await _gate.WaitAsync();
        try
        {
            if (_token is not null)
            {
                return;
            }
            _civitai ??= await MiniCivitai.StartAsync();
            _server ??= await LoraDeployProcess.StartAsync(_civitai.BaseUrl);
            _token = await _server.CreateTokenAsync(User);
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

    public HttpClient Http()
    {
        var http = new HttpClient { BaseAddress = BaseUrl };
        http.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", Token);
        return http;
    }

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
