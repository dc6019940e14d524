namespace LoraDeploy.Cli.Client;

/// <summary>A failure the client reports as one line on stderr with an exit code (1 server side, 2 usage).</summary>
internal sealed class ClientException(string message, int exitCode = ExitCodes.ServerError, int? statusCode = null)
    : Exception(message)
{
    public int ExitCode { get; } = exitCode;

    /// <summary>The HTTP status the server answered with, when the failure came from a response.</summary>
    public int? StatusCode { get; } = statusCode;
}

internal static class ExitCodes
{
    public const int Ok = 0;
    public const int ServerError = 1;
    public const int Usage = 2;

    /// <summary><c>--timeout</c> passed before the deploy settled; it goes on on the server.</summary>
    public const int TimedOut = 3;
}
