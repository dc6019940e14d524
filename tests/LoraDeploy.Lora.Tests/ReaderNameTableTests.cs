using System.Buffers.Binary;
using System.Diagnostics;
using System.Text;
using LoraDeploy.Lora.Safetensors;
using LoraDeploy.Lora.Tests.Support;

namespace LoraDeploy.Lora.Tests;

/// <summary>
/// The reader keeps tensor names as UTF-8 slices of the header bytes (escaped ones unescaped into a buffer of their
/// own) and finds duplicates by hashing those bytes; these tests cover what that representation could get wrong.
/// </summary>
public sealed class ReaderNameTableTests
{
    private static byte[] File(string headerJson, long dataLength) => SafetensorsWriter.RawFile(headerJson, dataLength);

    private static SafetensorsHeader Accept(string headerJson, long dataLength) =>
        SafetensorsReader.Read(new MemoryStream(File(headerJson, dataLength)));

    private static string Reject(string headerJson, long dataLength) =>
        Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.Read(new MemoryStream(File(headerJson, dataLength)))).Message;

    private static string T(long begin) => $$"""{"dtype":"U8","shape":[1],"data_offsets":[{{begin}},{{begin + 1}}]}""";

    // One-byte U8 tensors, in order, under the given raw JSON keys (already escaped as they should appear).
    private static string Header(IEnumerable<string> jsonKeys) =>
        "{" + string.Join(",", jsonKeys.Select((key, i) => $"\"{key}\":{T(i)}")) + "}";

    [Fact]
    public void Escaped_names_are_unescaped_exactly()
    {
        var header = Accept(Header([@"\u00e9\n\ud83d\ude00", @"b\""", @"c\\d", "plain"]), 4);

        Assert.Equal(["é\n😀", "b\"", @"c\d", "plain"], header.Tensors.Select(t => t.Name));
        Assert.Equal(4, header.TensorCount);
        Assert.True(header.TryGetTensor("é\n😀", out var first));
        Assert.Equal(0, first.DataStart);
        Assert.True(header.TryGetTensor("b\"", out var second));
        Assert.Equal(1, second.DataStart);
        Assert.False(header.TryGetTensor(@"\u00e9\n\ud83d\ude00", out _));
    }

    [Fact]
    public void Duplicates_that_differ_only_in_escaping_are_rejected()
    {
        Assert.Equal("duplicate tensor name 'éa' in the header", Reject(Header([@"\u00e9a", "éa"]), 2));
        Assert.Equal("duplicate tensor name 'ab' in the header", Reject(Header(["ab", @"\u0061b"]), 2));
        Assert.Equal("duplicate tensor name 'a/b' in the header", Reject(Header(["a/b", @"a\/b"]), 2));
    }

    [Fact]
    public void Escaped_lone_surrogate_in_a_tensor_name_is_rejected() =>
        Assert.StartsWith("the header contains an invalid string", Reject(Header([@"\ud800"]), 1), StringComparison.Ordinal);

    [Fact]
    public void Names_of_odd_and_even_length_and_with_nul_bytes_stay_distinct()
    {
        // The hash reads bytes in pairs; an odd last byte, including a zero one, must still tell names apart.
        string[] keys = ["a", "aa", @"a\u0000", @"aa\u0000", @"\u0000", @"\u0000\u0000", "ab", "ba", "aab", "aba"];
        var header = Accept(Header(keys), keys.Length);

        Assert.Equal(keys.Length, header.Tensors.Select(t => t.Name).Distinct(StringComparer.Ordinal).Count());
        Assert.True(header.TryGetTensor("a\0", out var nul));
        Assert.Equal(2, nul.DataStart);
    }

    [Fact]
    public void Names_spanning_many_chunks_and_longer_than_a_chunk_round_trip()
    {
        // ~200 KB of names (the reader kept them in 32 KB chunks until the fifth performance session, and now as
        // slices of the header bytes): names of many lengths, one longer than 32 KB, and an escaped one at the end.
        var names = new List<string>();
        for (var i = 0; i < 2_000; i++)
        {
            names.Add($"module_{i:D5}_" + new string((char)('a' + i % 26), i % 150) + ".weight");
        }
        names.Insert(1_000, "huge_" + new string('x', 32 * 1024 + 17));
        names.Add("é_last");
        var header = Accept(Header(names.Select(n => n.Replace("é", @"\u00e9", StringComparison.Ordinal))), names.Count);

        Assert.Equal(names, header.Tensors.Select(t => t.Name));
        for (var i = 0; i < names.Count; i += 97)
        {
            Assert.True(header.TryGetTensor(names[i], out var tensor));
            Assert.Equal(i, tensor.DataStart);
        }
    }

    [Fact]
    public void A_duplicate_of_a_name_in_an_earlier_chunk_is_found()
    {
        var names = Enumerable.Range(0, 1_000).Select(i => $"layer_{i}_" + new string('p', 80)).ToList();
        names.Add(names[3]);
        Assert.Equal($"duplicate tensor name '{names[3]}' in the header", Reject(Header(names), names.Count));
    }

    [Theory]
    [InlineData("ascending")]
    [InlineData("descending")]
    [InlineData("ascending then descending")]
    public void Many_names_that_differ_only_in_the_middle_read_in_linear_time(string order)
    {
        // A hash over a prefix or suffix only would put all of these in one bucket: 100,000 names would then take
        // ~5·10^9 comparisons of 200-byte names, minutes rather than well under a second. Ascending names take the
        // reader's no-hash path, descending ones the hash set from the second name on, the third order switches half-way.
        var prefix = new string('p', 100);
        var suffix = new string('s', 100);
        var numbers = order switch
        {
            "ascending" => Enumerable.Range(0, 100_000),
            "descending" => Enumerable.Range(0, 100_000).Reverse(),
            _ => Enumerable.Range(0, 50_000).Concat(Enumerable.Range(50_000, 50_000).Reverse()),
        };
        var json = Header(numbers.Select(i => $"{prefix}{i:D6}{suffix}"));
        var watch = Stopwatch.StartNew();

        var header = Accept(json, 100_000);

        Assert.Equal(100_000, header.TensorCount);
        Assert.True(watch.Elapsed < TimeSpan.FromSeconds(20), $"reading took {watch.Elapsed}");
    }

    [Fact]
    public void Names_in_any_order_without_duplicates_are_accepted()
    {
        // Ascending, then a step down (the reader switches to hashing there), then ascending again.
        string[] keys = ["a", "b", "c", "ab", "b0", "c0", "a0", "bb"];
        var header = Accept(Header(keys), keys.Length);

        Assert.Equal(keys, header.Tensors.Select(t => t.Name));
    }

    [Fact]
    public void A_duplicate_right_after_its_twin_is_rejected() =>
        Assert.Equal("duplicate tensor name 'b' in the header", Reject(Header(["a", "b", "b", "c"]), 4));

    [Fact]
    public void A_duplicate_in_an_unsorted_tail_of_a_name_in_the_sorted_prefix_is_rejected()
    {
        Assert.Equal("duplicate tensor name 'b' in the header", Reject(Header(["a", "b", "c", "d", "z", "y", "b"]), 7));
        // The first name and the step down itself.
        Assert.Equal("duplicate tensor name 'a' in the header", Reject(Header(["a", "b", "c", "a"]), 4));
        Assert.Equal("duplicate tensor name 'a' in the header", Reject(Header(["a", "b", "c", "0", "a"]), 5));
    }

    [Fact]
    public void A_duplicate_across_dtype_groups_is_rejected()
    {
        // The library's order: each dtype group sorted by name on its own, so names step down between groups.
        static string Tensor(string name, string dtype, int begin) =>
            $$"""
              "{{name}}":{"dtype":"{{dtype}}","shape":[1],"data_offsets":[{{begin}},{{begin + 1}}]}
              """;
        var json = "{" + string.Join(",", Tensor("a", "U8", 0), Tensor("m", "U8", 1), Tensor("z", "U8", 2),
            Tensor("b", "I8", 3), Tensor("m", "I8", 4)) + "}";
        Assert.Equal("duplicate tensor name 'm' in the header", Reject(json, 5));

        var distinct = "{" + string.Join(",", Tensor("a", "U8", 0), Tensor("z", "U8", 1), Tensor("b", "I8", 2), Tensor("y", "I8", 3)) + "}";
        Assert.Equal(["a", "z", "b", "y"], Accept(distinct, 4).Tensors.Select(t => t.Name));
    }

    [Fact]
    public void Duplicates_that_differ_only_in_escaping_are_rejected_on_both_paths()
    {
        // Sorted so far: the escaped twin is not greater than its plain twin.
        Assert.Equal("duplicate tensor name 'ab' in the header", Reject(Header(["a", "ab", @"\u0061b"]), 3));
        Assert.Equal("duplicate tensor name 'ab' in the header", Reject(Header(["a", @"\u0061b", "ab"]), 3));
        // Hashed: names stopped ascending at "b" before the twin comes.
        Assert.Equal("duplicate tensor name 'ab' in the header", Reject(Header(["ab", "c", "b", @"\u0061b"]), 4));
        Assert.Equal("duplicate tensor name 'éa' in the header", Reject(Header([@"\u00e9a", "z", "y", "éa"]), 4));
        Assert.Equal("duplicate tensor name 'a/b' in the header", Reject(Header(["z", "a/b", "y", @"a\/b"]), 4));
    }

    [Fact]
    public void Probe_groups_a_module_whose_keys_are_escaped_differently()
    {
        // "lora_unet_..." written once plainly and once with escapes is one module with both halves.
        const string Module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
        var escaped = @"\u006cora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
        var json = "{"
            + $$"""
                "{{Module}}.lora_down.weight":{"dtype":"F16","shape":[4,320],"data_offsets":[0,2560]},
                "{{escaped}}.lora_up.weight":{"dtype":"F16","shape":[320,4],"data_offsets":[2560,5120]}
                """
            + "}";
        using var stream = new MemoryStream(File(json, 5120));
        var report = LoraProber.Probe(SafetensorsReader.Read(stream), stream);

        Assert.Equal(1, report.ModuleCount);
        Assert.Equal((4, 4), (report.RankMin, report.RankMax));
        Assert.DoesNotContain(report.Warnings, w => w.Contains("only one of", StringComparison.Ordinal));
    }

    [Fact]
    public void Probe_handles_module_names_longer_than_its_name_buffer_and_non_ascii_names()
    {
        var longModule = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q_" + new string('x', 400);
        var w = new SafetensorsWriter()
            .Lora(longModule, 4, 320, 320, alpha: 4)
            .Lora("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k_é", 4, 320, 320, alpha: 4);
        using var stream = new MemoryStream(w.ToBytes());

        var report = LoraProber.Probe(SafetensorsReader.Read(stream), stream);

        Assert.Equal(2, report.ModuleCount);
        Assert.Equal(6, report.TensorCount);
        Assert.Equal(1.0, report.Scale);
        Assert.DoesNotContain(report.Warnings, w => w.Contains("only one of", StringComparison.Ordinal));
    }
}
