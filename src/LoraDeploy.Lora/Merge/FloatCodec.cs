using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace LoraDeploy.Lora.Merge;

/// <summary>Little-endian F32/F16/BF16 ⇄ float, rounding to nearest, ties to even, when narrowing.</summary>
internal static class FloatCodec
{
    public static bool IsSupported(string dtype) => dtype is "F32" or "F16" or "BF16";

    public static int ElementSize(string dtype) => dtype == "F32" ? 4 : 2;

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Decode(ReadOnlySpan<byte> source, string dtype, Span<float> destination)
    {
        switch (dtype)
        {
            case "F32" when BitConverter.IsLittleEndian:
                MemoryMarshal.Cast<byte, float>(source)[..destination.Length].CopyTo(destination);
                break;
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
                var done = 0;
                if (BitConverter.IsLittleEndian && Vector256.IsHardwareAccelerated)
                {
                    // BF16 is the upper half of an F32: widen 16 of them at a time and shift into place.
                    var halves = MemoryMarshal.Cast<byte, ushort>(source);
                    var floats = MemoryMarshal.Cast<float, uint>(destination);
                    for (; done <= destination.Length - 16; done += 16)
                    {
                        var (low, high) = Vector256.Widen(Vector256.Create<ushort>(halves.Slice(done, 16)));
                        Vector256.ShiftLeft(low, 16).CopyTo(floats.Slice(done, 8));
                        Vector256.ShiftLeft(high, 16).CopyTo(floats.Slice(done + 8, 8));
                    }
                }
                for (var i = done; i < destination.Length; i++)
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
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static long Encode(ReadOnlySpan<float> source, string dtype, Span<byte> destination)
    {
        long overflow = -1;
        switch (dtype)
        {
            case "F32" when BitConverter.IsLittleEndian:
                source.CopyTo(MemoryMarshal.Cast<byte, float>(destination));
                break;
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
                var start = 0;
                if (BitConverter.IsLittleEndian && Vector256.IsHardwareAccelerated)
                {
                    start = EncodeBFloat16Vectors(source, MemoryMarshal.Cast<byte, ushort>(destination));
                }
                for (var i = start; i < source.Length; i++)
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

    /// <summary>The index of the first NaN or ±Inf in <paramref name="values"/>, or -1.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static int IndexOfNonFinite(ReadOnlySpan<float> values)
    {
        var bits = MemoryMarshal.Cast<float, uint>(values);
        var exponentMask = Vector256.Create(0x7F800000u);
        var i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            for (; i <= bits.Length - 8; i += 8)
            {
                if (Vector256.EqualsAny(Vector256.Create<uint>(bits.Slice(i, 8)) & exponentMask, exponentMask))
                {
                    break;
                }
            }
        }
        for (; i < values.Length; i++)
        {
            if (!float.IsFinite(values[i]))
            {
                return i;
            }
        }
        return -1;
    }

    /// <summary>
    /// <see cref="ToBFloat16Bits"/> 16 values at a time, for as many whole groups of 16 as there are; a group with a NaN
    /// or an overflow is left to the scalar loop (returns where it stopped), so both give the same bits.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static int EncodeBFloat16Vectors(ReadOnlySpan<float> source, Span<ushort> destination)
    {
        var bits = MemoryMarshal.Cast<float, uint>(source);
        var one = Vector256.Create(1u);
        var roundingBias = Vector256.Create(0x7FFFu);
        var exponentMask = Vector256.Create(0x7F800000u);
        var i = 0;
        for (; i <= source.Length - 16; i += 16)
        {
            var a = Vector256.Create<uint>(bits.Slice(i, 8));
            var b = Vector256.Create<uint>(bits.Slice(i + 8, 8));
            // NaN or Inf (all exponent bits set) in the group: the scalar loop handles it and reports overflow.
            if (Vector256.EqualsAny(a & exponentMask, exponentMask) || Vector256.EqualsAny(b & exponentMask, exponentMask))
            {
                return i;
            }
            var ra = Vector256.ShiftRightLogical(a + roundingBias + (Vector256.ShiftRightLogical(a, 16) & one), 16);
            var rb = Vector256.ShiftRightLogical(b + roundingBias + (Vector256.ShiftRightLogical(b, 16) & one), 16);
            // A finite value that rounds up to the exponent's all-ones is an overflow to ±Inf: the scalar loop reports it.
            if (Vector256.EqualsAny(ra & Vector256.Create(0x7F80u), Vector256.Create(0x7F80u)) || Vector256.EqualsAny(rb & Vector256.Create(0x7F80u), Vector256.Create(0x7F80u)))
            {
                return i;
            }
            Vector256.Narrow(ra, rb).CopyTo(destination.Slice(i, 16));
        }
        return i;
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
