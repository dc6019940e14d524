using System.Net;
using System.Net.Http.Headers;
using System.Text;

namespace LoraDeploy.Tests.Api;

/// <summary>Text a database and a terminal cannot hold is a 422 naming the field, never a 500 (issue 16, finding 19).</summary>
public abstract partial class ControlPlaneTests
{
    /// <summary>Each kind of bad text, as the raw bytes of a JSON string's inside.</summary>
    public static TheoryData<string, string> BadTexts()
    {
        var data = new TheoryData<string, string>();
        string[] createFields = ["lora_name", "base_model", "source.type", "source.civit_url", "description"];
        string[] kinds = ["lone-surrogate", "invalid-utf8", "nul"];
        foreach (var field in createFields)
        {
            foreach (var kind in kinds)
            {
                data.Add(field, kind);
            }
        }
        return data;
    }

    private static byte[] BadTextBytes(string kind) => kind switch
    {
        "lone-surrogate" => "a\\ud800"u8.ToArray(), // escaped in the JSON, as the attack sent it
        "invalid-utf8" => [(byte)'a', 0xC3, 0x28, 0xFF],
        "nul" => "a\\u0000b"u8.ToArray(),
        _ => throw new ArgumentOutOfRangeException(nameof(kind)),
    };

    /// <summary>A JSON body whose <c>"BAD"</c> string's inside is replaced by raw bytes.</summary>
    private static ByteArrayContent RawJson(string json, byte[] bad)
    {
        var template = Encoding.UTF8.GetBytes(json);
        var marker = "BAD"u8.ToArray();
        var at = template.AsSpan().IndexOf(marker);
        Assert.True(at >= 0);
        var body = template[..at].Concat(bad).Concat(template[(at + marker.Length)..]).ToArray();
        var content = new ByteArrayContent(body);
        content.Headers.ContentType = new MediaTypeHeaderValue("application/json");
        return content;
    }

    [Theory]
    [MemberData(nameof(BadTexts))]
    public async Task Create_answers_422_naming_the_field_for_bad_text(string field, string kind)
    {
        var alice = await Server.CreateUserAsync("alice");
        string Value(string name, string good) => field == name ? "BAD" : good;
        var json = $$"""
            {"lora_name": "{{Value("lora_name", "bad-text")}}", "base_model": "{{Value("base_model", Flux)}}",
             "source": {"type": "{{Value("source.type", "civitai")}}", "civit_url": "{{Value("source.civit_url", CivitUrl)}}"},
             "private": true, "description": "{{Value("description", "fine")}}"}
            """;

        var response = await alice.Client.PostAsync("/v1/lora/create", RawJson(json, BadTextBytes(kind)));

        var error = await response.ExpectValidationErrorAsync(["body", .. field.Split('.')]);
        Assert.Equal("string_unicode", error.GetProperty("type").GetString());
        var mine = await (await alice.Client.GetAsync("/v1/user/loras")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(0, mine.GetArrayLength());
    }

    [Theory]
    [InlineData("lone-surrogate")]
    [InlineData("invalid-utf8")]
    [InlineData("nul")]
    public async Task Patch_answers_422_naming_the_field_for_bad_text(string kind)
    {
        var alice = await Server.CreateUserAsync("alice");
        await CreateAsync(alice, "patched");

        var response = await alice.Client.PatchAsync("/v1/lora/patched", RawJson("""{"description": "BAD"}""", BadTextBytes(kind)));

        var error = await response.ExpectValidationErrorAsync("body", "description");
        Assert.Equal("string_unicode", error.GetProperty("type").GetString());
        var lora = await (await alice.Client.GetAsync("/v1/lora/patched")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal("", lora.GetProperty("description").GetString());
    }

    [Theory]
    [InlineData("a-pub\n")]
    [InlineData("a-pub\r\n")]
    public async Task A_name_with_a_trailing_line_break_is_refused(string name)
    {
        // "$" matches before a final "\n": "alice/a-pub\n" was listed beside "alice/a-pub" on the public list.
        var alice = await Server.CreateUserAsync("alice");

        var response = await alice.Client.PostJsonAsync("/v1/lora/create", CreateBody(name, isPrivate: false));

        await response.ExpectValidationErrorAsync("body", "lora_name");
        Assert.False(LoraDeploy.Loras.LoraNames.IsValid("a-pub\n"));
    }
}
