using System.CommandLine;

namespace LoraDeploy.Cli;

/// <summary>Client commands that talk to a LoraDeploy server over its HTTP API.</summary>
internal static class ClientCommands
{
    public static IEnumerable<Command> Create() => [];
}
