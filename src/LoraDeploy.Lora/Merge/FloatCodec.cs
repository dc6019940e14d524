using System.Buffers.Binary;

namespace LoraDeploy.Lora.Merge;

/// <summary>Little-endian F32/F16/BF16 ⇄ float, rounding to nearest, ties to even, when narrowing.</summary>
internal static class FloatCodec
{
    public static bool IsSupported(string dtype) => dtype is "F32" or "F16" or "BF16";

    public static int ElementSize(string dtype) => dtype == "F32" ? 4 : 2;

    public static void Decode(ReadOnlySpan<byte> source, string dtype, Span<float> destination)
    {
        switch (dtype)
        {
            case "F32":
                for (var i = 0; i < destination.Length; i++)
                {
                    destination[i] = BinaryPrimitives.ReadSingleLittleEndian(source[(i * 4)..]);
                }
                break;
            case "F16":
                for (var i = 0; i < destination.Length; i++)
                {
                    destination[i] = (float)BinaryPrimitives.ReadHalfLittleEndian(source[(i * 2)..]);
                }
                break;
            case "BF16":
                for (var i = 0; i < destination.Length; i++)
                {
                    // BF16 is the upper half of an F32.
                    destination[i] = BitConverter.UInt32BitsToSingle((uint)BinaryPrimitives.ReadUInt16LittleEndian(source[(i * 2)..]) << 16);
                }
                break;
            default:
                throw new ArgumentException($"dtype {dtype} is not F32, F16 or BF16", nameof(dtype));
        }
    }

    /// <summary>Encodes <paramref name="source"/>; returns the index of the first finite value that became infinite (overflow), or -1.</summary>
    public static long Encode(ReadOnlySpan<float> source, string dtype, Span<byte> destination)
    {
        long overflow = -1;
        switch (dtype)
        {
            case "F32":
                for (var i = 0; i < source.Length; i++)
                {
                    BinaryPrimitives.WriteSingleLittleEndian(destination[(i * 4)..], source[i]);
                }
                break;
            case "F16":
                for (var i = 0; i < source.Length; i++)
                {
                    // .NET's float → Half conversion rounds to nearest even (and to ±Inf past 65504 + half an ulp).
                    var half = (Half)source[i];
                    if (overflow < 0 && Half.IsInfinity(half) && float.IsFinite(source[i]))
                    {
                        overflow = i;
                    }
                    BinaryPrimitives.WriteHalfLittleEndian(destination[(i * 2)..], half);
                }
                break;
            case "BF16":
                for (var i = 0; i < source.Length; i++)
                {
                    var bits = ToBFloat16Bits(source[i]);
                    if (overflow < 0 && (bits & 0x7FFF) == 0x7F80 && float.IsFinite(source[i]))
                    {
                        overflow = i;
                    }
                    BinaryPrimitives.WriteUInt16LittleEndian(destination[(i * 2)..], bits);
                }
                break;
            default:
                throw new ArgumentException($"dtype {dtype} is not F32, F16 or BF16", nameof(dtype));
        }
        return overflow;
    }

    /// <summary>The BF16 nearest to <paramref name="value"/>, ties to even; NaN stays a (quiet) NaN.</summary>
    public static ushort ToBFloat16Bits(float value)
    {
        var bits = BitConverter.SingleToUInt32Bits(value);
        if (float.IsNaN(value))
        {
            return (ushort)((bits >> 16) | 0x0040);
        }
        // Adding 0x7FFF rounds up past the halfway point; adding the kept LSB too breaks exact ties toward even.
        bits += 0x7FFFu + ((bits >> 16) & 1u);
        return (ushort)(bits >> 16);
    }
}
