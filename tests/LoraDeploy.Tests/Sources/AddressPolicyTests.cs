using System.Net;
using LoraDeploy.Sources;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Tests.Sources;

public class AddressPolicyTests
{
    [Theory]
    [InlineData("127.0.0.1", "loopback")]
    [InlineData("127.255.0.9", "loopback")]
    [InlineData("10.1.2.3", "private")]
    [InlineData("172.16.0.1", "private")]
    [InlineData("172.31.255.255", "private")]
    [InlineData("192.168.1.1", "private")]
    [InlineData("169.254.169.254", "link-local")]
    [InlineData("100.64.0.1", "carrier-grade NAT")]
    [InlineData("100.127.255.255", "carrier-grade NAT")]
    [InlineData("224.0.0.1", "multicast")]
    [InlineData("0.0.0.0", "unspecified")]
    [InlineData("255.255.255.255", "broadcast")]
    [InlineData("::1", "loopback")]
    [InlineData("::", "unspecified")]
    [InlineData("fc00::1", "unique local")]
    [InlineData("fd12:3456::1", "unique local")]
    [InlineData("fe80::1", "link-local")]
    [InlineData("ff02::1", "multicast")]
    [InlineData("::ffff:127.0.0.1", "IPv4-mapped loopback")]
    [InlineData("::ffff:10.0.0.1", "IPv4-mapped private")]
    [InlineData("::127.0.0.1", "IPv4-compatible loopback")]
    [InlineData("2002:7f00:1::1", "6to4 loopback")]
    [InlineData("2002:a9fe:a9fe::", "6to4 link-local")]
    [InlineData("64:ff9b::a00:1", "NAT64 private")]
    [InlineData("64:ff9b:1::c0a8:101", "NAT64 private")]
    public void Refuses_non_public_addresses(string address, string category) =>
        Assert.Equal(category, AddressPolicy.Classify(IPAddress.Parse(address)));

    [Theory]
    [InlineData("8.8.8.8")]
    [InlineData("172.32.0.1")]
    [InlineData("100.128.0.1")]
    [InlineData("104.18.1.1")]
    [InlineData("2606:4700::1111")]
    [InlineData("::ffff:8.8.8.8")]
    [InlineData("64:ff9b::808:808")]
    [InlineData("2002:808:808::1")]
    public void Allows_public_addresses(string address) =>
        Assert.Null(AddressPolicy.Classify(IPAddress.Parse(address)));

    [Fact]
    public void Allowed_ranges_cover_mapped_forms_too()
    {
        IReadOnlyList<IPNetwork> allowed = [IPNetwork.Parse("127.0.0.1/32")];
        Assert.Null(AddressPolicy.Check(IPAddress.Parse("127.0.0.1"), allowed));
        Assert.Null(AddressPolicy.Check(IPAddress.Parse("::ffff:127.0.0.1"), allowed));
        Assert.Equal("loopback", AddressPolicy.Check(IPAddress.Parse("127.0.0.2"), allowed));
        Assert.Equal("loopback", AddressPolicy.Check(IPAddress.Parse("::1"), allowed));
    }

    [Fact]
    public void Defaults_validate_with_no_configuration()
    {
        using var sp = Build([]);
        Assert.Empty(sp.GetRequiredService<IOptions<NetworkOptions>>().Value.AllowedPrivateRanges);
        Assert.Equal("https://civitai.com", sp.GetRequiredService<IOptions<CivitaiOptions>>().Value.BaseUrl);
        Assert.Equal(4L * 1024 * 1024 * 1024, sp.GetRequiredService<IOptions<ImportOptions>>().Value.MaxFileBytes);
    }

    [Theory]
    [InlineData("Network:AllowedPrivateRanges:0", "10.0.0.0/33", "10.0.0.0/33")]
    [InlineData("Network:AllowedPrivateRanges:0", "10.0.0.1/8", "host bits")]
    [InlineData("Network:AllowedPrivateRanges:0", "not-an-ip", "not-an-ip")]
    [InlineData("Civitai:BaseUrl", "civitai.com", "Civitai:BaseUrl")]
    [InlineData("Import:MaxFileBytes", "0", "Import:MaxFileBytes")]
    [InlineData("Import:MinBytesPerSecond", "-1", "Import:MinBytesPerSecond")]
    [InlineData("Import:MinRateWindow", "00:00:00", "Import:MinRateWindow")]
    [InlineData("Import:MaxApiBodyBytes", "10", "Import:MaxApiBodyBytes")]
    [InlineData("Import:ApiBodyTimeout", "00:00:00", "Import:ApiBodyTimeout")]
    public void Bad_settings_fail_with_the_setting_named(string key, string value, string expected)
    {
        using var sp = Build(new() { [key] = value });
        var ex = Assert.ThrowsAny<OptionsValidationException>(() =>
        {
            _ = sp.GetRequiredService<IOptions<NetworkOptions>>().Value;
            _ = sp.GetRequiredService<IOptions<CivitaiOptions>>().Value;
            _ = sp.GetRequiredService<IOptions<ImportOptions>>().Value;
        });
        Assert.Contains(expected, ex.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_single_entry_may_list_several_ranges()
    {
        using var sp = Build(new() { ["Network:AllowedPrivateRanges:0"] = "10.0.0.0/8, 192.168.0.0/16" });
        Assert.Equal(2, sp.GetRequiredService<IOptions<NetworkOptions>>().Value.ParsedRanges().Count);
    }

    private static ServiceProvider Build(Dictionary<string, string?> settings)
    {
        var services = new ServiceCollection();
        services.AddLogging();
        services.AddSources(new ConfigurationBuilder().AddInMemoryCollection(settings).Build());
        return services.BuildServiceProvider();
    }
}

public class AddSourcesHostTests
{
    [Fact]
    public async Task Bad_settings_stop_the_host_at_start()
    {
        var builder = Microsoft.Extensions.Hosting.Host.CreateApplicationBuilder();
        builder.Configuration.AddInMemoryCollection(new Dictionary<string, string?> { ["Network:AllowedPrivateRanges:0"] = "10.0.0.0/99" });
        builder.Services.AddSources(builder.Configuration);
        using var host = builder.Build();

        var ex = await Assert.ThrowsAsync<OptionsValidationException>(() => host.StartAsync(TestContext.Current.CancellationToken));

        Assert.Contains("Network:AllowedPrivateRanges", ex.Message, StringComparison.Ordinal);
    }
}
