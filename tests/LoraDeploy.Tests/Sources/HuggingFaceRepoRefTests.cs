using LoraDeploy.Sources;

namespace LoraDeploy.Tests.Sources;

public class HuggingFaceRepoRefTests
{
    private static readonly Uri Mirror = new("http://127.0.0.1:8123/");

    [Theory]
    [InlineData("owner/repo", "owner", "repo", null)]
    [InlineData("  Org-1/My_Adapter.v2  ", "Org-1", "My_Adapter.v2", null)]
    [InlineData("owner/repo@main", "owner", "repo", "main")]
    [InlineData("owner/repo@v1.0", "owner", "repo", "v1.0")]
    [InlineData("owner/repo@refs/pr/1", "owner", "repo", "refs/pr/1")]
    [InlineData("owner/repo@0123456789abcdef0123456789abcdef01234567", "owner", "repo", "0123456789abcdef0123456789abcdef01234567")]
    [InlineData("https://huggingface.co/owner/repo", "owner", "repo", null)]
    [InlineData("https://huggingface.co/owner/repo/", "owner", "repo", null)]
    [InlineData("https://www.huggingface.co/owner/repo?library=peft#model-card", "owner", "repo", null)]
    [InlineData("HTTPS://HuggingFace.co/owner/repo", "owner", "repo", null)]
    [InlineData("huggingface.co/owner/repo", "owner", "repo", null)]
    [InlineData("https://hf.co/owner/repo", "owner", "repo", null)]
    [InlineData("https://huggingface.co/owner/repo/tree/dev", "owner", "repo", "dev")]
    [InlineData("https://huggingface.co/owner/repo/tree/refs%2Fpr%2F3", "owner", "repo", "refs/pr/3")]
    [InlineData("https://huggingface.co/owner/repo/blob/main/adapter_config.json", "owner", "repo", "main")]
    [InlineData("https://huggingface.co/owner/repo/resolve/v2/adapter_model.safetensors", "owner", "repo", "v2")]
    [InlineData("http://127.0.0.1:8123/owner/repo/tree/v1", "owner", "repo", "v1")]
    public void Parses_every_accepted_form(string input, string owner, string name, string? revision)
    {
        Assert.True(HuggingFaceRepoRef.TryParse(input, Mirror, out var r, out var error), error);
        Assert.Equal((owner, name, revision), (r.Owner, r.Name, r.Revision));
        Assert.Equal($"{owner}/{name}", r.RepoId);
        Assert.Equal("", error);
    }

    [Fact]
    public void ToString_names_repo_and_revision()
    {
        Assert.True(HuggingFaceRepoRef.TryParse("https://huggingface.co/a/b/tree/dev", null, out var r, out _));
        Assert.Equal("a/b@dev", r.ToString());
    }

    [Theory]
    [InlineData("", "is empty; give it as owner/repo, owner/repo@revision or https://huggingface.co/owner/repo[/tree/revision]")]
    [InlineData("   ", "is empty")]
    [InlineData("gpt2", "'gpt2' names no owner; give the repo as owner/repo")]
    [InlineData("a/b/c", "'a/b/c' is not owner/repo")]
    [InlineData("owner/repo@", "names no revision after '@'")]
    [InlineData("owner/re po", "'re po' is not a valid Hugging Face repo name")]
    [InlineData("owner/-repo", "'-repo' is not a valid Hugging Face repo name")]
    [InlineData("owner/a--b", "no '--' or '..'")]
    [InlineData("own..er/repo", "is not a valid Hugging Face owner")]
    [InlineData("owner/repo.git", "ends with .git")]
    [InlineData("https://example.com/owner/repo", "example.com is not a Hugging Face host")]
    [InlineData("https://huggingface.co.evil.example/owner/repo", "is not a Hugging Face host")]
    [InlineData("http://127.0.0.1:9999/owner/repo", "127.0.0.1 is not a Hugging Face host")]
    [InlineData("ftp://huggingface.co/owner/repo", "not an http(s) URL")]
    [InlineData("https://huggingface.co/datasets/owner/data", "points at a Hugging Face dataset, not a model repo")]
    [InlineData("https://huggingface.co/spaces/owner/app", "points at a Hugging Face Space, not a model repo")]
    [InlineData("https://huggingface.co/owner", "names no repo, only 'owner'")]
    [InlineData("https://huggingface.co/", "names no repo")]
    [InlineData("https://huggingface.co/owner/repo/tree/main/checkpoint-500", "points at a folder inside the repo (checkpoint-500)")]
    [InlineData("https://huggingface.co/owner/repo/discussions/4", "is not a repo page")]
    [InlineData("owner/repo@bad\u0001rev", "contains control characters")]
    public void Bad_forms_get_a_sentence_naming_the_expected_form(string input, string expected)
    {
        Assert.False(HuggingFaceRepoRef.TryParse(input, Mirror, out _, out var error));
        Assert.Contains(expected, error);
    }
}
