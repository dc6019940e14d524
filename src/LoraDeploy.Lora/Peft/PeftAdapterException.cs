namespace LoraDeploy.Lora.Peft;

/// <summary>
/// A PEFT adapter that cannot be converted for (or used with) a llama.cpp base model: a bad adapter_config.json,
/// a malformed or truncated adapter_model.safetensors, a feature llama.cpp's runtime adapters lack, or a mismatch with
/// the base model. The message is a sentence a person can act on; it names the field, tensor or module and both sides
/// of a mismatch.
/// </summary>
public sealed class PeftAdapterException : Exception
{
    public PeftAdapterException(string message) : base(message)
    {
    }

    public PeftAdapterException(string message, Exception innerException) : base(message, innerException)
    {
    }
}
