using System.CommandLine;

namespace LoraDeploy.Cli;

internal static class ServeCommand
{
    public static Command Create() => new("serve", "Run the server.");
}
