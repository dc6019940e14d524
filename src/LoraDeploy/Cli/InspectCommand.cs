using System.CommandLine;

namespace LoraDeploy.Cli;

/// <summary><c>loradeploy inspect FILE [--json]</c>: probe a local adapter file.</summary>
internal static class InspectCommand
{
    public static Command Create() => new("inspect", "Probe a local .safetensors adapter (placeholder).");
}
