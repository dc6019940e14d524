using System.Net;
using System.Text.RegularExpressions;
using LoraDeploy.Auth;
using Microsoft.Playwright;

namespace LoraDeploy.Tests.Dashboard;

/// <summary>
/// The dashboard's Tokens page in headless Chromium against the real server: list, create with a label and an expiry
/// (the secret shown once, with a copy hint), 422s beside their fields, revoke, and revoking the tab's own token.
/// </summary>
public sealed class TokensPageTests
{
    private static readonly Dictionary<string, string?> PipelineOff = new() { ["Pipeline:Enabled"] = "false" };

    static TokensPageTests() => Assertions.SetDefaultExpectTimeout(15_000);

    private static ILocator Row(IPage page, string tokenId) => page.Locator($"tbody tr[data-token-id='{tokenId}']");

    [Fact]
    public async Task Create_a_token_see_its_secret_once_then_revoke_it_and_the_tabs_own_token()
    {
        DashboardBrowser.RequireChromium(); // skip (or fail under CI) before starting any server
        await using var server = await LoraDeployServer.StartAsync(settings: PipelineOff);
        var alice = await server.CreateUserAsync("alice");
        await using var browser = await DashboardBrowser.LaunchAsync();
        var page = await browser.NewPageAsync();

        await page.GotoAsync(new Uri(server.BaseUrl, "/#/deploys").ToString());
        await page.GetByLabel("API token").FillAsync(alice.Token);
        await page.GetByRole(AriaRole.Button, new() { Name = "Sign in" }).ClickAsync();
        await page.GetByRole(AriaRole.Button, new() { Name = "Sign out" }).WaitForAsync();
        await page.GetByRole(AriaRole.Link, new() { Name = "Tokens", Exact = true }).ClickAsync();
        await page.GetByRole(AriaRole.Heading, new() { Name = "API tokens" }).WaitForAsync();
        var ownId = ApiTokens.IdOf(alice.Token);
        await Assertions.Expect(Row(page, ownId)).ToContainTextAsync("this tab");
        await Assertions.Expect(page.Locator("tbody tr")).ToHaveCountAsync(1);

        // A bad expiry is answered next to its field, and nothing is created.
        await page.GetByLabel("Expires after (days, optional)").FillAsync("0");
        await page.GetByRole(AriaRole.Button, new() { Name = "Create token" }).ClickAsync();
        await Assertions.Expect(page.Locator("#token-days-error")).ToContainTextAsync("3650");
        await Assertions.Expect(page.GetByLabel("Expires after (days, optional)")).ToHaveAttributeAsync("aria-invalid", "true");
        await Assertions.Expect(page.Locator("#new-token")).ToHaveCountAsync(0);

        await page.GetByLabel("Label (optional)").FillAsync("<b>laptop</b>");
        await page.GetByLabel("Expires after (days, optional)").FillAsync("30");
        await page.GetByRole(AriaRole.Button, new() { Name = "Create token" }).ClickAsync();
        var secretField = page.Locator("#new-token");
        await Assertions.Expect(secretField).ToHaveValueAsync(new Regex("^ld_[a-z0-9]{12}_"));
        await Assertions.Expect(page.Locator(".new-token")).ToContainTextAsync("shown this once");
        await Assertions.Expect(page.Locator("#token-days-error")).ToBeEmptyAsync();
        var token = await secretField.InputValueAsync();
        var newId = ApiTokens.IdOf(token);
        await Assertions.Expect(Row(page, newId)).ToContainTextAsync("<b>laptop</b>"); // a label is text, never markup
        await Assertions.Expect(Row(page, newId).Locator("b")).ToHaveCountAsync(0);
        await Assertions.Expect(Row(page, newId).Locator("td[data-label='Expires'] time")).ToHaveCountAsync(1);
        await DashboardBrowser.ScreenshotAsync(page, "50-tokens-created");

        // The secret is in the field's value only: not in the markup, not stored by the tab; the tab keeps its own token.
        Assert.DoesNotContain(TokenParts.Secret(token), await page.ContentAsync(), StringComparison.Ordinal);
        Assert.Equal(alice.Token, await page.EvaluateAsync<string>("sessionStorage.getItem('loradeploy.token')"));
        Assert.Equal(1, await page.EvaluateAsync<int>("sessionStorage.length"));
        using (var withNew = server.CreateClient(token))
        {
            (await withNew.GetAsync("/v1/me/tokens")).EnsureSuccessStatusCode();
        }

        // Shown once: back on the page, the list has it, the secret is gone.
        await page.GetByRole(AriaRole.Link, new() { Name = "Deployments", Exact = true }).ClickAsync();
        await page.GetByRole(AriaRole.Link, new() { Name = "Tokens", Exact = true }).ClickAsync();
        await Assertions.Expect(Row(page, newId)).ToHaveCountAsync(1);
        await Assertions.Expect(page.Locator("#new-token")).ToHaveCountAsync(0);

        await Row(page, newId).GetByRole(AriaRole.Button, new() { Name = "Revoke <b>laptop</b>" }).ClickAsync();
        var dialog = page.GetByRole(AriaRole.Dialog);
        await Assertions.Expect(dialog).ToContainTextAsync("cannot be undone");
        await dialog.GetByRole(AriaRole.Button, new() { Name = "Revoke" }).ClickAsync();
        await Assertions.Expect(Row(page, newId)).ToHaveCountAsync(0);
        using (var withNew = server.CreateClient(token))
        {
            Assert.Equal(HttpStatusCode.Unauthorized, (await withNew.GetAsync("/v1/me/tokens")).StatusCode);
        }

        // Revoking the tab's own token signs the tab out.
        await Row(page, ownId).GetByRole(AriaRole.Button).ClickAsync();
        await Assertions.Expect(dialog).ToContainTextAsync("signed out");
        await dialog.GetByRole(AriaRole.Button, new() { Name = "Revoke" }).ClickAsync();
        await page.GetByRole(AriaRole.Heading, new() { Name = "Sign in" }).WaitForAsync();
        await Assertions.Expect(page.Locator(".notice")).ToContainTextAsync("You revoked the token this tab was signed in with");
        Assert.Equal(HttpStatusCode.Unauthorized, (await alice.Client.GetAsync("/v1/me/tokens")).StatusCode);
        Assert.Empty(browser.PageErrors);
    }

