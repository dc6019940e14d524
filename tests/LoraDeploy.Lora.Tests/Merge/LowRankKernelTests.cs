using LoraDeploy.Lora.Merge;
using static LoraDeploy.Lora.Tests.Merge.MergeFixtures;

namespace LoraDeploy.Lora.Tests.Merge;

/// <summary>
/// The blocked low-rank kernel (<see cref="LowRankDelta.AddTo"/>, F32 with fused multiply-add) against a plain-loop
/// F64 reference written here, and against the library's unblocked row path (<see cref="LowRankDelta.Row"/>, double),
/// within the 1e-6 relative, on shapes with row remainders (not a multiple of 4) and column remainders (not a
/// multiple of the vector width).
/// </summary>
public sealed class LowRankKernelTests
{
    private const double C = 0.37;

    [Theory]
    [InlineData(4, 8, 1)]
    [InlineData(13, 37, 5)]
    [InlineData(64, 200, 32)]
    [InlineData(3, 5, 2)]
    [InlineData(9, 83, 32)]
    [InlineData(130, 1000, 64)]
    public void The_blocked_kernel_is_within_1e_6_of_an_F64_reference(int rows, int rest, int rank)
    {
        var (u, v, weights, delta) = Inputs(rows, rest, rank);
        Assert.SkipUnless(delta.HasBlockedPath, "this CPU has no 256-bit vectors with fused multiply-add, so the merge takes the plain loop");

        var expected = new double[rows * rest];
        for (var o = 0; o < rows; o++)
        {
            for (var j = 0; j < rest; j++)
            {
                double sum = 0;
                for (var m = 0; m < rank; m++)
                {
                    sum += (double)u[o * rank + m] * v[m * rest + j];
                }
                expected[o * rest + j] = weights[3 + o * rest + j] + C * sum;
            }
        }
        var actual = (float[])weights.Clone();
        delta.AddTo(actual, offset: 3, C);

        AssertClose(expected, [.. actual.Skip(3).Take(rows * rest).Select(x => (double)x)], "blocked kernel");
        Assert.Equal(weights[..3], actual[..3]);
        Assert.Equal(weights[(3 + rows * rest)..], actual[(3 + rows * rest)..]);
    }

    [Theory]
    [InlineData(13, 37, 5)]
    [InlineData(7, 45, 32)]
    [InlineData(6, 1031, 16)]
    [InlineData(5, 50, 8)]
    public void The_blocked_kernel_and_the_row_path_agree_on_odd_sizes(int rows, int rest, int rank)
    {
        var (_, _, weights, delta) = Inputs(rows, rest, rank);
        Assert.SkipUnless(delta.HasBlockedPath, "this CPU has no 256-bit vectors with fused multiply-add, so the merge takes the plain loop");

        var rowPath = new double[rows * rest];
        var row = new double[rest];
        for (var o = 0; o < rows; o++)
        {
            delta.Row(o, row);
            for (var j = 0; j < rest; j++)
            {
                rowPath[o * rest + j] = (float)(weights[3 + o * rest + j] + C * row[j]);
            }
        }
        var blocked = (float[])weights.Clone();
        delta.AddTo(blocked, offset: 3, C);

        AssertClose(rowPath, [.. blocked.Skip(3).Take(rows * rest).Select(x => (double)x)], "blocked against row path");
    }

    private static (float[] U, float[] V, float[] Weights, LowRankDelta Delta) Inputs(int rows, int rest, int rank)
    {
        var random = new Random(rows * 1000 + rest * 10 + rank);
        float Next() => (float)(random.NextDouble() * 2 - 1);
        var u = Enumerable.Range(0, rows * rank).Select(_ => Next()).ToArray();
        var v = Enumerable.Range(0, rank * rest).Select(_ => Next()).ToArray();
        // 3 values before and after the rows the kernel covers: they must stay as they are.
        var weights = Enumerable.Range(0, rows * rest + 6).Select(_ => Next()).ToArray();
        return (u, v, weights, new LowRankDelta(u, v, rank) { Out = rows, Rest = rest });
    }
}
