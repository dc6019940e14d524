using System.Buffers.Binary;
using System.Text;
using LoraDeploy.Lora.Gguf;
using LoraDeploy.Lora.Peft;
using LoraDeploy.Lora.Tests.Support;

namespace LoraDeploy.Lora.Tests.Gguf;

public sealed class GgufReaderTests
{
    [Fact]
    public void Round_trip_with_the_writer_keeps_every_value_and_tensor_info()
    {
        var stream = new MemoryStream();
        new GgufWriter()
            .Add("general.architecture", "llama")
            .Add("u32", 7u)
            .Add("i32", -3)
            .Add("f32", 1.5f)
            .Add("flag", true)
            .Add("u64", 1ul << 40)
            .Add("names", ["a", "bé", ""])
            .Add("scores", [0.5f, -1f])
            .Add("ids", new List<int> { 1, -2, 3 })
            .AddTensor("t0", [3], [1f, 2f, 3f])
            .AddTensor("t1", GgmlType.F16, [4, 2], new byte[16])
            .AddTensor("t2", [2, 2], [0f, 0f, 0f, 0f])
            .WriteTo(stream);

        var file = GgufReader.Read(stream);

        Assert.Equal(3u, file.Version);
        Assert.Equal("llama", file.Architecture);
        Assert.Equal(7L, file.GetInt64("u32"));
        Assert.Equal(-3L, file.GetInt64("i32"));
        Assert.Equal(1.5f, file.GetFloat32("f32"));
        Assert.Equal(true, file.Metadata["flag"].Value);
        Assert.Equal(1L << 40, file.GetInt64("u64"));
        Assert.Equal(new[] { "a", "bé", "" }, (string[])((GgufArray)file.Metadata["names"].Value).Items!);
        Assert.Equal(new[] { 0.5f, -1f }, (float[])((GgufArray)file.Metadata["scores"].Value).Items!);
        Assert.Equal(new[] { 1, -2, 3 }, (int[])((GgufArray)file.Metadata["ids"].Value).Items!);
        Assert.Null(file.GetInt64("names"));
        Assert.Null(file.GetString("u32"));

        Assert.Equal(["t0", "t1", "t2"], file.Tensors.Select(t => t.Name));
        Assert.Equal(new long[] { 4, 2 }, file.TensorsByName["t1"].Ne);
        Assert.Equal("F16", file.TensorsByName["t1"].TypeName);
        Assert.Equal(16, file.TensorsByName["t1"].ByteLength);
        Assert.Equal([0L, 32L, 64L], file.Tensors.Select(t => t.Offset));
        Assert.Equal(0, file.DataOffset % 32);
        Assert.Equal(file.DataOffset + 64 + 32, stream.Length);
    }

    [Fact]
    public void Arrays_above_the_keep_limit_are_validated_and_skipped()
    {
        var stream = new MemoryStream();
        new GgufWriter()
            .Add("tokens", Enumerable.Range(0, 100).Select(i => "tok" + i).ToList())
            .Add("ids", Enumerable.Range(0, 100).ToList())
            .Add("after", 5u)
            .WriteTo(stream);

        var file = GgufReader.Read(stream, maxArrayElementsKept: 10);

        var tokens = (GgufArray)file.Metadata["tokens"].Value;
        Assert.Equal(100, tokens.Count);
        Assert.Null(tokens.Items);
        Assert.Null(((GgufArray)file.Metadata["ids"].Value).Items);
        Assert.Equal(5L, file.GetInt64("after"));
    }

    [Fact]
    public void The_tiny_llama_is_described_for_the_converter()
    {
        var dir = TempFiles.Directory();
        var path = new TinyLlama().Generate().WriteGguf(Path.Combine(dir, "tiny.gguf"));

        var model = LlamaCppBaseModel.ReadFile(path);

        Assert.Equal("llama", model.Architecture);
        Assert.Equal(64, model.EmbeddingLength);
        Assert.Equal(4, model.HeadCount);
        Assert.Equal(2, model.HeadCountKv);
        Assert.Equal(2, model.BlockCount);
        Assert.Equal(128, model.FeedForwardLength);
        Assert.Equal(3 + 2 * 9, model.Tensors.Count);
        Assert.Equal(new long[] { 64, 32 }, model.Tensors["blk.1.attn_k.weight"]);
        Assert.Equal(new long[] { 64, 320 }, model.Tensors["token_embd.weight"]);
        Assert.Equal(new long[] { 64 }, model.Tensors["output_norm.weight"]);
        // The 320-token vocabulary is larger than nothing but within the default keep limit.
        Assert.Equal(320, ((string[])((GgufArray)GgufReader.ReadFile(path).Metadata["tokenizer.ggml.tokens"].Value).Items!).Length);
    }

    [Fact]
    public void A_base_model_without_its_hyperparameters_is_refused_naming_the_key()
    {
        var stream = new MemoryStream();
        new GgufWriter().Add("general.architecture", "qwen2").Add("qwen2.block_count", 2u).WriteTo(stream);
        var error = Assert.Throws<GgufFormatException>(() => LlamaCppBaseModel.FromGguf(GgufReader.Read(stream)));
        Assert.Contains("qwen2.embedding_length", error.Message);
    }

