namespace LoraDeploy.Lora.Safetensors;

/// <summary>One tensor entry of a safetensors header.</summary>
/// <param name="Name">Tensor name (the JSON key).</param>
/// <param name="Dtype">Element type name as written in the file, e.g. <c>F16</c>.</param>
/// <param name="Shape">Dimensions, row-major; empty for a scalar.</param>
/// <param name="DataStart">First byte, relative to the start of the data section.</param>
/// <param name="DataEnd">One past the last byte, relative to the start of the data section.</param>
public sealed record SafetensorsTensor(string Name, string Dtype, long[] Shape, long DataStart, long DataEnd)
{
    /// <summary>Byte length of the tensor's data.</summary>
    public long ByteLength => DataEnd - DataStart;

    /// <summary>Number of elements (product of <see cref="Shape"/>; 1 for a scalar).</summary>
    public long ElementCount => CountElements(Shape);

    internal static long CountElements(ReadOnlySpan<long> shape)
    {
        long count = 1;
        foreach (var dim in shape)
        {
            count *= dim;
        }
        return count;
    }
}