    [Fact]
    public async Task The_tokens_page_fits_a_phone()
    {
        DashboardBrowser.RequireChromium();
        await using var server = await LoraDeployServer.StartAsync(settings: PipelineOff);
        var alice = await server.CreateUserAsync("alice");
        using (var http = server.CreateClient(alice.Token))
        {
            (await http.PostJsonAsync("/v1/me/tokens", new { label = new string('w', 100), expires_in_days = 7 })).EnsureSuccessStatusCode();
        }
        await using var browser = await DashboardBrowser.LaunchAsync();
        var page = await browser.NewPageAsync(phone: true);
        await page.GotoAsync(new Uri(server.BaseUrl, "/#/tokens").ToString());
        await page.GetByLabel("API token").FillAsync(alice.Token);
        await page.GetByRole(AriaRole.Button, new() { Name = "Sign in" }).ClickAsync();
        await Assertions.Expect(page.Locator("tbody tr")).ToHaveCountAsync(2);
        await page.GetByRole(AriaRole.Button, new() { Name = "Create token" }).ClickAsync();
        await Assertions.Expect(page.Locator("#new-token")).ToHaveValueAsync(new Regex("^ld_"));
        await DashboardBrowser.ScreenshotAsync(page, "51-tokens-phone");

        var overflow = await page.EvaluateAsync<int>("document.documentElement.scrollWidth - document.documentElement.clientWidth");
        Assert.True(overflow <= 0, $"#/tokens scrolls sideways by {overflow}px on a phone");
        Assert.Empty(browser.PageErrors);
    }
}