    [Fact]
    public void Every_truncation_of_a_valid_file_is_refused()
    {
        var stream = new MemoryStream();
        new GgufWriter()
            .Add("general.architecture", "llama")
            .Add("names", ["a", "b"])
            .Add("x", 1.5f)
            .AddTensor("t0", [3], [1f, 2f, 3f])
            .AddTensor("t1", [2], [1f, 2f])
            .WriteTo(stream);
        var bytes = stream.ToArray();
        GgufReader.Read(new MemoryStream(bytes));

        // The last tensor's data ends 8 bytes into its 32-byte padded slot; padding after it may be missing.
        var lastDataEnd = bytes.Length - 32 + 8;
        for (var length = 0; length < lastDataEnd; length++)
        {
            var error = Assert.Throws<GgufFormatException>(() => GgufReader.Read(new MemoryStream(bytes[..length])));
            Assert.False(string.IsNullOrWhiteSpace(error.Message));
        }
    }

    [Fact]
    public void Bad_magic_and_unsupported_versions_are_refused()
    {
        Assert.Contains("magic", Refused(Raw.File(magic: 0x12345678)));
        Assert.Contains("version 1 is no longer supported", Refused(Raw.File(version: 1)));
        Assert.Contains("version 4", Refused(Raw.File(version: 4)));
        Assert.Contains("big-endian", Refused(Raw.File(version: 0x03000000)));
        Assert.Contains("0x00000000", Refused(Raw.File(version: 0)));
        Assert.Contains("at least 24", Refused([.. "GGUF"u8]));
    }

    [Fact]
    public void Huge_counts_and_lengths_are_refused_before_allocating()
    {
        Assert.Contains("tensor count", Refused(Raw.File(tensors: ulong.MaxValue)));
        Assert.Contains("metadata count", Refused(Raw.File(kvs: 1L << 40)));
        var hugeKey = new Raw().Header(kvs: 1).U64(ulong.MaxValue).Zeros(64).Bytes();
        Assert.Contains("limit", Refused(hugeKey));
        var longButShort = new Raw().Header(kvs: 1).U64(1000).Zeros(64).Bytes();
        Assert.Contains("truncated", Refused(longButShort));
        var hugeArray = new Raw().Header(kvs: 1).Str("k").U32((uint)GgufValueType.Array).U32((uint)GgufValueType.UInt32).U64(1L << 50).Zeros(64).Bytes();
        Assert.Contains("cannot hold that many", Refused(hugeArray));
        var hugeStringArray = new Raw().Header(kvs: 1).Str("k").U32((uint)GgufValueType.Array).U32((uint)GgufValueType.String).U64(1).U64(1L << 60).Bytes();
        Assert.Contains("limit", Refused(hugeStringArray));
    }

    [Fact]
    public void Nested_arrays_and_unknown_value_types_are_refused()
    {
        var nested = new Raw().Header(kvs: 1).Str("k").U32((uint)GgufValueType.Array).U32((uint)GgufValueType.Array).U64(1).Bytes();
        Assert.Contains("array of arrays", Refused(nested));
        var unknown = new Raw().Header(kvs: 1).Str("k").U32(13).U32(0).Bytes();
        Assert.Contains("value type 13", Refused(unknown));
    }

    [Fact]
    public void Duplicate_and_empty_keys_and_bad_alignment_are_refused()
    {
        var dup = new Raw().Header(kvs: 2).Str("k").U32((uint)GgufValueType.UInt32).U32(1).Str("k").U32((uint)GgufValueType.UInt32).U32(2).Bytes();
        Assert.Contains("appears twice", Refused(dup));
        var empty = new Raw().Header(kvs: 1).Str("").U32((uint)GgufValueType.UInt32).U32(1).Bytes();
        Assert.Contains("empty", Refused(empty));
        var alignment = new Raw().Header(kvs: 1).Str("general.alignment").U32((uint)GgufValueType.UInt32).U32(24).Bytes();
        Assert.Contains("power of two", Refused(alignment));
        var alignmentType = new Raw().Header(kvs: 1).Str("general.alignment").U32((uint)GgufValueType.UInt64).U64(32).Bytes();
        Assert.Contains("u32", Refused(alignmentType));
        var badUtf8 = new Raw().Header(kvs: 1).U64(2).Literal(0xC3, 0x28).U32((uint)GgufValueType.UInt32).U32(1).Bytes();
        Assert.Contains("UTF-8", Refused(badUtf8));
    }

