using System.CommandLine;
using LoraDeploy.Cli.Client;

namespace LoraDeploy.Cli;

/// <summary>Client commands that talk to a LoraDeploy server over its HTTP API.</summary>
internal static class ClientCommands
{
    public static IEnumerable<Command> Create() =>
    [
        DeployCommands.CreateCommand(),
        DeployCommands.StatusCommand(),
        DeployCommands.ListCommand(),
        DeployCommands.DeleteCommand(),
        DeployCommands.TransitionCommand("stop", "Stop a deploy (from deploying or running)."),
        DeployCommands.TransitionCommand("start", "Start a stopped deploy."),
        DeployCommands.ScaleCommand(),
        LookupCommand.Create(),
        WorkersCommand.Create(),
        GenerateCommand.Create(),
    ];
}
