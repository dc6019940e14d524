namespace LoraDeploy.Lora;

internal static class Placeholder;
