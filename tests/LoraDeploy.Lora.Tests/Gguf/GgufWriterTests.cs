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
