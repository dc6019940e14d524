using System.ComponentModel.DataAnnotations;
using System.Text.Json;
using LoraDeploy.Pipeline;
using LoraDeploy.Sources;
using LoraDeploy.Tests.Simulator;

namespace LoraDeploy.Tests.Sources;

/// <summary>CivitAI's license fields as read, and the policy rules over them.</summary>
public class CivitaiLicenseTests
{
    public static TheoryData<string, string[]?> CommercialUseForms => new()
    {
        { "\"{Image,RentCivit}\"", ["Image", "RentCivit"] },
        { "\"{Image,RentCivit,Rent,Sell}\"", ["Image", "RentCivit", "Rent", "Sell"] },
        { "\"{\\\"Image\\\", Sell}\"", ["Image", "Sell"] },
        { "\"{}\"", [] },
        { "\"{None}\"", [] },
        { "\"None\"", [] },
        { "\"Rent\"", ["Rent"] },
        { "[\"Image\",\"Sell\"]", ["Image", "Sell"] },
        { "[]", [] },
        { "[\"None\"]", [] },
        { "null", null },
        { "42", null },
    };

    [Theory]
    [MemberData(nameof(CommercialUseForms))]
    public void AllowCommercialUse_is_normalised_from_every_form(string json, string[]? expected)
    {
        var parsed = CivitaiLicense.ParseCommercialUse(JsonDocument.Parse(json).RootElement.Clone());

        if (expected is null)
        {
            Assert.Null(parsed);
        }
        else
        {
            Assert.Equal(expected, parsed);
        }
    }

    [Fact]
    public void AllowCommercialUse_absent_is_unknown() => Assert.Null(CivitaiLicense.ParseCommercialUse(null));

    [Theory]
    [InlineData(1, "PG")]
    [InlineData(3, "PG13")]
    [InlineData(7, "R")]
    [InlineData(12, "X")]
    [InlineData(31, "XXX")]
    [InlineData(33, "Blocked")]
    public void Nsfw_level_is_its_highest_flag(int level, string name) => Assert.Equal(name, NsfwLevels.Highest(level)!.Value.Name);

    [Fact]
    public void Nsfw_level_zero_is_unrated() => Assert.Null(NsfwLevels.Highest(0));

    private static readonly CivitaiLicense Typical = new()
    {
        AllowCommercialUse = ["Image", "RentCivit"],
        AllowDerivatives = true,
        AllowDifferentLicense = false,
        AllowNoCredit = true,
        NsfwLevel = 7,
        Creator = "someone",
    };

    [Fact]
    public void No_rule_set_allows_anything() => Assert.Null(PolicyGate.Check(new PolicyOptions(), 5, Typical with { NsfwLevel = 31, AllowCommercialUse = [] }));

    [Theory]
    [InlineData("image", null)]
    [InlineData("rentcivit", null)]
    [InlineData("RENT", "refused by policy: Policy:RequireCommercialUse is rent, this model allows commercial use for Image, RentCivit, not Rent")]
    [InlineData("sell", "refused by policy: Policy:RequireCommercialUse is sell, this model allows commercial use for Image, RentCivit, not Sell")]
    public void RequireCommercialUse_names_the_missing_permission(string setting, string? expected) =>
        Assert.Equal(expected, PolicyGate.Check(new PolicyOptions { RequireCommercialUse = setting }, 5, Typical));

    [Fact]
    public void RequireCommercialUse_refuses_None_and_unknown_terms()
    {
        var policy = new PolicyOptions { RequireCommercialUse = "image" };
        Assert.Contains("allows commercial use for nothing (None)", PolicyGate.Check(policy, 5, Typical with { AllowCommercialUse = [] }));
        Assert.Contains("reported no commercial-use terms", PolicyGate.Check(policy, 5, Typical with { AllowCommercialUse = null }));
    }

    [Theory]
    [InlineData("R", 7, null)]
    [InlineData("R", 8, "refused by policy: Policy:MaxNsfwLevel is R, this model is rated X")]
    [InlineData("PG13", 4, "refused by policy: Policy:MaxNsfwLevel is PG13, this model is rated R")]
    [InlineData("xxx", 31, null)]
    [InlineData("XXX", 32, "refused by policy: Policy:MaxNsfwLevel is XXX, this model is rated Blocked")]
    [InlineData("PG", 0, "refused by policy: Policy:MaxNsfwLevel is PG, this model has no NSFW rating")]
    public void MaxNsfwLevel_compares_the_highest_flag(string max, int level, string? expected) =>
        Assert.Equal(expected, PolicyGate.Check(new PolicyOptions { MaxNsfwLevel = max }, 5, Typical with { NsfwLevel = level }));

    [Fact]
    public void Blocked_creators_and_models_are_refused_by_name()
    {
        Assert.Equal("refused by policy: Policy:BlockedCreators lists someone, the creator of this model",
            PolicyGate.Check(new PolicyOptions { BlockedCreators = ["SomeOne"] }, 5, Typical));
        Assert.Null(PolicyGate.Check(new PolicyOptions { BlockedCreators = ["other"] }, 5, Typical));
        Assert.Equal("refused by policy: Policy:BlockedModels lists CivitAI model 5",
            PolicyGate.Check(new PolicyOptions { BlockedModels = [9, 5] }, 5, Typical));
        Assert.Null(PolicyGate.Check(new PolicyOptions { BlockedModels = [9] }, 5, Typical));
    }

