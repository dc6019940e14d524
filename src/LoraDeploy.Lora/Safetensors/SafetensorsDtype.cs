namespace LoraDeploy.Lora.Safetensors;

/// <summary>Element types of the safetensors format (the reference crate's <c>Dtype</c> enum).</summary>
public static class SafetensorsDtype
{
    /// <summary>Returns the size in bits of one element of <paramref name="dtype"/>, or 0 if the name is unknown.</summary>
    public static int BitSize(string dtype) => dtype switch
    {
        "BOOL" or "U8" or "I8" or "F8_E5M2" or "F8_E4M3" or "F8_E8M0" or "F8_E4M3FNUZ" or "F8_E5M2FNUZ" => 8,
        "F4" => 4,
        "F6_E2M3" or "F6_E3M2" => 6,
        "I16" or "U16" or "F16" or "BF16" => 16,
        "I32" or "U32" or "F32" => 32,
        "C64" or "F64" or "I64" or "U64" => 64,
        _ => 0,
    };

    /// <summary>The names, indexed by the code the reader keeps per tensor (the most common first).</summary>
    internal static readonly string[] Names =
    [
        "F16", "BF16", "F32", "F64", "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
        "F4", "F6_E2M3", "F6_E3M2", "I16", "U16", "I32", "U32", "C64", "I64", "U64",
    ];

    /// <summary><see cref="BitSize"/> of each of <see cref="Names"/>, by code (no string switch per tensor).</summary>
    internal static readonly byte[] BitSizes = [.. Names.Select(name => (byte)BitSize(name))];

    /// <summary>The code of a dtype name given as UTF-8, or false if the name is unknown.</summary>
    internal static bool TryGetCode(ReadOnlySpan<byte> utf8, out byte code)
    {
        // Compared as bytes so that a 2,000-tensor header makes no string for its dtypes.
        for (var i = 0; i < Names.Length; i++)
        {
            if (System.Text.Ascii.Equals(utf8, Names[i]))
            {
                code = (byte)i;
                return true;
            }
        }
        code = 0;
        return false;
    }

    /// <summary>The code of a dtype name, or false if the name is unknown.</summary>
    internal static bool TryGetCode(ReadOnlySpan<char> name, out byte code)
    {
        for (var i = 0; i < Names.Length; i++)
        {
            if (name.SequenceEqual(Names[i]))
            {
                code = (byte)i;
                return true;
            }
        }
        code = 0;
        return false;
    }
}
