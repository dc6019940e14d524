namespace LoraDeploy.Lora.Safetensors;

/// <summary>
/// The only exception <see cref="SafetensorsReader"/> throws for bad input: the bytes are not a
/// well-formed safetensors file. The message names the first rule that failed.
/// </summary>
public sealed class SafetensorsFormatException : Exception
{
    /// <summary>Creates the exception with a specific, user-facing message.</summary>
    public SafetensorsFormatException(string message) : base(message)
    {
    }

    /// <summary>Creates the exception wrapping the parser error that caused it.</summary>
    public SafetensorsFormatException(string message, Exception innerException) : base(message, innerException)
    {
    }
}
