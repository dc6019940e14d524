namespace LoraDeploy.Lora.Gguf;

/// <summary>
/// The row permutation llama.cpp's HF → GGUF conversion applies to W_q and W_k of Llama-family models: Hugging Face's
/// Llama rotates halves (rotate_half RoPE) while llama.cpp's <c>llama</c> arch rotates adjacent pairs, so inside each
/// head the first and second halves of the rows are interleaved. A LoRA's <c>lora_b</c> (rows = output features) must
/// get the same permutation as the base weight it patches; <c>lora_a</c> is untouched.
/// </summary>
public static class LlamaRopePermutation
{
    /// <summary>
    /// Source row for destination row <paramref name="row"/>: new row <c>h·hd + 2i + j</c> takes old row
    /// <c>h·hd + j·hd/2 + i</c> (h &lt; heads, i &lt; hd/2, j ∈ {0,1}).
    /// </summary>
    public static int SourceRow(int row, int rows, int heads)
    {
        var headDim = rows / heads;
        var half = headDim / 2;
        var head = row / headDim;
        var within = row % headDim;
        var i = within / 2;
        var j = within % 2;
        return head * headDim + j * half + i;
    }

    /// <summary>True when the rows can be split into <paramref name="heads"/> heads of an even size.</summary>
    public static bool CanPermute(long rows, int heads) =>
        heads > 0 && rows % heads == 0 && rows / heads % 2 == 0;

    /// <summary>Permutes whole rows of a row-major matrix of <paramref name="rows"/> rows of <paramref name="rowBytes"/> bytes.</summary>
    public static byte[] PermuteRows(ReadOnlySpan<byte> matrix, int rows, int heads)
    {
        if (!CanPermute(rows, heads))
        {
            throw new ArgumentException($"{rows} rows do not split into {heads} heads of an even size");
        }
        if (matrix.Length % rows != 0)
        {
            throw new ArgumentException($"{matrix.Length} bytes are not {rows} equal rows");
        }
        var rowBytes = matrix.Length / rows;
        var result = new byte[matrix.Length];
        for (var row = 0; row < rows; row++)
        {
            matrix.Slice(SourceRow(row, rows, heads) * rowBytes, rowBytes).CopyTo(result.AsSpan(row * rowBytes, rowBytes));
        }
        return result;
    }
}
