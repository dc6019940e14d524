using System.CommandLine;

namespace LoraDeploy.Cli;

/// <summary>The one <c>loradeploy</c> executable: the server, admin commands, and the API client.</summary>
internal static class LoraDeployCli
{
    public static RootCommand Create()
    {
        var root = new RootCommand("LoraDeploy: deploy CivitAI LoRA adapters behind DeepInfra's API.");
        root.Subcommands.Add(ServeCommand.Create());
        root.Subcommands.Add(WorkerCommand.Create());
        root.Subcommands.Add(TokenCommand.Create());
        root.Subcommands.Add(InspectCommand.Create());
        root.Subcommands.Add(MergeCommand.Create());
        root.Subcommands.Add(ConvertCommand.Create());
        foreach (var command in ClientCommands.Create())
        {
            root.Subcommands.Add(command);
        }
        return root;
    }
}
