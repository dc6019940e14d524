using System.Text.Json;
using LoraDeploy.Lora.Conversion;
using LoraDeploy.Lora.Tests.Support;

namespace LoraDeploy.Lora.Tests.Conversion;

/// <summary>
/// Every real-world layout (Fixtures/realworld-lora-headers) converted to each convention: either every module comes
/// out (no leftovers, checked by reading the output back) or the refusal names the reason.
/// </summary>
public sealed class ConvertRealWorldHeaderTests : IDisposable
{
    private readonly string _dir = TempFiles.Directory();

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    public static TheoryData<string, AdapterConvention> Cases()
    {
        var data = new TheoryData<string, AdapterConvention>();
        foreach (var file in Directory.GetFiles(Path.Combine(AppContext.BaseDirectory, "Fixtures", "realworld-lora-headers", "headers"), "*.json").Order())
        {
            foreach (var to in Enum.GetValues<AdapterConvention>())
            {
                data.Add(Path.GetFileNameWithoutExtension(file), to);
            }
        }
        return data;
    }

    private const string Unknown = "name no SD1.5, SDXL or FLUX.1 layer this converter knows";

    /// <summary>Fixture → the refusal expected for (kohya, peft, diffusers); absent: converts.</summary>
    private static readonly Dictionary<string, string[]> Refusals = new(StringComparer.Ordinal)
    {
        ["anima__invoke-kohya-sample"] = [Unknown, Unknown, Unknown],
        ["anima__invoke-kohya-te-sample"] = [Unknown, Unknown, Unknown],
        ["anima__invoke-lokr-dora-synthetic"] = [Unknown, Unknown, Unknown],
        ["anima__invoke-peft-sample"] = [Unknown, Unknown, Unknown],
        ["krea2__invoke-kohya-subset"] = [Unknown, Unknown, Unknown],
        ["qwen-image__invoke-kohya-lokr-synthetic"] = [Unknown, Unknown, Unknown],
        ["qwen-image__invoke-diffusers-synthetic"] = [.. Enumerable.Repeat("without the FLUX.1 'transformer.' prefix, which Qwen-Image shares", 3)],
        // BFL Control-LoRA: norm scales to replace, not an adapter.
        ["flux1__invoke-control-lora-depth"] = [.. Enumerable.Repeat("'double_blocks.0.img_attn.norm.key_norm.scale' (a Scale parameter, a network type convert does not carry)", 3)],
        ["flux1__invoke-lokr-bfl-synthetic"] = [null!, .. Enumerable.Repeat("it is LoKr; only LoRA modules can be split into q, k, v", 2)],
        // OneTrainer DoRA: magnitudes per input channel.
        ["flux1__invoke-onetrainer-dora-ball"] =
        [
            "exactly: DoRA normalises rows, which needs every part with a per-output-row magnitude of one convention",
            .. Enumerable.Repeat("has a DoRA magnitude per input channel ([1, 3]), which PEFT's lora_magnitude_vector (per output row) cannot express", 2),
        ],
        ["flux1__invoke-onetrainer-dora-dreamtown"] =
        [
            "exactly: DoRA normalises rows, which needs every part with a per-output-row magnitude of one convention",
            .. Enumerable.Repeat("has a DoRA magnitude per input channel ([1, 12]), which PEFT's lora_magnitude_vector (per output row) cannot express", 2),
        ],
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void Converts_with_no_leftovers_or_says_why_not(string fixture, AdapterConvention to)
    {
        var input = Materialise(fixture, out var moduleCount);
        var output = Path.Combine(_dir, $"{fixture}.{to}.safetensors");
        var refusal = Refusals.GetValueOrDefault(fixture)?[(int)to];
        if (refusal is not null)
        {
            var e = Assert.Throws<AdapterConvertException>(() => AdapterConverter.Convert(input, to, output));
            Assert.Contains(refusal, e.Message);
            Assert.False(File.Exists(output));
            Assert.False(File.Exists(output + ".part"));
            return;
        }

        var result = AdapterConverter.Convert(input, to, output);

        Assert.Equal(moduleCount, result.ModulesIn);
        Assert.Equal(AdapterArchitecture.Flux1, result.Architecture);
        // No leftovers: the output holds as many modules as reported, and converted again to its own convention it
        // keeps them all (every name it wrote is one the converter reads).
        var again = AdapterConverter.Convert(output, to, Path.Combine(_dir, $"{fixture}.{to}.again.safetensors"));
        Assert.Equal(result.ModulesOut, again.ModulesIn);
        Assert.Equal(result.ModulesOut, again.ModulesOut);
        Assert.Empty(again.RankGrown);
    }

    /// <summary>
    /// The fixture as a safetensors file: zero factors (sparse), alphas 4, and every width that is a multiple of 256
    /// from 768 up divided by 256 (3072 → 12, linear1's 21504 → 84), so the files are small but keep the model's
    /// proportions (ranks stay as they are); real sizes made this take minutes of disk writes.
    /// </summary>
    private string Materialise(string fixture, out int moduleCount)
    {
        using var json = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(AppContext.BaseDirectory, "Fixtures", "realworld-lora-headers", "headers", fixture + ".json")));
        var writer = new SafetensorsWriter();
        var modules = new HashSet<string>(StringComparer.Ordinal);
        foreach (var tensor in json.RootElement.GetProperty("tensors").EnumerateObject())
        {
            var dtype = tensor.Value.GetProperty("dtype").GetString()!;
            long[] shape = [.. tensor.Value.GetProperty("shape").EnumerateArray().Select(d => d.GetInt64() is var n && n >= 768 && n % 256 == 0 ? n / 256 : n)];
            writer.Tensor(tensor.Name, dtype, shape, tensor.Name.EndsWith(".alpha", StringComparison.Ordinal) && dtype == "F16" && shape.Length == 0 ? SafetensorsWriter.Half(4) : null);
            LoraKeys.Split(tensor.Name, out var length);
            modules.Add(tensor.Name[..length]);
        }
        moduleCount = modules.Count;
        return writer.WriteTo(Path.Combine(_dir, fixture + ".safetensors"));
    }
}
