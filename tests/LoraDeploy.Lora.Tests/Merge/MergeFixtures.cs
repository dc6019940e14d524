using System.Buffers.Binary;
using LoraDeploy.Lora.Safetensors;
using LoraDeploy.Lora.Tests.Support;

namespace LoraDeploy.Lora.Tests.Merge;

/// <summary>A tensor for a merge test: its values are F32-representable doubles, so files and reference agree exactly.</summary>
internal sealed record TestTensor(string Name, long[] Shape, double[] Values)
{
    public long Count => Values.LongLength;

    public double this[params long[] index]
    {
        get
        {
            long flat = 0;
            for (var d = 0; d < Shape.Length; d++)
            {
                flat = flat * Shape[d] + index[d];
            }
            return Values[flat];
        }
    }
}

/// <summary>Random tensors, adapter/base files, and an independent reader of the merged output.</summary>
internal static class MergeFixtures
{
    public static TestTensor Random(Random random, string name, long[] shape, double amplitude = 1.0)
    {
        long count = 1;
        foreach (var dim in shape)
        {
            count *= dim;
        }
        var values = new double[count];
        for (var i = 0; i < count; i++)
        {
            values[i] = (float)((random.NextDouble() * 2 - 1) * amplitude);
        }
        return new TestTensor(name, shape, values);
    }

    public static TestTensor Scalar(string name, double value) => new(name, [], [(float)value]);

    public static byte[] Encode(double[] values, string dtype)
    {
        var size = dtype == "F32" ? 4 : 2;
        var bytes = new byte[values.Length * size];
        for (var i = 0; i < values.Length; i++)
        {
            switch (dtype)
            {
                case "F32":
                    BinaryPrimitives.WriteSingleLittleEndian(bytes.AsSpan(i * 4), (float)values[i]);
                    break;
                case "F16":
                    BinaryPrimitives.WriteHalfLittleEndian(bytes.AsSpan(i * 2), (Half)values[i]);
                    break;
                default:
                    // Test inputs are chosen exactly representable; truncation is exact then.
                    BinaryPrimitives.WriteUInt16LittleEndian(bytes.AsSpan(i * 2), (ushort)(BitConverter.SingleToUInt32Bits((float)values[i]) >> 16));
                    break;
            }
        }
        return bytes;
    }

    /// <summary>Rounds values to what <paramref name="dtype"/> holds exactly (BF16 by truncation), so a file of that dtype stores them unchanged.</summary>
    public static TestTensor Representable(TestTensor tensor, string dtype) => tensor with
    {
        Values = dtype switch
        {
            "F16" => Array.ConvertAll(tensor.Values, v => (double)(Half)v),
            "BF16" => Array.ConvertAll(tensor.Values, v => (double)BitConverter.UInt32BitsToSingle(BitConverter.SingleToUInt32Bits((float)v) & 0xFFFF0000u)),
            _ => tensor.Values,
        },
    };

    public static string Write(string path, IEnumerable<TestTensor> tensors, string dtype = "F32", IReadOnlyDictionary<string, string>? metadata = null)
    {
        var writer = new SafetensorsWriter();
        foreach (var (key, value) in metadata ?? new Dictionary<string, string>())
        {
            writer.Metadata(key, value);
        }
        foreach (var tensor in tensors)
        {
            writer.Tensor(tensor.Name, dtype, tensor.Shape, Encode(tensor.Values, dtype));
        }
        return writer.WriteTo(path);
    }

    /// <summary>Reads every tensor of a safetensors file as doubles, decoding F32/F16/BF16 here (not with the library's codec).</summary>
    public static Dictionary<string, (string Dtype, long[] Shape, double[] Values, byte[] Bytes)> Read(string path, out IReadOnlyDictionary<string, string> metadata)
    {
        using var header = SafetensorsReader.ReadFile(path);
        metadata = header.Metadata;
        using var file = File.OpenRead(path);
        var result = new Dictionary<string, (string, long[], double[], byte[])>(StringComparer.Ordinal);
        foreach (var tensor in header.Tensors)
        {
            var bytes = new byte[tensor.ByteLength];
            header.ReadTensor(file, tensor.Name, bytes);
            var values = tensor.Dtype switch
            {
                "F32" => Enumerable.Range(0, bytes.Length / 4).Select(i => (double)BinaryPrimitives.ReadSingleLittleEndian(bytes.AsSpan(i * 4))).ToArray(),
                "F16" => Enumerable.Range(0, bytes.Length / 2).Select(i => (double)BinaryPrimitives.ReadHalfLittleEndian(bytes.AsSpan(i * 2))).ToArray(),
                "BF16" => Enumerable.Range(0, bytes.Length / 2).Select(i => (double)BitConverter.UInt32BitsToSingle((uint)BinaryPrimitives.ReadUInt16LittleEndian(bytes.AsSpan(i * 2)) << 16)).ToArray(),
                _ => [],
            };
            result[tensor.Name] = (tensor.Dtype, tensor.Shape, values, bytes);
        }
        return result;
    }

    /// <summary>
    /// The tolerance: max abs diff ≤ 1e-6 relative, i.e. every element within 1e-6 of the tensor's largest
    /// reference value. Not per element: a LoRA's ΔW is accumulated in F32, so where W and c·ΔW nearly cancel, the
    /// result carries F32 rounding of the terms (~1e-7 of their size), which is large relative to the small result.
    /// </summary>
    public static void AssertClose(double[] expected, double[] actual, string what)
    {
        Assert.Equal(expected.Length, actual.Length);
        var largest = expected.Max(Math.Abs);
        double worst = 0;
        var worstIndex = -1;
        for (var i = 0; i < expected.Length; i++)
        {
            var relative = Math.Abs(actual[i] - expected[i]) / largest;
            if (relative > worst)
            {
                (worst, worstIndex) = (relative, i);
            }
        }
        Assert.True(worst <= 1e-6, $"{what}: element {worstIndex} is {(worstIndex < 0 ? 0 : actual[worstIndex])}, reference {(worstIndex < 0 ? 0 : expected[worstIndex])} (relative error {worst:E2})");
    }
}
