using System.Buffers.Binary;
using LoraDeploy.Lora.Gguf;

namespace LoraDeploy.Lora.Tests.Gguf;

public sealed class GgufWriterTests
{
    [Fact]
    public void Tensor_data_starts_aligned_and_offsets_are_the_running_padded_sum()
    {
        var stream = new MemoryStream();
        new GgufWriter()
            .Add("general.architecture", "llama")
            .AddTensor("a", [3], [1f, 2f, 3f])      // 12 bytes → padded to 32
            .AddTensor("b", [2], [4f, 5f])
            .WriteTo(stream);
        var bytes = stream.ToArray();

        Assert.Equal("GGUF"u8.ToArray(), bytes[..4]);
        Assert.Equal(3u, BinaryPrimitives.ReadUInt32LittleEndian(bytes.AsSpan(4)));
        Assert.Equal(2ul, BinaryPrimitives.ReadUInt64LittleEndian(bytes.AsSpan(8)));
        // The data section is the last 32 + 32 bytes: a at its start, b 32 bytes later.
        var data = bytes.Length - 64;
        Assert.Equal(0, data % 32);
        Assert.Equal(1f, BinaryPrimitives.ReadSingleLittleEndian(bytes.AsSpan(data)));
        Assert.Equal(4f, BinaryPrimitives.ReadSingleLittleEndian(bytes.AsSpan(data + 32)));
    }

    [Fact]
    public void A_tensor_callback_that_writes_the_wrong_amount_is_refused()
    {
        var writer = new GgufWriter().AddTensor("t", GgmlType.F32, [4], s => s.Write(new byte[12]));
        var error = Assert.Throws<InvalidOperationException>(() => writer.WriteTo(new MemoryStream()));
        Assert.Contains("wrote 12 bytes", error.Message);
    }

    [Fact]
    public void Values_as_read_are_written_back_unchanged_for_every_type()
    {
        var original = new MemoryStream();
        new GgufWriter()
            .Add("u32", 7u).Add("i32", -7).Add("f32", 1.5f).Add("bool", true).Add("u64", ulong.MaxValue).Add("s", "text")
            .Add("strings", ["a", "bé"]).Add("floats", [0.25f, -2f]).Add("ints", [-1, 2]).Add("uints", [3u])
            .WriteTo(original);
        var read = GgufReader.Read(original);
        var scalars = new (string Key, GgufValueType Type, object Value)[]
        {
            ("u8", GgufValueType.UInt8, (byte)200), ("i8", GgufValueType.Int8, (sbyte)-100), ("u16", GgufValueType.UInt16, (ushort)60000),
            ("i16", GgufValueType.Int16, (short)-30000), ("i64", GgufValueType.Int64, long.MinValue), ("f64", GgufValueType.Float64, Math.PI),
            ("u8s", GgufValueType.Array, new GgufArray(GgufValueType.UInt8, 2, new byte[] { 1, 255 })),
            ("f64s", GgufValueType.Array, new GgufArray(GgufValueType.Float64, 1, new[] { -0.5 })),
            ("bools", GgufValueType.Array, new GgufArray(GgufValueType.Bool, 2, new[] { true, false })),
        };
        var copy = new GgufWriter();
        foreach (var (key, value) in read.Metadata)
        {
            copy.Add(key, value);
        }
        foreach (var (key, type, value) in scalars)
        {
            copy.Add(key, new GgufValue(type, value));
        }
        var written = new MemoryStream();
        copy.WriteTo(written);

        var again = GgufReader.Read(written);
        Assert.Equal(read.Metadata.Count + scalars.Length, again.Metadata.Count);
        foreach (var (key, value) in read.Metadata.Concat(scalars.Select(s => KeyValuePair.Create(s.Key, new GgufValue(s.Type, s.Value)))))
        {
            Assert.Equal(value.Type, again.Metadata[key].Type);
            Assert.Equal(Items(value), Items(again.Metadata[key]));
        }

        static object[] Items(GgufValue value) => value.Value is GgufArray array ? [array.ElementType, .. array.Items!.Cast<object>()] : [value.Value];
    }

    [Fact]
    public void An_array_whose_elements_were_skipped_cannot_be_written()
    {
        var stream = new MemoryStream();
        new GgufWriter().Add("big", [1u, 2u, 3u]).WriteTo(stream);
        var skipped = GgufReader.Read(stream, maxArrayElementsKept: 2).Metadata["big"];

        var error = Assert.Throws<ArgumentException>(() => new GgufWriter().Add("big", skipped));
        Assert.Contains("'big' is an array of 3 UInt32 whose elements were not kept", error.Message);
    }

    [Fact]
    public void A_tensor_of_any_type_is_declared_with_its_byte_count()
    {
        var stream = new MemoryStream();
        new GgufWriter().AddTensor("q", 8u, [32, 2], 68, s => s.Write(new byte[68])).WriteTo(stream);

        var tensor = Assert.Single(GgufReader.Read(stream).Tensors);
        Assert.Equal(("Q8_0", 68L), (tensor.TypeName, tensor.ByteLength));
    }

    [Fact]
    public void Names_longer_than_ggml_allows_and_duplicates_are_refused()
    {
        Assert.Throws<ArgumentException>(() => new GgufWriter().AddTensor(new string('x', 64), [1], [0f]));
        Assert.Throws<ArgumentException>(() => new GgufWriter().AddTensor("t", [1], [0f]).AddTensor("t", [1], [0f]));
        Assert.Throws<ArgumentException>(() => new GgufWriter().Add("k", 1u).Add("k", "again"));
    }
}

public sealed class LlamaRopePermutationTests
{
    [Fact]
    public void Rows_of_each_head_interleave_its_two_halves()
    {
        // 2 heads of 4 rows: head rows [0 1 2 3] → [0 2 1 3]; [4 5 6 7] → [4 6 5 7].
        byte[] rows = [0, 1, 2, 3, 4, 5, 6, 7];
        Assert.Equal(new byte[] { 0, 2, 1, 3, 4, 6, 5, 7 }, LlamaRopePermutation.PermuteRows(rows, rows: 8, heads: 2));
        // One head of 8: halves [0 1 2 3] and [4 5 6 7] interleave.
        Assert.Equal(new byte[] { 0, 4, 1, 5, 2, 6, 3, 7 }, LlamaRopePermutation.PermuteRows(rows, rows: 8, heads: 1));
    }

    [Fact]
    public void Whole_rows_move_together()
    {
        byte[] matrix = [0, 0, 1, 1, 2, 2, 3, 3];
        Assert.Equal(new byte[] { 0, 0, 2, 2, 1, 1, 3, 3 }, LlamaRopePermutation.PermuteRows(matrix, rows: 4, heads: 1));
    }

    [Fact]
    public void Rows_that_do_not_split_into_even_heads_are_refused() =>
        Assert.Throws<ArgumentException>(() => LlamaRopePermutation.PermuteRows(new byte[6], rows: 6, heads: 2));
}
