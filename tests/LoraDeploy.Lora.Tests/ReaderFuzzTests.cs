using System.Buffers.Binary;
using System.Text;
using LoraDeploy.Lora.Safetensors;
using LoraDeploy.Lora.Tests.Support;

namespace LoraDeploy.Lora.Tests;

/// <summary>
/// Seeded random mutations of real and synthetic headers: the reader must only ever throw
/// <see cref="SafetensorsFormatException"/>, and must allocate no more than a bound proportional to the
/// header length. Arrays it takes from the shared pools count as allocated (from the pool or not), so pooling cannot
/// hide memory from the bound. Whatever it accepts must also probe without throwing, and is then disposed.
/// </summary>
public sealed class ReaderFuzzTests
{
    private const int Mutations = 100_000;
    private const int Seed = 20261127;
    private const long AllocationSlack = 64 * 1024;
    private const long AllocationPerHeaderByte = 40;

    private static readonly byte[] Interesting = "{}[]\":,-0123456789e.\\ tfn"u8.ToArray();
    private static readonly string[] Numbers = ["18446744073709551615", "9223372036854775808", "-1", "1e400", "4294967296", "0", "1.5", "NaN", "00"];

    private static List<(byte[] Head, long Length)> Seeds()
    {
        var root = Path.Combine(AppContext.BaseDirectory, "Fixtures", "realworld-lora-headers", "headers");
        var writers = new List<SafetensorsWriter>();
        foreach (var name in new[]
        {
            "flux1__invoke-xlabs-subset", "flux1__invoke-lokr-bfl-synthetic", "anima__invoke-kohya-sample",
            "anima__invoke-lokr-dora-synthetic", "qwen-image__invoke-kohya-lokr-synthetic", "krea2__invoke-kohya-subset",
        })
        {
            writers.Add(SafetensorsWriter.FromFixture(Path.Combine(root, name + ".json")));
        }
        writers.Add(new SafetensorsWriter()
            .Metadata("ss_network_module", "networks.lora")
            .Metadata("ss_tag_frequency", """{"10_x": {"x": 3}}""")
            .Lora("lora_unet_down_blocks_0_attentions_0_proj_in", 4, 320, 320, alpha: 2, kernel: 1)
            .Lora("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 4, 768, 320, alpha: 2)
            .Lora("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 4, 768, 768, alpha: 2)
            .Tensor("f4", "F4", [2, 3])
            .Tensor("scalar", "F32", []));
        return writers.Select(w =>
        {
            var (head, dataLength) = w.BuildHead();
            return (head, head.Length + dataLength);
        }).ToList();
    }

    [Fact]
    public void Random_mutations_only_throw_format_exceptions_and_allocate_in_proportion()
    {
        var seeds = Seeds();
        var random = new Random(Seed);
        var accepted = 0;
        for (var i = 0; i < Mutations; i++)
        {
            var (original, originalLength) = seeds[random.Next(seeds.Count)];
            var (head, length) = Mutate(random, original, originalLength);
            var declared = head.Length >= 8 ? BinaryPrimitives.ReadUInt64LittleEndian(head) : 0;
            var readable = (long)Math.Min(declared, (ulong)Math.Max(0, length - 8));
            var bound = AllocationSlack + AllocationPerHeaderByte * readable;

            using var stream = new HeadThenZerosStream(head, length);
            SafetensorsHeader? header = null;
            var before = GC.GetAllocatedBytesForCurrentThread();
            var rentedBefore = HeaderPool.RentedBytes;
            try
            {
                header = SafetensorsReader.Read(stream);
            }
            catch (SafetensorsFormatException)
            {
            }
            catch (Exception e)
            {
                Assert.Fail($"mutation {i} (seed {Seed}) threw {e.GetType().Name}: {e.Message}");
            }
            // A rented array that was not in the pool is counted twice (by the GC and as rented): the bound only gets stricter.
            var allocated = GC.GetAllocatedBytesForCurrentThread() - before + (HeaderPool.RentedBytes - rentedBefore);
            Assert.True(allocated <= bound, $"mutation {i} (seed {Seed}) allocated {allocated} bytes for a {readable}-byte header (bound {bound})");

            if (header is not null)
            {
                accepted++;
                LoraProber.Probe(header, stream);
                header.Dispose();
            }
        }
        // Some mutations (whitespace, metadata text, reordering) keep the file valid; make sure both paths ran.
        Assert.InRange(accepted, 1, Mutations - 1);
    }

    private static (byte[] Head, long Length) Mutate(Random random, byte[] original, long originalLength)
    {
        var head = new List<byte>(original);
        var length = originalLength;
        var json = Math.Max(0, head.Count - 8);
        var steps = random.Next(1, 4);
        for (var s = 0; s < steps; s++)
        {
            var at = 8 + random.Next(Math.Max(1, head.Count - 8));
            at = Math.Min(at, head.Count);
            switch (random.Next(9))
            {
                case 0 when at < head.Count:
                    head[at] ^= (byte)(1 << random.Next(8));
                    break;
                case 1 when at < head.Count:
                    head[at] = Interesting[random.Next(Interesting.Length)];
                    break;
                case 2:
                    head.RemoveRange(at, Math.Min(random.Next(1, 17), head.Count - at));
                    break;
                case 3:
                    var from = 8 + random.Next(Math.Max(1, head.Count - 8));
                    var count = Math.Min(random.Next(1, 64), head.Count - from);
                    if (count > 0)
                    {
                        head.InsertRange(at, head.GetRange(from, count));
                    }
                    break;
                case 4:
                    var digit = head.FindIndex(at, b => b is >= (byte)'0' and <= (byte)'9');
                    if (digit >= 0)
                    {
                        var end = digit;
                        while (end < head.Count && head[end] is >= (byte)'0' and <= (byte)'9')
                        {
                            end++;
                        }
                        head.RemoveRange(digit, end - digit);
                        head.InsertRange(digit, Encoding.ASCII.GetBytes(Numbers[random.Next(Numbers.Length)]));
                    }
                    break;
                case 5:
                    // Keep the length prefix consistent with the edited JSON most of the time, so mutations reach the parser.
                    json = head.Count - 8;
                    WritePrefix(head, (ulong)json);
                    length = originalLength - original.Length + head.Count;
                    break;
                case 6:
                    WritePrefix(head, random.Next(3) switch
                    {
                        0 => (ulong)random.NextInt64(),
                        1 => (ulong)Math.Max(0, json + random.Next(-64, 64)),
                        _ => 1UL << random.Next(64),
                    });
                    break;
                case 7:
                    length = Math.Max(0, length + random.Next(-4096, 4096));
                    break;
                default:
                    length = random.Next(2) == 0 ? random.Next(0, 16) : length + 1;
                    break;
            }
        }
        if (random.Next(2) == 0)
        {
            WritePrefix(head, (ulong)(head.Count - 8));
            length = originalLength - original.Length + head.Count;
        }
        return ([.. head], length);
    }

    private static void WritePrefix(List<byte> head, ulong value)
    {
        if (head.Count < 8)
        {
            return;
        }
        Span<byte> prefix = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(prefix, value);
        for (var i = 0; i < 8; i++)
        {
            head[i] = prefix[i];
        }
    }
}
