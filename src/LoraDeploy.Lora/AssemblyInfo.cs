using System.Runtime.CompilerServices;

[assembly: InternalsVisibleTo("LoraDeploy.Lora.Tests")]