    [Fact]
    public void Bad_tensor_infos_are_refused_with_the_tensor_named()
    {
        Assert.Contains("longer than", Refused(OneTensor(new string('n', 64), [4])));
        Assert.Contains("5 dimensions", Refused(OneTensor("t", [1, 1, 1, 1, 1])));
        Assert.Contains("negative", Refused(OneTensor("t", [unchecked((long)ulong.MaxValue)])));
        Assert.Contains("overflows", Refused(OneTensor("t", [1L << 40, 1L << 40])));
        Assert.Contains("needs 4398046511104 bytes of data but the whole file is", Refused(OneTensor("t", [1L << 40])));
        Assert.Contains("ggml type 4", Refused(OneTensor("t", [4], type: 4)));
        Assert.Contains("ggml type 99", Refused(OneTensor("t", [4], type: 99)));
        Assert.Contains("block size 32", Refused(OneTensor("t", [16], type: 8))); // Q8_0
        Assert.Contains("offset 32, expected 0", Refused(OneTensor("t", [4], offset: 32)));
        Assert.Contains("'t' ends at byte", Refused(OneTensor("t", [4], data: 8)));
        Assert.Contains("'t'", Refused(OneTensor("t", [4], data: 8)));

        var twice = new Raw().Header(tensors: 2).TensorInfo("t", [4], 0, 0).TensorInfo("t", [4], 0, 32).Pad(32).Zeros(64).Bytes();
        Assert.Contains("listed twice", Refused(twice));
        var gap = new Raw().Header(tensors: 2).TensorInfo("a", [4], 0, 0).TensorInfo("b", [4], 0, 16).Pad(32).Zeros(64).Bytes();
        Assert.Contains("'b' has offset 16, expected 32", Refused(gap));
    }

    [Fact]
    public void Random_byte_flips_give_a_file_or_a_format_error_never_another_exception()
    {
        var stream = new MemoryStream();
        new GgufWriter()
            .Add("general.architecture", "llama")
            .Add("llama.block_count", 2u)
            .Add("names", ["a", "b", "c"])
            .Add("ids", new List<int> { 1, 2 })
            .AddTensor("t0", [3], [1f, 2f, 3f])
            .AddTensor("t1", GgmlType.F16, [4, 2], new byte[16])
            .WriteTo(stream);
        var original = stream.ToArray();
        var headerEnd = original.Length - 64;
        var random = new Random(3);
        for (var round = 0; round < 3000; round++)
        {
            var bytes = (byte[])original.Clone();
            for (var flips = random.Next(1, 4); flips > 0; flips--)
            {
                bytes[random.Next(headerEnd)] = (byte)random.Next(256);
            }
            try
            {
                GgufReader.Read(new MemoryStream(bytes));
            }
            catch (GgufFormatException)
            {
            }
        }
    }

    [Fact]
    public void A_well_formed_raw_file_reads()
    {
        var file = GgufReader.Read(new MemoryStream(OneTensor("t", [4])));
        Assert.Equal(16, file.Tensors[0].ByteLength);
    }

    private static byte[] OneTensor(string name, long[] ne, uint type = 0, ulong offset = 0, int data = 32) =>
        new Raw().Header(tensors: 1).TensorInfo(name, ne, type, offset).Pad(32).Zeros(data).Bytes();

    private static string Refused(byte[] bytes) =>
        Assert.Throws<GgufFormatException>(() => GgufReader.Read(new MemoryStream(bytes))).Message;

    /// <summary>Writes GGUF bytes field by field, so tests can put anything anywhere.</summary>
    private sealed class Raw
    {
        private readonly MemoryStream _bytes = new();

        public static byte[] File(uint magic = 0x46554747, uint version = 3, ulong tensors = 0, long kvs = 0) =>
            new Raw().U32(magic).U32(version).U64(tensors).U64((ulong)kvs).Zeros(64).Bytes();

        public Raw Header(ulong tensors = 0, long kvs = 0) => U32(0x46554747).U32(3).U64(tensors).U64((ulong)kvs);

        public Raw U32(uint v)
        {
            Span<byte> b = stackalloc byte[4];
            BinaryPrimitives.WriteUInt32LittleEndian(b, v);
            _bytes.Write(b);
            return this;
        }

        public Raw U64(ulong v)
        {
            Span<byte> b = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64LittleEndian(b, v);
            _bytes.Write(b);
            return this;
        }

        public Raw Str(string s)
        {
            var bytes = Encoding.UTF8.GetBytes(s);
            U64((ulong)bytes.Length);
            _bytes.Write(bytes);
            return this;
        }

        public Raw Literal(params byte[] bytes)
        {
            _bytes.Write(bytes);
            return this;
        }

        public Raw TensorInfo(string name, long[] ne, uint type, ulong offset)
        {
            Str(name).U32((uint)ne.Length);
            foreach (var d in ne)
            {
                U64(unchecked((ulong)d));
            }
            return U32(type).U64(offset);
        }

        public Raw Pad(int alignment)
        {
            while (_bytes.Length % alignment != 0)
            {
                _bytes.WriteByte(0);
            }
            return this;
        }

        public Raw Zeros(int count)
        {
            _bytes.Write(new byte[count]);
            return this;
        }

        public byte[] Bytes() => _bytes.ToArray();
    }
}
