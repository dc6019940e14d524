using LoraDeploy.Sources;

namespace LoraDeploy.Tests.Sources;

public class CivitaiUrlTests
{
    [Theory]
    [InlineData("https://civitai.com/models/123", 123, null, null)]
    [InlineData("https://civitai.com/models/123/some-slug", 123, null, null)]
    [InlineData("https://www.civitai.com/models/123/slug/more/parts?modelVersionId=456", 123, 456, null)]
    [InlineData("civitai.com/models/123?dialog=commentThread&modelVersionId=456&highlight=9", 123, 456, null)]
    [InlineData("https://civitai.red/models/123/slug?MODELVERSIONID=456", 123, 456, null)]
    [InlineData("https://www.civitai.red/models/123", 123, null, null)]
    [InlineData("https://civitai.green/models/123/", 123, null, null)]
    [InlineData("  HTTPS://CIVITAI.COM/models/123#images  ", 123, null, null)]
    [InlineData("http://civitai.com/models/2147483647", 2147483647, null, null)]
    [InlineData("https://civitai.com/model-versions/456", null, 456, null)]
    [InlineData("https://civitai.com/api/download/models/456", null, 456, null)]
    [InlineData("https://civitai.com/api/download/models/456?fileId=789", null, 456, 789)]
    [InlineData("https://civitai.com/api/download/models/456?token=abc&fileId=789", null, 456, 789)]
    [InlineData("https://civitai.com/api/v1/model-versions/456", null, 456, null)]
    [InlineData("https://civitai.com/api/v1/models/123", 123, null, null)]
    [InlineData("urn:air:sdxl:lora:civitai:123@456", 123, 456, null)]
    [InlineData("urn:air:sdxl:lora:civitai:123", 123, null, null)]
    [InlineData("air:flux1:lora:civitai:123@456+789", 123, 456, 789)]
    [InlineData("sdxl:lora:civitai:123@456", 123, 456, null)]
    [InlineData("urn:air:SDXL:LoRA:CivitAI:123@456+789.safetensors", 123, 456, 789)]
    public void Parses_every_documented_form(string input, int? modelId, int? versionId, int? fileId)
    {
        Assert.True(CivitaiUrl.TryParse(input, out var r, out var error), error);
        Assert.Equal(modelId, r.ModelId);
        Assert.Equal(versionId, r.VersionId);
        Assert.Equal(fileId, r.FileId);
        Assert.Equal("", error);
    }

    [Fact]
    public void Download_link_keeps_the_file_selector()
    {
        Assert.True(CivitaiUrl.TryParse("https://civitai.com/api/download/models/456?type=Pruned%20Model&format=SafeTensor&size=pruned&fp=fp16", out var r, out _));
        Assert.Equal(("Pruned Model", "SafeTensor", "pruned", "fp16"), (r.FileType, r.Format, r.Size, r.Fp));
        Assert.Equal("https://civitai.com/api/download/models/456?type=Pruned%20Model&format=SafeTensor&size=pruned&fp=fp16", r.CanonicalUrl);
    }

    [Theory]
    [InlineData("", "empty")]
    [InlineData("   ", "empty")]
    [InlineData("https://example.com/models/123", "example.com")]
    [InlineData("https://civitai.com.evil.example/models/1", "not a CivitAI host")]
    [InlineData("https://huggingface.co/org/repo", "not a CivitAI host")]
    [InlineData("https://civitai.com:8443/models/1", "port")]
    [InlineData("ftp://civitai.com/models/1", "not a CivitAI link")]
    [InlineData("https://civitai.com/models/0", "'0' is not a valid CivitAI model id")]
    [InlineData("https://civitai.com/models/2147483648", "'2147483648' is not a valid CivitAI model id")]
    [InlineData("https://civitai.com/models/-1", "'-1' is not a valid CivitAI model id")]
    [InlineData("https://civitai.com/models/abc", "model id")]
    [InlineData("https://civitai.com/models/1?modelVersionId=0", "version id")]
    [InlineData("https://civitai.com/model-versions/99999999999", "version id")]
    [InlineData("https://civitai.com/api/download/models/1?fileId=x", "file id")]
    [InlineData("https://civitai.com/user/someone", "not a CivitAI model link")]
    [InlineData("https://civitai.com/api/v1/model-versions/by-hash/ABCDEF0123", "hash")]
    [InlineData("urn:air:sdxl:lora:huggingface:1@2", "only CivitAI AIRs")]
    [InlineData("urn:air:sdxl:lora:civitai:0@2", "model id")]
    [InlineData("urn:air:sdxl:lora:civitai:1+5", "version")]
    [InlineData("urn:air:nonsense", "malformed")]
    public void Refuses_with_a_clear_sentence(string input, string expected)
    {
        Assert.False(CivitaiUrl.TryParse(input, out _, out var error));
        Assert.Contains(expected, error, StringComparison.OrdinalIgnoreCase);
    }

    [Theory]
    [InlineData("https://civitai.com/api/download/models/456?token=SECRET123&fileId=7", "https://civitai.com/api/download/models/456?fileId=7")]
    [InlineData("https://civitai.red/models/12?token=SECRET123&modelVersionId=34", "https://civitai.red/models/12?modelVersionId=34")]
    [InlineData("https://www.civitai.com/api/download/models/456?token=SECRET123", "https://civitai.com/model-versions/456")]
    public void Token_is_dropped_from_everything_that_can_be_stored_or_logged(string input, string canonical)
    {
        Assert.True(CivitaiUrl.TryParse(input, out var r, out _));
        Assert.Equal(canonical, r.CanonicalUrl);
        Assert.Equal(canonical, r.ToString());
        Assert.DoesNotContain("SECRET", r.ToString(), StringComparison.Ordinal);
        Assert.DoesNotContain("SECRET", $"{r with { }}", StringComparison.Ordinal);
    }

    [Fact]
    public void Errors_never_echo_the_query()
    {
        Assert.False(CivitaiUrl.TryParse("https://evil.example/models/1?token=SECRET123", out _, out var e1));
        Assert.False(CivitaiUrl.TryParse("https://civitai.com/nope?token=SECRET123", out _, out var e2));
        Assert.DoesNotContain("SECRET", e1, StringComparison.Ordinal);
        Assert.DoesNotContain("SECRET", e2, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("https://civitai.com/models/123/slug", "https://civitai.com/models/123")]
    [InlineData("https://www.civitai.green/models/123?modelVersionId=456&x=1", "https://civitai.green/models/123?modelVersionId=456")]
    [InlineData("https://civitai.com/api/v1/model-versions/456", "https://civitai.com/model-versions/456")]
    [InlineData("air:sdxl:lora:civitai:123@456", "urn:air:sdxl:lora:civitai:123@456")]
    public void Canonical_url_is_normalised(string input, string canonical)
    {
        Assert.True(CivitaiUrl.TryParse(input, out var r, out _));
        Assert.Equal(canonical, r.CanonicalUrl);
    }
}
