using System.CommandLine;

namespace LoraDeploy.Cli.Client;

/// <summary>The options every client command takes: where the server is, who we are, and <c>--json</c>.</summary>
internal sealed class CommonOptions
{
    public const string DefaultServer = "http://127.0.0.1:8080";

    public Option<string?> Server { get; } = new("--server")
    {
        Description = $"Server base URL (env LORADEPLOY_SERVER, default {DefaultServer}).",
        HelpName = "URL",
    };

    public Option<string?> Token { get; } = new("--token")
    {
        Description = "API token sent as Authorization: Bearer (env LORADEPLOY_TOKEN).",
        HelpName = "TOKEN",
    };

    public Option<bool> Json { get; } = new("--json")
    {
        Description = "Print the server's JSON and nothing else on stdout.",
    };

    public void AddTo(Command command)
    {
        command.Options.Add(Server);
        command.Options.Add(Token);
        command.Options.Add(Json);
    }

    /// <summary>Resolves the server URL and token from the options, then the environment, then the defaults.</summary>
    public ClientContext Read(ParseResult result)
    {
        var server = FirstNonEmpty(result.GetValue(Server), Environment.GetEnvironmentVariable("LORADEPLOY_SERVER"))
                     ?? DefaultServer;
        var fromOption = FirstNonEmpty(result.GetValue(Token));
        var token = fromOption ?? FirstNonEmpty(Environment.GetEnvironmentVariable("LORADEPLOY_TOKEN"));
        var tokenSource = token is null ? null : fromOption is not null ? "--token" : "LORADEPLOY_TOKEN";
        if (!Uri.TryCreate(server.EndsWith('/') ? server : server + "/", UriKind.Absolute, out var uri)
            || (uri.Scheme != Uri.UriSchemeHttp && uri.Scheme != Uri.UriSchemeHttps))
        {
            throw new ClientException($"--server must be an http(s) URL, got '{server}'", ExitCodes.Usage);
        }
        return new ClientContext(uri, token, tokenSource, result.GetValue(Json));
    }

    private static string? FirstNonEmpty(params string?[] values) =>
        values.FirstOrDefault(static v => !string.IsNullOrWhiteSpace(v))?.Trim();
}

/// <summary>What a client command resolved from its options; <paramref name="TokenSource"/> names where the token came from.</summary>
internal sealed record ClientContext(Uri Server, string? Token, string? TokenSource, bool Json)
{
    public ApiClient CreateClient(TimeSpan? timeout = null) => new(Server, Token, TokenSource, timeout: timeout);
}