    [Theory]
    [InlineData("RequireCommercialUse", "forever", "Policy:RequireCommercialUse must be none, image, rentcivit, rent or sell")]
    [InlineData("MaxNsfwLevel", "Blocked", "Policy:MaxNsfwLevel must be empty or one of PG, PG13, R, X, XXX")]
    [InlineData("MaxNsfwLevel", "spicy", "Policy:MaxNsfwLevel must be empty or one of PG, PG13, R, X, XXX")]
    public void Bad_settings_are_named(string property, string value, string message)
    {
        var options = new PolicyOptions();
        typeof(PolicyOptions).GetProperty(property)!.SetValue(options, value);

        var results = new List<ValidationResult>();
        Assert.False(Validator.TryValidateObject(options, new ValidationContext(options), results, validateAllProperties: true));
        Assert.Contains(results, r => r.ErrorMessage!.StartsWith(message, StringComparison.Ordinal));
    }

    [Fact]
    public void Bad_blocked_model_id_is_named()
    {
        var options = new PolicyOptions { BlockedModels = [3, -1] };
        var results = new List<ValidationResult>();
        Assert.False(Validator.TryValidateObject(options, new ValidationContext(options), results, validateAllProperties: true));
        Assert.Contains(results, r => r.ErrorMessage == "Policy:BlockedModels holds CivitAI model ids (positive integers); got -1");
    }

    [Fact]
    public void Default_settings_are_valid()
    {
        var options = new PolicyOptions();
        Assert.True(Validator.TryValidateObject(options, new ValidationContext(options), [], validateAllProperties: true));
    }
}

/// <summary>The resolver reads the model's terms for every link form, and the by-hash lookup finds a file's version.</summary>
public class CivitaiLicenseResolverTests
{
    [Theory]
    [InlineData("https://civitai.com/models/{m}")]
    [InlineData("https://civitai.com/models/{m}?modelVersionId={v}")]
    [InlineData("https://civitai.com/api/download/models/{v}")]
    public async Task Every_link_form_carries_the_models_terms(string form)
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var v = sim.AddLora(SimContent.Safetensors());
        v.NsfwLevel = 4;
        v.Model.AllowCommercialUse = "{Image,RentCivit}";
        v.Model.AllowDerivatives = false;
        v.Model.AllowNoCredit = false;
        v.Model.Creator = "pixel-maker";
        await using var h = new SourcesHarness(sim);

        var file = await h.ResolveOkAsync(form.Replace("{m}", v.Model.Id.ToString()).Replace("{v}", v.Id.ToString()));

        var license = file.License!;
        Assert.Equal(["Image", "RentCivit"], license.AllowCommercialUse);
        Assert.False(license.AllowDerivatives);
        Assert.True(license.AllowDifferentLicense);
        Assert.False(license.AllowNoCredit);
        Assert.Equal(4, license.NsfwLevel); // the model's level: the OR of its versions'
        Assert.Equal("pixel-maker", license.Creator);
    }

    [Fact]
    public async Task Older_single_string_and_json_array_forms_and_no_creator()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var old = sim.AddLora(SimContent.Safetensors(seed: 1));
        old.Model.AllowCommercialUse = "Rent";
        old.Model.Creator = null;
        var array = sim.AddLora(SimContent.Safetensors(seed: 2));
        array.Model.AllowCommercialUse = new[] { "Image", "Sell" };
        await using var h = new SourcesHarness(sim);

        var oldFile = await h.ResolveOkAsync($"https://civitai.com/models/{old.Model.Id}");
        var arrayFile = await h.ResolveOkAsync($"https://civitai.com/model-versions/{array.Id}");

        Assert.Equal(["Rent"], oldFile.License!.AllowCommercialUse);
        Assert.Null(oldFile.License.Creator);
        Assert.Equal(["Image", "Sell"], arrayFile.License!.AllowCommercialUse);
    }

    [Fact]
    public async Task By_hash_finds_the_version_and_pins_the_file_with_that_hash()
    {
        await using var sim = await CivitaiSimulator.StartAsync(cancellationToken: TestContext.Current.CancellationToken);
        var v = sim.AddLora(SimContent.Safetensors(seed: 1));
        var fp32 = v.AddFile(SimContent.Safetensors(seed: 2), "lora-fp32.safetensors", fp: "fp32");
        await using var h = new SourcesHarness(sim);

        var found = await h.Client.LookupByHashAsync(fp32.Sha256.ToUpperInvariant(), TestContext.Current.CancellationToken);
        var missing = await h.Client.LookupByHashAsync(new string('0', 64), TestContext.Current.CancellationToken);

        Assert.True(found.Succeeded, found.FailReason);
        Assert.Equal(v.Model.Id, found.File.ModelId);
        Assert.Equal(v.Id, found.File.VersionId);
        Assert.Equal(fp32.Id, found.File.FileId);
        Assert.Equal("simulated", found.File.License!.Creator);
        Assert.Equal(ReasonClass.NotFound, missing.ReasonClass);
        Assert.DoesNotContain(sim.Requests, r => r.PathAndQuery.StartsWith("/api/download/", StringComparison.Ordinal));
    }
}
