using LoraDeploy.Cli;

var command = LoraDeployCli.Create().Parse(args);
if (command.Errors.Count > 0)
{
    // A usage error is one readable line and exit code 2, like every other usage error of ours.
    foreach (var error in command.Errors)
    {
        await Console.Error.WriteLineAsync($"error: {error.Message}");
    }
    return 2;
}
return await command.InvokeAsync();
