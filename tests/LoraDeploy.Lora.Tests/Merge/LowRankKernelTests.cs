using LoraDeploy.Lora.Merge;

namespace LoraDeploy.Lora.Tests.Merge;

/// <summary>
/// The blocked low-rank kernel (<see cref="LowRankDelta.AddTo"/>) gives the very bits of the plain row loop
/// (<see cref="LowRankDelta.Row"/> then w + c·ΔW rounded to float), on shapes with row and column remainders.
/// </summary>
public sealed class LowRankKernelTests
{
    [Theory]
    [InlineData(4, 8, 1)]
    [InlineData(13, 37, 5)]
    [InlineData(64, 200, 32)]
    [InlineData(3, 5, 2)]
    public void The_blocked_kernel_equals_the_plain_loop_bit_for_bit(int rows, int rest, int rank)
    {
        var random = new Random(rows * 1000 + rest * 10 + rank);
        float Next() => (float)(random.NextDouble() * 2 - 1);
        var u = Enumerable.Range(0, rows * rank).Select(_ => Next()).ToArray();
        var v = Enumerable.Range(0, rank * rest).Select(_ => Next()).ToArray();
        var weights = Enumerable.Range(0, rows * rest + 3).Select(_ => Next()).ToArray();
        const double c = 0.37;
        var delta = new LowRankDelta(u, v, rank) { Out = rows, Rest = rest };
        Assert.SkipUnless(delta.HasBlockedPath, "this CPU has no 256-bit vectors, so the merge takes the plain loop");

        var expected = (float[])weights.Clone();
        var row = new double[rest];
        for (var o = 0; o < rows; o++)
        {
            delta.Row(o, row);
            for (var j = 0; j < rest; j++)
            {
                expected[3 + o * rest + j] = (float)(expected[3 + o * rest + j] + c * row[j]);
            }
        }
        var actual = (float[])weights.Clone();
        delta.AddTo(actual, offset: 3, c);

        Assert.Equal(expected.Select(BitConverter.SingleToInt32Bits), actual.Select(BitConverter.SingleToInt32Bits));
    }
}
