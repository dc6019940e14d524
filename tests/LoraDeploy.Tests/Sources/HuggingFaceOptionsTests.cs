using LoraDeploy.Sources;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Tests.Sources;

public class HuggingFaceOptionsTests
{
    [Fact]
    public void The_default_base_url_is_the_public_hub()
    {
        using var sp = Build([]);
        Assert.Equal(new Uri("https://huggingface.co/"), sp.GetRequiredService<IOptions<HuggingFaceOptions>>().Value.GetBaseUri());
    }

    [Theory]
    [InlineData("huggingface.co", "HuggingFace:BaseUrl must be an absolute http(s) URL; got 'huggingface.co'")]
    [InlineData("ftp://huggingface.co", "HuggingFace:BaseUrl must be an absolute http(s) URL")]
    [InlineData("https://huggingface.co/?x=1", "HuggingFace:BaseUrl must be a plain URL like https://huggingface.co, without user, query or fragment")]
    [InlineData("https://me@huggingface.co", "without user, query or fragment")]
    public void A_bad_base_url_fails_with_the_setting_named(string value, string expected)
    {
        using var sp = Build(new() { ["HuggingFace:BaseUrl"] = value });
        var ex = Assert.ThrowsAny<OptionsValidationException>(() => sp.GetRequiredService<IOptions<HuggingFaceOptions>>().Value);
        Assert.Contains(expected, ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_bad_base_url_stops_the_host_at_start()
    {
        var builder = Microsoft.Extensions.Hosting.Host.CreateApplicationBuilder();
        builder.Configuration.AddInMemoryCollection(new Dictionary<string, string?> { ["HuggingFace:BaseUrl"] = "not a url" });
        builder.Services.AddSources(builder.Configuration);
        using var host = builder.Build();

        var ex = await Assert.ThrowsAsync<OptionsValidationException>(() => host.StartAsync(TestContext.Current.CancellationToken));

        Assert.Contains("HuggingFace:BaseUrl", ex.Message, StringComparison.Ordinal);
    }

    private static ServiceProvider Build(Dictionary<string, string?> settings)
    {
        var services = new ServiceCollection();
        services.AddLogging();
        services.AddSources(new ConfigurationBuilder().AddInMemoryCollection(settings).Build());
        return services.BuildServiceProvider();
    }
}
