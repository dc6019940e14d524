namespace LoraDeploy.Lora.Merge;

/// <summary>A merge was refused or failed; the message names the file, tensor or field at fault. No output is left behind.</summary>
public sealed class LoraMergeException : Exception
{
    public LoraMergeException(string message)
        : base(message)
    {
    }

    public LoraMergeException(string message, Exception inner)
        : base(message, inner)
    {
    }
}
