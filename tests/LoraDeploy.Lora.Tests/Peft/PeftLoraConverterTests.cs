using System.Buffers.Binary;
using System.Text;
using LoraDeploy.Lora.Gguf;
using LoraDeploy.Lora.Peft;
using LoraDeploy.Lora.Tests.Support;

namespace LoraDeploy.Lora.Tests.Peft;

/// <summary>The converter's output layout, and every refusal (hostile adapters) with the sentence it gives.</summary>
public sealed class PeftLoraConverterTests : IDisposable
{
    private readonly string _dir = TempFiles.Directory();
    private readonly TinyLlama _model = new TinyLlama().Generate();
    private readonly LlamaCppBaseModel _base;

    public PeftLoraConverterTests() =>
        _base = LlamaCppBaseModel.ReadFile(_model.WriteGguf(Path.Combine(_dir, "base.gguf")));

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    [Fact]
    public void Output_has_llama_cpp_adapter_metadata_names_and_shapes()
    {
        var fixture = new PeftAdapterFixture { Rank = 4, Alpha = 8 }.Generate(_model);
        var (report, gguf, _) = Convert(fixture);

        Assert.Equal("llama", gguf.Architecture);
        Assert.Equal("adapter", gguf.GetString("general.type"));
        Assert.Equal("lora", gguf.GetString("adapter.type"));
        Assert.Equal(0f, gguf.GetFloat32("adapter.lora.alpha"));
        Assert.Equal(PeftLoraConverter.ConverterVersion, gguf.GetInt64("loradeploy.converter_version"));
        Assert.Equal(28, gguf.Tensors.Count);
        Assert.Equal("blk.0.attn_q.weight.lora_a", gguf.Tensors[0].Name);
        Assert.Equal("blk.0.attn_q.weight.lora_b", gguf.Tensors[1].Name);
        Assert.Equal("blk.1.ffn_down.weight.lora_b", gguf.Tensors[^1].Name);
        Assert.Equal(new long[] { 64, 4 }, gguf.TensorsByName["blk.0.attn_k.weight.lora_a"].Ne);
        Assert.Equal(new long[] { 4, 32 }, gguf.TensorsByName["blk.0.attn_k.weight.lora_b"].Ne);
        Assert.Equal(new long[] { 128, 4 }, gguf.TensorsByName["blk.1.ffn_down.weight.lora_a"].Ne);
        Assert.Equal(new long[] { 4, 64 }, gguf.TensorsByName["blk.1.ffn_down.weight.lora_b"].Ne);
        Assert.All(gguf.Tensors, t => Assert.Equal("F32", t.TypeName));

        Assert.Equal("llama", report.Architecture);
        Assert.Equal(28, report.TensorCount);
        Assert.Equal([4], report.Ranks);
        Assert.Equal([0, 1], report.Layers);
        Assert.Equal(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], report.TargetModules);
        Assert.All(report.Modules, m => Assert.Equal(2.0, m.Scale));
        Assert.Equal([true, true, false, false, false, false, false], report.Modules.Take(7).Select(m => m.RowsPermuted));
        Assert.Equal(fixture.Modules.Sum(m => m.A.Length + m.B.Length), report.ParameterCount);
    }

    [Fact]
    public void Lora_a_is_copied_and_lora_b_scaled_with_q_and_k_rows_interleaved_per_head()
    {
        var fixture = new PeftAdapterFixture { Rank = 4, Alpha = 6 }.Generate(_model);
        var (_, gguf, bytes) = Convert(fixture);
        var q = fixture.Modules.Single(m => m.Name == "model.layers.0.self_attn.q_proj");
        var k = fixture.Modules.Single(m => m.Name == "model.layers.0.self_attn.k_proj");
        var v = fixture.Modules.Single(m => m.Name == "model.layers.0.self_attn.v_proj");

        Assert.Equal(q.A, Floats(gguf, bytes, "blk.0.attn_q.weight.lora_a"));
        Assert.Equal(v.B.Select(b => (float)(b * 1.5)), Floats(gguf, bytes, "blk.0.attn_v.weight.lora_b"));
        // q: 4 heads of 16 rows; k: 2 heads of 16 rows. Row h·16 + 2i + j comes from row h·16 + 8j + i.
        AssertInterleaved(q.B, Floats(gguf, bytes, "blk.0.attn_q.weight.lora_b"), rows: 64, headDim: 16, rank: 4, scale: 1.5f);
        AssertInterleaved(k.B, Floats(gguf, bytes, "blk.0.attn_k.weight.lora_b"), rows: 32, headDim: 16, rank: 4, scale: 1.5f);
    }

    [Fact]
    public void Other_architectures_keep_the_hugging_face_row_order()
    {
        var qwen = _base with { Architecture = "qwen2" };
        var fixture = new PeftAdapterFixture { Rank = 4, Alpha = 4, Targets = ["q_proj"] }.Generate(_model);
        var (report, gguf, bytes) = Convert(fixture, qwen);

        Assert.Equal("qwen2", gguf.Architecture);
        Assert.All(report.Modules, m => Assert.False(m.RowsPermuted));
        Assert.Equal(fixture.Modules[0].B, Floats(gguf, bytes, "blk.0.attn_q.weight.lora_b"));
    }

    [Fact]
    public void F16_stays_f16_with_lora_b_scaled_in_float_and_bf16_becomes_f32()
    {
        var f16 = new PeftAdapterFixture { Dtype = "F16", Rank = 4, Alpha = 3, Targets = ["v_proj"] }.Generate(_model);
        var (report, gguf, bytes) = Convert(f16);
        Assert.Equal("F16", gguf.TensorsByName["blk.0.attn_v.weight.lora_a"].TypeName);
        Assert.Equal("F16", report.Modules[0].OutputType);
        var a = Halves(gguf, bytes, "blk.0.attn_v.weight.lora_a");
        Assert.Equal(f16.Modules[0].A, a.Select(h => (float)h));
        var b = Halves(gguf, bytes, "blk.0.attn_v.weight.lora_b");
        Assert.Equal(f16.Modules[0].B.Select(x => (Half)(x * 0.75f)), b);

        var bf16 = new PeftAdapterFixture { Dtype = "BF16", Rank = 4, Alpha = 4, Targets = ["v_proj"] }.Generate(_model);
        (report, gguf, bytes) = Convert(bf16);
        Assert.Equal("F32", gguf.TensorsByName["blk.0.attn_v.weight.lora_a"].TypeName);
        Assert.Equal("BF16", report.Modules[0].SourceDtype);
        Assert.Equal(bf16.Modules[0].A, Floats(gguf, bytes, "blk.0.attn_v.weight.lora_a"));
        Assert.Equal(bf16.Modules[0].B, Floats(gguf, bytes, "blk.0.attn_v.weight.lora_b"));
    }

    [Fact]
    public void Scales_follow_rslora_and_the_first_matching_pattern_key()
    {
        var config = Config("""
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": true,
             "target_modules": ["q_proj", "k_proj", "v_proj"],
             "rank_pattern": {"q_proj": 16, "model.layers.1.self_attn.q_proj": 9, "layers\\.1\\..*k_proj": 1},
             "alpha_pattern": {"proj": 100, "self_attn.v_proj": 2, "v_proj": 3}}
            """);
        var writer = new SafetensorsWriter()
            .Peft("base_model.model.model.layers.0.self_attn.q_proj", 16, 64, 64)
            .Peft("base_model.model.model.layers.1.self_attn.q_proj", 9, 64, 64)
            .Peft("base_model.model.model.layers.0.self_attn.k_proj", 4, 64, 32)
            .Peft("base_model.model.model.layers.1.self_attn.k_proj", 1, 64, 32)
            .Peft("base_model.model.model.layers.0.self_attn.v_proj", 4, 64, 32);

        var report = Validate(config, writer);

        var byName = report.Modules.ToDictionary(m => m.Module);
        // Exact key first: layer 1's q_proj is 9, not the earlier "q_proj" 16.
        Assert.Equal((16, 8 / 4.0), (byName["model.layers.0.self_attn.q_proj"].Rank, byName["model.layers.0.self_attn.q_proj"].Scale));
        Assert.Equal((9, 8 / 3.0), (byName["model.layers.1.self_attn.q_proj"].Rank, byName["model.layers.1.self_attn.q_proj"].Scale));
        Assert.Equal(4, byName["model.layers.0.self_attn.k_proj"].Rank);
        Assert.Equal((1, 8.0), (byName["model.layers.1.self_attn.k_proj"].Rank, byName["model.layers.1.self_attn.k_proj"].Scale));
        // "proj" never matches (it must follow a dot); "self_attn.v_proj" is the first key that does.
        Assert.Equal((2.0, 1.0), (byName["model.layers.0.self_attn.v_proj"].Alpha, byName["model.layers.0.self_attn.v_proj"].Scale));
        Assert.Equal([1, 4, 9, 16], report.Ranks);
        Assert.True(report.UseRslora);
    }

    [Fact]
    public void Validation_reads_only_the_header()
    {
        // Tensor data left as holes (sparse): validation must not need it.
        var writer = new SafetensorsWriter().Peft("base_model.model.model.layers.0.self_attn.q_proj", 8, 64, 64, "F16");
        var report = Validate(Config(Json(r: 8, alpha: 16)), writer);
        Assert.Equal("blk.0.attn_q.weight", Assert.Single(report.Modules).BaseTensor);
    }

    // ---- Hostile adapters: each a clear refusal --------------------------------------------------------------------

    [Fact]
    public void Wrong_shapes_are_refused_naming_both_sides()
    {
        Assert.Contains("layer 0 q_proj: adapter in 65, base model attn_q in 64",
            Refusal(Json(), new SafetensorsWriter().Peft("base_model.model.model.layers.0.self_attn.q_proj", 4, 65, 64)));
        Assert.Contains("layer 1 k_proj: adapter out 64, base model attn_k out 32",
            Refusal(Json(), new SafetensorsWriter().Peft("base_model.model.model.layers.1.self_attn.k_proj", 4, 64, 64)));
        Assert.Contains("layer 0 v_proj: lora_A has shape [8, 64], but adapter_config.json gives r = 4",
            Refusal(Json(r: 4), new SafetensorsWriter().Peft("base_model.model.model.layers.0.self_attn.v_proj", 8, 64, 32)));
        var mixedRank = new SafetensorsWriter()
            .Tensor("base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight", "F32", [4, 64])
            .Tensor("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight", "F32", [32, 8]);
        Assert.Contains("lora_B has shape [32, 8], but adapter_config.json gives r = 4", Refusal(Json(r: 4), mixedRank));
        var patterned = Json(r: 4, extra: "\"rank_pattern\": {\"v_proj\": 2}");
        Assert.Contains("gives rank_pattern['v_proj'] = 2",
            Refusal(patterned, new SafetensorsWriter().Peft("base_model.model.model.layers.0.self_attn.v_proj", 4, 64, 32)));
        var conv = new SafetensorsWriter()
            .Tensor("base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight", "F32", [4, 64, 1, 1])
            .Tensor("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight", "F32", [32, 4]);
        Assert.Contains("lora_A has shape [4, 64, 1, 1]; a LoRA factor is a matrix", Refusal(Json(), conv));
    }

    [Fact]
    public void An_adapter_for_a_4096_wide_model_is_refused_on_the_tiny_one()
    {
        var writer = new SafetensorsWriter();
        foreach (var (module, inDim, outDim) in new[] { ("q_proj", 4096, 4096), ("k_proj", 4096, 1024), ("v_proj", 4096, 1024) })
        {
            writer.Peft($"base_model.model.model.layers.0.self_attn.{module}", 16, inDim, outDim);
        }
        var message = Refusal(Json(r: 16, alpha: 32), writer);
        Assert.Contains("layer 0 q_proj: adapter in 4096, base model attn_q in 64", message);
        Assert.Contains("another base model", message);

        var deep = new SafetensorsWriter().Peft("base_model.model.model.layers.31.self_attn.q_proj", 4, 64, 64);
        Assert.Contains("layer 31 q_proj: the adapter has layer 31 but the base model (llama) has 2 layers (0–1)", Refusal(Json(), deep));
    }

    [Fact]
    public void Unknown_modules_and_tensors_are_refused_naming_the_tensor_and_the_arch()
    {
        var fused = new SafetensorsWriter().Peft("base_model.model.model.layers.0.self_attn.qkv_proj", 4, 64, 128);
        var message = Refusal(Json(extra: "\"target_modules\": [\"qkv_proj\"]"), fused);
        Assert.Contains("'base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight' targets module 'model.layers.0.self_attn.qkv_proj', which has no counterpart in a llama base model", message);

        var vision = new SafetensorsWriter().Peft("base_model.model.vision_tower.layers.0.q_proj", 4, 64, 64);
        Assert.Contains("which has no counterpart in a llama base model", Refusal(Json(), vision));

        var stray = new SafetensorsWriter().Peft("base_model.model.model.layers.0.self_attn.q_proj", 4, 64, 64).Tensor("optimizer.step", "F32", [1]);
        Assert.Contains("tensor 'optimizer.step' is not a PEFT LoRA tensor", Refusal(Json(), stray));
        Assert.Contains("for a llama base model", Refusal(Json(), stray));

        var untargeted = new SafetensorsWriter().Peft("base_model.model.model.layers.0.self_attn.o_proj", 4, 64, 64);
        Assert.Contains("layer 0 o_proj: the adapter has tensors for module 'model.layers.0.self_attn.o_proj' but adapter_config.json target_modules [q_proj, v_proj] does not include it",
            Refusal(Json(extra: "\"target_modules\": [\"q_proj\", \"v_proj\"]"), untargeted));
        Assert.Contains("target_modules '.*q_proj' does not include it",
            Refusal(Json(extra: "\"target_modules\": \".*q_proj\""), untargeted));
    }

    [Fact]
    public void Missing_base_tensors_are_refused()
    {
        var tied = _base with { Tensors = _base.Tensors.Where(t => t.Key != "output.weight").ToDictionary() };
        var lmHead = new SafetensorsWriter().Peft("base_model.model.lm_head", 4, 64, 320);
        Assert.Contains("lm_head: the base model (llama) has no output.weight (its output layer is tied to the token embeddings)",
            Refusal(Json(extra: "\"target_modules\": [\"lm_head\"]"), lmHead, tied));

        var noQ = _base with { Tensors = _base.Tensors.Where(t => t.Key != "blk.1.attn_q.weight").ToDictionary() };
        Assert.Contains("layer 1 q_proj: the base model (llama) has no tensor blk.1.attn_q.weight",
            Refusal(Json(), new SafetensorsWriter().Peft("base_model.model.model.layers.1.self_attn.q_proj", 4, 64, 64), noQ));
    }

    [Fact]
    public void NaN_and_infinity_are_refused_naming_the_tensor_and_nothing_is_left_behind()
    {
        foreach (var (dtype, bad) in new[] { ("F32", float.NaN), ("F16", float.PositiveInfinity), ("BF16", float.NaN), ("F32", float.NegativeInfinity) })
        {
            var fixture = new PeftAdapterFixture { Dtype = dtype, Targets = ["v_proj"] }.Generate(_model);
            fixture.Modules[1].B[17] = bad;
            var (configPath, weightsPath) = fixture.WriteTo(Path.Combine(_dir, "nan-" + dtype + bad));
            var output = Path.Combine(_dir, $"nan-{dtype}{bad}.gguf");

            var error = Assert.Throws<PeftAdapterException>(() =>
                PeftLoraConverter.Convert(PeftAdapterConfig.ReadFile(configPath), weightsPath, _base, output));

            Assert.Contains("tensor 'base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight' (model.layers.1.self_attn.v_proj) holds NaN or infinity (element 17)", error.Message);
            Assert.False(File.Exists(output), "a refused conversion leaves no output file");
        }
    }

    [Fact]
    public void A_scale_that_overflows_f16_is_refused()
    {
        var fixture = new PeftAdapterFixture { Dtype = "F16", Rank = 1, Alpha = 4, Targets = ["v_proj"], LayersToTransform = [0] }.Generate(_model);
        fixture.Modules[0].B[3] = 60000f;
        Assert.Contains("lora_B scaled by 4 overflows F16 (element 3)", ConvertRefusal(fixture));
    }

    [Fact]
    public void Huge_ranks_are_refused()
    {
        var wide = new LlamaCppBaseModel("llama", 16384, 128, 128, 1, 53248,
            new Dictionary<string, long[]> { ["blk.0.attn_q.weight"] = [16384, 16384] });
        var writer = new SafetensorsWriter().Peft("base_model.model.model.layers.0.self_attn.q_proj", 8192, 16384, 16384);
        // Validation only: the header describes 512 MB of (sparse) factors.
        var error = Assert.Throws<PeftAdapterException>(() => Validate(Config(Json(r: 8192)), writer, wide));
        Assert.Contains("layer 0 q_proj: rank 8192 is above the limit of 4096", error.Message);

        var overK = new SafetensorsWriter().Peft("base_model.model.model.layers.0.self_attn.k_proj", 48, 64, 32);
        Assert.Contains("rank 48 is above the limit of 32 (at most 4096, and never more than min(in, out) = 32)", Refusal(Json(r: 48), overK));
    }

    [Fact]
    public void A_truncated_safetensors_file_is_refused()
    {
        var (configPath, weightsPath) = new PeftAdapterFixture().Generate(_model).WriteTo(Path.Combine(_dir, "truncated"));
        var length = new FileInfo(weightsPath).Length;
        foreach (var keep in new[] { length - 1, length / 2, 100, 7, 0 })
        {
            using (var file = new FileStream(weightsPath, FileMode.Open))
            {
                file.SetLength(keep);
            }
            var output = Path.Combine(_dir, $"truncated-{keep}.gguf");
            var error = Assert.Throws<PeftAdapterException>(() =>
                PeftLoraConverter.Convert(PeftAdapterConfig.ReadFile(configPath), weightsPath, _base, output));
            Assert.StartsWith("adapter_model.safetensors is not a well-formed safetensors file: ", error.Message);
            Assert.False(File.Exists(output));
        }
    }

    [Fact]
    public void DoRA_is_refused_with_the_merge_alternative()
    {
        var dora = new PeftAdapterFixture { ConfigOverrides = { ["use_dora"] = "true" } }.Generate(_model);
        Assert.Contains("DoRA adapters are not supported by llama.cpp's runtime adapters", ConvertRefusal(dora));
        Assert.Contains("merge", ConvertRefusal(dora));

        // Magnitude vectors without use_dora (a config that lies) are refused too.
        var writer = new SafetensorsWriter()
            .Peft("base_model.model.model.layers.0.self_attn.q_proj", 4, 64, 64)
            .Tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", "F32", [64]);
        var message = Refusal(Json(), writer);
        Assert.Contains("is a DoRA magnitude vector: DoRA adapters are not supported by llama.cpp's runtime adapters", message);
    }

    [Fact]
    public void Raw_state_dict_names_are_refused_with_how_to_fix_them()
    {
        var named = new SafetensorsWriter()
            .Tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", "F32", [4, 64])
            .Tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight", "F32", [64, 4]);
        var message = Refusal(Json(), named);
        Assert.Contains("still carries the adapter name 'default'", message);
        Assert.Contains("save_pretrained", message);

        var baseLayer = new SafetensorsWriter()
            .Peft("base_model.model.model.layers.0.self_attn.q_proj", 4, 64, 64)
            .Tensor("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight", "F32", [64, 64]);
        Assert.Contains("is a full base-model weight or bias, not a LoRA factor", Refusal(Json(), baseLayer));

        var bias = new SafetensorsWriter()
            .Peft("base_model.model.model.layers.0.self_attn.q_proj", 4, 64, 64)
            .Tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", "F32", [64]);
        Assert.Contains("is a lora_B bias", Refusal(Json(), bias));
    }

    [Theory]
    [InlineData("\"peft_type\": \"IA3\"", "peft_type is 'IA3'; only LORA adapters")]
    [InlineData("\"bias\": \"all\"", "bias = \"all\": the adapter trained the base model's biases")]
    [InlineData("\"bias\": \"lora_only\"", "bias = \"lora_only\"")]
    [InlineData("\"lora_bias\": true", "lora_bias = true")]
    [InlineData("\"modules_to_save\": [\"lm_head\", \"embed_tokens\"]", "modules_to_save [lm_head, embed_tokens]: the adapter carries full copies")]
    [InlineData("\"fan_in_fan_out\": true", "fan_in_fan_out = true")]
    [InlineData("\"rank_pattern\": {\"(?P<x>q)_proj\": 2}", "'rank_pattern' entry '(?P<x>q)_proj' is not a regex this converter can read")]
    public void Features_llama_cpp_cannot_apply_are_refused(string field, string expected)
    {
        var (key, value) = (field[1..field.IndexOf('"', 1)], field[(field.IndexOf(':') + 1)..].Trim());
        var fixture = new PeftAdapterFixture { ConfigOverrides = { [key] = value } }.Generate(_model);
        Assert.Contains(expected, ConvertRefusal(fixture));
    }

    [Fact]
    public void Layers_outside_layers_to_transform_are_refused()
    {
        var fixture = new PeftAdapterFixture { Targets = ["q_proj"], ConfigOverrides = { ["layers_to_transform"] = "[1]" } }.Generate(_model);
        Assert.Contains("layer 0 q_proj: the adapter has tensors for layer 0 but adapter_config.json layers_to_transform is [1]", ConvertRefusal(fixture));

        var lmHead = new SafetensorsWriter().Peft("base_model.model.lm_head", 4, 64, 320);
        Assert.Contains("lm_head: the adapter has tensors for lm_head, which is in no layer, but adapter_config.json layers_to_transform [0] limits it to layers",
            Refusal(Json(extra: "\"layers_to_transform\": 0"), lmHead));
    }

    [Fact]
    public void Incomplete_empty_and_unsupported_dtype_adapters_are_refused()
    {
        var half = new SafetensorsWriter().Tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "F32", [4, 64]);
        Assert.Contains("module 'model.layers.0.self_attn.q_proj' has lora_A but no lora_B", Refusal(Json(), half));
        Assert.Contains("holds no LoRA tensors", Refusal(Json(), new SafetensorsWriter()));
        var twice = new SafetensorsWriter()
            .Peft("base_model.model.model.layers.0.self_attn.q_proj", 4, 64, 64)
            .Peft("model.layers.0.self_attn.q_proj", 4, 64, 64);
        Assert.Contains("tensors 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' and 'model.layers.0.self_attn.q_proj.lora_A.weight' are both lora_A of module 'model.layers.0.self_attn.q_proj'",
            Refusal(Json(), twice));
        var mixed = new SafetensorsWriter()
            .Tensor("base_model.model.model.embed_tokens.lora_A.weight", "F32", [4, 320])
            .Tensor("base_model.model.model.embed_tokens.lora_embedding_B", "F32", [64, 4]);
        Assert.Contains("has both lora_A/lora_B and lora_embedding_A/B tensors", Refusal(Json(), mixed));
        var linearEmbedding = new SafetensorsWriter().Peft("base_model.model.model.embed_tokens", 4, 320, 64);
        Assert.Contains("embed_tokens: an embedding layer's LoRA is saved as lora_embedding_A/B", Refusal(Json(), linearEmbedding));
        var int8 = new SafetensorsWriter().Peft("base_model.model.model.layers.0.self_attn.q_proj", 4, 64, 64, "I8");
        Assert.Contains("layer 0 q_proj: lora_A is I8; only F32, F16 and BF16 adapters can be converted", Refusal(Json(), int8));
    }

    [Fact]
    public void Random_header_changes_give_an_adapter_or_a_refusal_never_another_exception()
    {
        var fixture = new PeftAdapterFixture { Rank = 2, Targets = ["q_proj", "v_proj"] }.Generate(_model);
        var config = Config(fixture.ConfigJson());
        var original = fixture.Safetensors().ToBytes();
        var headerEnd = 8 + (int)BinaryPrimitives.ReadUInt64LittleEndian(original);
        var random = new Random(9);
        for (var round = 0; round < 1500; round++)
        {
            var bytes = (byte[])original.Clone();
            for (var changes = random.Next(1, 3); changes > 0; changes--)
            {
                bytes[random.Next(8, headerEnd)] = (byte)"0123456789,.:\"[]{}_ABFabq"[random.Next(25)];
            }
            try
            {
                PeftLoraConverter.Convert(config, new MemoryStream(bytes), _base, new MemoryStream());
            }
            catch (PeftAdapterException)
            {
            }
        }
    }

    // ---- helpers ---------------------------------------------------------------------------------------------------

    private static string Json(int r = 4, double alpha = 8, string? extra = null) =>
        $"{{\"peft_type\": \"LORA\", \"r\": {r}, \"lora_alpha\": {alpha}" + (extra is null ? "" : ", " + extra) + "}";

    private static PeftAdapterConfig Config(string json) => PeftAdapterConfig.Parse(Encoding.UTF8.GetBytes(json));

    private PeftConversionReport Validate(PeftAdapterConfig config, SafetensorsWriter writer, LlamaCppBaseModel? baseModel = null)
    {
        var path = writer.WriteTo(Path.Combine(_dir, Guid.NewGuid().ToString("n") + ".safetensors"));
        using var header = Safetensors.SafetensorsReader.ReadFile(path);
        return PeftLoraConverter.Validate(config, header, baseModel ?? _base);
    }

    /// <summary>The refusal of <c>Validate</c> and of <c>Convert</c> (which must agree), for a header-level problem.</summary>
    private string Refusal(string json, SafetensorsWriter writer, LlamaCppBaseModel? baseModel = null)
    {
        var validate = Assert.Throws<PeftAdapterException>(() => Validate(Config(json), writer, baseModel));
        using var adapter = new MemoryStream(writer.ToBytes());
        var convert = Assert.Throws<PeftAdapterException>(() => PeftLoraConverter.Convert(Config(json), adapter, baseModel ?? _base, new MemoryStream()));
        Assert.Equal(validate.Message, convert.Message);
        return convert.Message;
    }

    private string ConvertRefusal(PeftAdapterFixture fixture)
    {
        using var adapter = new MemoryStream(fixture.Safetensors().ToBytes());
        return Assert.Throws<PeftAdapterException>(() =>
            PeftLoraConverter.Convert(Config(fixture.ConfigJson()), adapter, _base, new MemoryStream())).Message;
    }

    private (PeftConversionReport, GgufFile, byte[]) Convert(PeftAdapterFixture fixture, LlamaCppBaseModel? baseModel = null)
    {
        using var adapter = new MemoryStream(fixture.Safetensors().ToBytes());
        var output = new MemoryStream();
        var report = PeftLoraConverter.Convert(Config(fixture.ConfigJson()), adapter, baseModel ?? _base, output);
        var bytes = output.ToArray();
        return (report, GgufReader.Read(new MemoryStream(bytes)), bytes);
    }

    private static float[] Floats(GgufFile gguf, byte[] bytes, string tensor)
    {
        var info = gguf.TensorsByName[tensor];
        var span = bytes.AsSpan((int)(gguf.DataOffset + info.Offset), (int)info.ByteLength);
        var values = new float[span.Length / 4];
        for (var i = 0; i < values.Length; i++)
        {
            values[i] = BinaryPrimitives.ReadSingleLittleEndian(span[(i * 4)..]);
        }
        return values;
    }

    private static Half[] Halves(GgufFile gguf, byte[] bytes, string tensor)
    {
        var info = gguf.TensorsByName[tensor];
        var span = bytes.AsSpan((int)(gguf.DataOffset + info.Offset), (int)info.ByteLength);
        var values = new Half[span.Length / 2];
        for (var i = 0; i < values.Length; i++)
        {
            values[i] = BinaryPrimitives.ReadHalfLittleEndian(span[(i * 2)..]);
        }
        return values;
    }

    private static void AssertInterleaved(float[] source, float[] written, int rows, int headDim, int rank, float scale)
    {
        for (var head = 0; head < rows / headDim; head++)
        {
            for (var i = 0; i < headDim / 2; i++)
            {
                for (var j = 0; j < 2; j++)
                {
                    var to = head * headDim + 2 * i + j;
                    var from = head * headDim + j * (headDim / 2) + i;
                    for (var k = 0; k < rank; k++)
                    {
                        Assert.Equal((float)(source[from * rank + k] * (double)scale), written[to * rank + k]);
                    }
                }
            }
        }
    }
}
