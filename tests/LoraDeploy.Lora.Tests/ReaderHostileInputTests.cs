using System.Buffers.Binary;
using System.Text;
using LoraDeploy.Lora.Safetensors;
using LoraDeploy.Lora.Tests.Support;

namespace LoraDeploy.Lora.Tests;

/// <summary>One test per reader check (reference §1.2 plus duplicate keys), each asserting the message.</summary>
public sealed class ReaderHostileInputTests
{
    private static byte[] File(string headerJson, long dataLength = 0) => SafetensorsWriter.RawFile(headerJson, dataLength);

    private static string Reject(byte[] bytes) =>
        Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.Read(new MemoryStream(bytes))).Message;

    private static string Reject(string headerJson, long dataLength = 0) => Reject(File(headerJson, dataLength));

    private static SafetensorsHeader Accept(string headerJson, long dataLength = 0) =>
        SafetensorsReader.Read(new MemoryStream(File(headerJson, dataLength)));

    private static string T(string dtype, string shape, long begin, long end) =>
        $$"""{"dtype":"{{dtype}}","shape":{{shape}},"data_offsets":[{{begin}},{{end}}]}""";

    [Fact]
    public void Valid_file_reads_tensors_metadata_and_layout()
    {
        var header = Accept($$"""{"__metadata__":{"format":"pt"},"b":{{T("F16", "[2,3]", 0, 12)}},"a":{{T("F32", "[]", 12, 16)}}}""", 16);

        Assert.Equal(["b", "a"], header.Tensors.Select(t => t.Name));
        Assert.Equal([2L, 3L], header.Tensors[0].Shape);
        Assert.Equal("pt", header.Metadata["format"]);
        Assert.Equal(8 + header.HeaderLength, header.DataOffset);
        Assert.Equal(16, header.DataLength);
    }

    [Fact]
    public void Tensor_data_is_readable_on_demand_and_bounded()
    {
        var bytes = File($$"""{"a":{{T("U8", "[2]", 0, 2)}},"b":{{T("U8", "[3]", 2, 5)}}}""", 5);
        new byte[] { 1, 2, 3, 4, 5 }.CopyTo(bytes, bytes.Length - 5);
        using var stream = new MemoryStream(bytes);
        var header = SafetensorsReader.Read(stream);

        using var b = header.OpenTensor(stream, "b");
        var buffer = new byte[10];
        Assert.Equal(3, b.Read(buffer));
        Assert.Equal([3, 4, 5], buffer[..3]);
        Assert.Equal(0, b.Read(buffer));
        var a = new byte[2];
        header.ReadTensor(stream, "a", a);
        Assert.Equal([1, 2], a);
        Assert.Throws<KeyNotFoundException>(() => header.OpenTensor(stream, "c"));
    }

    [Fact]
    public void Whitespace_around_the_object_and_empty_files_are_accepted()
    {
        Assert.Empty(Accept("  {}   ").Tensors);
        Assert.Single(Accept(" {\"a\":" + T("F16", "[0, 4]", 0, 0) + "} ").Tensors);
        Assert.Equal("F16", Accept("""{"a":{"dtype":"F\u0031\u0036","shape":[1],"data_offsets":[0,2],"extra":{"x":[1]}}}""", 2).Tensors[0].Dtype);
    }

    [Fact]
    public void File_shorter_than_eight_bytes() =>
        Assert.Equal("the file is 5 bytes; a safetensors file starts with an 8-byte header length", Reject(new byte[5]));

    [Fact]
    public void Header_length_two_to_the_sixty_third()
    {
        var bytes = new byte[64];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, 1UL << 63);
        Assert.Equal("header length 9223372036854775808 exceeds the limit of 100,000,000 bytes", Reject(bytes));
    }

    [Fact]
    public void Header_length_just_over_the_limit()
    {
        var bytes = new byte[64];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, 100_000_001);
        Assert.Contains("exceeds the limit", Reject(bytes), StringComparison.Ordinal);
    }

    [Fact]
    public void Header_length_past_the_end_of_the_file()
    {
        var bytes = File("{}");
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, 3);
        Assert.Equal("header length 3 runs past the end of the file (10 bytes)", Reject(bytes));
    }

    [Fact]
    public void Header_not_utf8()
    {
        var bytes = File("{\"xx\":1}");
        bytes[10] = 0xFF;
        Assert.Equal("the header is not valid UTF-8", Reject(bytes));
    }

    [Fact]
    public void Header_not_json() => Assert.StartsWith("the header is not valid JSON", Reject("{\"a\":"), StringComparison.Ordinal);

    [Fact]
    public void Header_not_an_object() => Assert.Equal("the header is not a JSON object", Reject("[1,2]"));

    [Fact]
    public void Header_with_trailing_json() => Assert.StartsWith("the header is not valid JSON", Reject("{} {}"), StringComparison.Ordinal);

    [Fact]
    public void Deeply_nested_json()
    {
        var json = "{\"a\":{\"dtype\":\"F16\",\"x\":" + new string('[', 100_000) + new string(']', 100_000) + "}}";
        Assert.StartsWith("the header is not valid JSON", Reject(json), StringComparison.Ordinal);
    }

    [Fact]
    public void Fifty_megabyte_header_of_one_string()
    {
        var json = "\"" + new string('a', 50_000_000) + "\"";
        Assert.Equal("the header is not a JSON object", Reject(json));
    }

    [Fact]
    public void Fifty_megabyte_tensor_name_is_truncated_in_the_message()
    {
        var message = Reject("{\"" + new string('a', 50_000_000) + "\":1}");
        Assert.StartsWith("tensor 'aaaa", message, StringComparison.Ordinal);
        Assert.True(message.Length < 300);
    }

    [Fact]
    public void Duplicate_tensor_names() =>
        Assert.Equal("duplicate tensor name 'a' in the header", Reject($$"""{"a":{{T("U8", "[1]", 0, 1)}},"a":{{T("U8", "[1]", 1, 2)}}}""", 2));

    [Fact]
    public void Duplicate_metadata() =>
        Assert.Equal("duplicate key '__metadata__' in the header", Reject("""{"__metadata__":{},"__metadata__":{}}"""));

    [Fact]
    public void Duplicate_metadata_key() =>
        Assert.Equal("duplicate key 'k' in '__metadata__'", Reject("""{"__metadata__":{"k":"1","k":"2"}}"""));

    [Fact]
    public void Metadata_value_not_a_string() =>
        Assert.Equal("'__metadata__' value for 'ss_network_dim' is a number; metadata values must be strings", Reject("""{"__metadata__":{"ss_network_dim":32}}"""));

    [Fact]
    public void Metadata_not_an_object() =>
        Assert.Equal("'__metadata__' must be an object of strings, not an array", Reject("""{"__metadata__":["a"]}"""));

    [Fact]
    public void Duplicate_tensor_field() =>
        Assert.Equal("tensor 'a' has a duplicate 'dtype' field", Reject("""{"a":{"dtype":"F16","dtype":"F32","shape":[],"data_offsets":[0,2]}}""", 2));

    [Fact]
    public void Tensor_not_an_object() => Assert.Equal("tensor 'a' must be a JSON object, not a number", Reject("""{"a":1}"""));

    [Fact]
    public void Missing_dtype() => Assert.Equal("tensor 'a' has no 'dtype'", Reject("""{"a":{"shape":[],"data_offsets":[0,2]}}""", 2));

    [Fact]
    public void Missing_shape() => Assert.Equal("tensor 'a' has no 'shape'", Reject("""{"a":{"dtype":"F16","data_offsets":[0,2]}}""", 2));

    [Fact]
    public void Missing_offsets() => Assert.Equal("tensor 'a' has no 'data_offsets'", Reject("""{"a":{"dtype":"F16","shape":[]}}"""));

    [Fact]
    public void Three_offsets() =>
        Assert.Equal("tensor 'a' has 3 data_offsets; expected [begin, end]", Reject("""{"a":{"dtype":"F16","shape":[],"data_offsets":[0,2,4]}}""", 2));

    [Fact]
    public void Unknown_dtype() => Assert.Equal("tensor 'a' has unknown dtype 'F17'", Reject($$"""{"a":{{T("F17", "[1]", 0, 2)}}}""", 2));

    [Fact]
    public void Dtype_not_a_string() =>
        Assert.Equal("tensor 'a' has a dtype that is a number, not a string", Reject("""{"a":{"dtype":16,"shape":[],"data_offsets":[0,2]}}""", 2));

    [Theory]
    [InlineData("[-1]")]
    [InlineData("[1.5]")]
    [InlineData("[1e2]")]
    [InlineData("[\"4\"]")]
    [InlineData("[null]")]
    public void Shape_entry_not_a_non_negative_integer(string shape) =>
        Assert.Equal("tensor 'a' has a 'shape' entry that is not a non-negative integer", Reject($$"""{"a":{{T("U8", shape, 0, 1)}}}""", 1));

    [Fact]
    public void Shape_nan_is_not_json() => Assert.StartsWith("the header is not valid JSON", Reject($$"""{"a":{{T("U8", "[NaN]", 0, 1)}}}""", 1), StringComparison.Ordinal);

    [Fact]
    public void Shape_not_an_array() =>
        Assert.Equal("tensor 'a' has a 'shape' that is a number, not an array", Reject($$"""{"a":{{T("U8", "4", 0, 4)}}}""", 4));

    [Fact]
    public void Shape_dimension_beyond_int64() =>
        Assert.Equal("tensor 'a' has a 'shape' entry 18446744073709551615 that is too large", Reject($$"""{"a":{{T("U8", "[18446744073709551615]", 0, 1)}}}""", 1));

    [Fact]
    public void Negative_offset() =>
        Assert.Equal("tensor 'a' has a 'data_offsets' entry that is not a non-negative integer", Reject($$"""{"a":{{T("U8", "[1]", -1, 0)}}}"""));

    [Fact]
    public void Element_count_overflow() =>
        Assert.Equal("tensor 'a' has shape [4294967296, 4294967296] whose element count overflows", Reject($$"""{"a":{{T("U8", "[4294967296,4294967296]", 0, 1)}}}""", 1));

    [Fact]
    public void Bit_size_overflow() =>
        Assert.Equal("tensor 'a' has shape [1152921504606846976] whose size in bits overflows", Reject($$"""{"a":{{T("F64", "[1152921504606846976]", 0, 1)}}}""", 1));

    [Fact]
    public void Sub_byte_dtype_not_ending_on_a_byte() =>
        Assert.Equal("tensor 'a' holds 12 bits of F4, which is not a whole number of bytes", Reject($$"""{"a":{{T("F4", "[3]", 0, 2)}}}""", 2));

    [Fact]
    public void Size_mismatch() =>
        Assert.Equal("tensor 'a' is F16 [2, 2] = 8 bytes but its data_offsets span 6 bytes", Reject($$"""{"a":{{T("F16", "[2,2]", 0, 6)}}}""", 6));

    [Fact]
    public void First_tensor_not_at_zero() =>
        Assert.Equal("tensor 'a' starts at byte 2; the data section must start with a tensor at byte 0", Reject($$"""{"a":{{T("U8", "[2]", 2, 4)}}}""", 4));

    [Fact]
    public void Gap_between_tensors() =>
        Assert.Equal("tensor 'b' starts at byte 3 but tensor 'a' ends at byte 2 (gap)", Reject($$"""{"a":{{T("U8", "[2]", 0, 2)}},"b":{{T("U8", "[1]", 3, 4)}}}""", 4));

    [Fact]
    public void Overlapping_tensors() =>
        Assert.Equal("tensor 'b' starts at byte 1 but tensor 'a' ends at byte 2 (overlap)", Reject($$"""{"b":{{T("U8", "[2]", 1, 3)}},"a":{{T("U8", "[2]", 0, 2)}}}""", 3));

    [Fact]
    public void End_before_begin() =>
        Assert.Equal("tensor 'b' ends at byte 1, before it starts at byte 2", Reject($$"""{"a":{{T("U8", "[2]", 0, 2)}},"b":{{T("U8", "[0]", 2, 1)}}}""", 2));

    [Fact]
    public void Tensor_ends_beyond_the_file() =>
        Assert.Equal("tensor 'a' ends at byte 8 but the file has 4 data bytes", Reject($$"""{"a":{{T("F16", "[4]", 0, 8)}}}""", 4));

    [Fact]
    public void Trailing_bytes_after_the_last_tensor() =>
        Assert.Equal("the file has 3 trailing bytes after the last tensor 'a' (ends at byte 2 of 5)", Reject($$"""{"a":{{T("F16", "[1]", 0, 2)}}}""", 5));

    [Fact]
    public void Data_without_tensors() =>
        Assert.Equal("the header lists no tensors but the file has 4 data bytes after it", Reject("{}", 4));

    [Fact]
    public void Pickle_renamed_to_safetensors()
    {
        // torch.save() output: pickle protocol 2 opcodes (\x80\x02) then a dict.
        var pickle = "\x80\x02}q\x00(X\x06\x00\x00\x00lora_Aq\x01ctorch._utils\n_rebuild_tensor_v2\n"u8.ToArray();
        Assert.Contains("exceeds the limit", Reject([.. pickle, .. new byte[256]]), StringComparison.Ordinal);
    }

    [Fact]
    public void Zip_renamed_to_safetensors()
    {
        // A .ckpt/.pt zip archive starts with a local file header "PK\x03\x04".
        var zip = "PK\x03\x04\x14\x00\x00\x00\x08\x00archive/data.pkl"u8.ToArray();
        Assert.Equal("header length 85966670672 exceeds the limit of 100,000,000 bytes", Reject([.. zip, .. new byte[256]]));
    }

    [Fact]
    public void Stream_must_be_seekable() =>
        Assert.Throws<ArgumentException>(() => SafetensorsReader.Read(new NonSeekableStream()));

    [Fact]
    public void Huge_sparse_file_reads_only_the_header()
    {
        var writer = new SafetensorsWriter().Tensor("big", "F32", [1L << 30, 4]);
        var (head, dataLength) = writer.BuildHead();
        var before = GC.GetAllocatedBytesForCurrentThread();

        var header = SafetensorsReader.Read(new HeadThenZerosStream(head, head.Length + dataLength));

        Assert.Equal(16L << 30, header.DataLength);
        Assert.True(GC.GetAllocatedBytesForCurrentThread() - before < 64 * 1024);
    }

    private sealed class NonSeekableStream : MemoryStream
    {
        public override bool CanSeek => false;
    }
}
