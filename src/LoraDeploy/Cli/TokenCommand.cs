using System.CommandLine;

namespace LoraDeploy.Cli;

internal static class TokenCommand
{
    public static Command Create() => new("token", "Manage API tokens.");
}
