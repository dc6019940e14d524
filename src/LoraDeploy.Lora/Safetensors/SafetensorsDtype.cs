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

    // Maps the raw UTF-8 name to an interned string so that a 2,000-tensor header does not
    // allocate 2,000 copies of "F16".
    internal static string? Intern(ReadOnlySpan<byte> utf8) => utf8 switch
    {
        _ when utf8.SequenceEqual("F16"u8) => "F16",
        _ when utf8.SequenceEqual("BF16"u8) => "BF16",
        _ when utf8.SequenceEqual("F32"u8) => "F32",
        _ when utf8.SequenceEqual("F64"u8) => "F64",
        _ when utf8.SequenceEqual("BOOL"u8) => "BOOL",
        _ when utf8.SequenceEqual("U8"u8) => "U8",
        _ when utf8.SequenceEqual("I8"u8) => "I8",
        _ when utf8.SequenceEqual("F8_E5M2"u8) => "F8_E5M2",
        _ when utf8.SequenceEqual("F8_E4M3"u8) => "F8_E4M3",
        _ when utf8.SequenceEqual("F8_E8M0"u8) => "F8_E8M0",
        _ when utf8.SequenceEqual("F8_E4M3FNUZ"u8) => "F8_E4M3FNUZ",
        _ when utf8.SequenceEqual("F8_E5M2FNUZ"u8) => "F8_E5M2FNUZ",
        _ when utf8.SequenceEqual("F4"u8) => "F4",
        _ when utf8.SequenceEqual("F6_E2M3"u8) => "F6_E2M3",
        _ when utf8.SequenceEqual("F6_E3M2"u8) => "F6_E3M2",
        _ when utf8.SequenceEqual("I16"u8) => "I16",
        _ when utf8.SequenceEqual("U16"u8) => "U16",
        _ when utf8.SequenceEqual("I32"u8) => "I32",
        _ when utf8.SequenceEqual("U32"u8) => "U32",
        _ when utf8.SequenceEqual("C64"u8) => "C64",
        _ when utf8.SequenceEqual("I64"u8) => "I64",
        _ when utf8.SequenceEqual("U64"u8) => "U64",
        _ => null,
    };
}
