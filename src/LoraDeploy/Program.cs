using LoraDeploy.Cli;

return await LoraDeployCli.Create().Parse(args).InvokeAsync();
