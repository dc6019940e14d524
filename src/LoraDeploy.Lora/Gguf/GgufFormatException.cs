namespace LoraDeploy.Lora.Gguf;

/// <summary>
/// The only exception <see cref="GgufReader"/> throws for bad input: the bytes are not a GGUF file llama.cpp would
/// read. The message names the first rule that failed.
/// </summary>
public sealed class GgufFormatException : Exception
{
    public GgufFormatException(string message) : base(message)
    {
    }

    public GgufFormatException(string message, Exception innerException) : base(message, innerException)
    {
    }
}
