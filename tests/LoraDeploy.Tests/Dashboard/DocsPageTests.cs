using System.Text.RegularExpressions;
using Microsoft.Playwright;

namespace LoraDeploy.Tests.Dashboard;

/// <summary>
/// The API reference at <c>/docs</c> (Scalar) in headless Chromium: a self-hosted, possibly air-gapped server's page
/// makes no request off the machine and shows nothing that leads off it.
/// </summary>
public sealed partial class DocsPageTests
{
    [GeneratedRegex(@"'nonce-([A-Za-z0-9_\-+/=]+)'")]
    private static partial Regex Nonce();

    [Fact]
    public async Task Docs_render_the_api_and_request_only_the_server_itself()
    {
        DashboardBrowser.RequireChromium(); // skip (or fail under CI) before starting a server
        await using var server = await LoraDeployServer.StartAsync(settings: new Dictionary<string, string?> { ["Pipeline:Enabled"] = "false" });
        await using var browser = await DashboardBrowser.LaunchAsync();
        var page = await browser.NewPageAsync();
        var requests = new List<string>();
        var consoleErrors = new List<string>();
        page.Request += (_, request) =>
        {
            lock (requests)
            {
                requests.Add(request.Url);
            }
        };
        page.Console += (_, message) =>
        {
            if (message.Type == "error")
            {
                lock (consoleErrors)
                {
                    consoleErrors.Add(message.Text);
                }
            }
        };

        var response = await page.GotoAsync(new Uri(server.BaseUrl, "/docs").ToString());
        await page.GetByRole(AriaRole.Heading, new() { Name = "LoraDeploy", Exact = true }).First.WaitForAsync();
        await page.GetByText("/v1/lora/create").First.WaitForAsync();
        await page.WaitForLoadStateAsync(LoadState.NetworkIdle);
        await DashboardBrowser.ScreenshotAsync(page, "docs");

        var origin = server.BaseUrl.GetLeftPart(UriPartial.Authority);
        lock (requests)
        {
            Assert.NotEmpty(requests);
            Assert.All(requests, url => Assert.True(
                url.StartsWith(origin + "/", StringComparison.Ordinal) || url.StartsWith("data:", StringComparison.Ordinal) || url.StartsWith("blob:", StringComparison.Ordinal),
                $"/docs requested {url}, which is not {origin}"));
        }
        // Scalar's developer toolbar ("Generate SDK", "Deploy", "Share") and its AI chat; the sidebar's "Deploy" is our tag.
        foreach (var offMachine in new[] { "Ask AI", "Generate SDK", "Share", "Open API Client" })
        {
            Assert.Equal(0, await page.GetByRole(AriaRole.Button, new() { Name = offMachine, Exact = true }).CountAsync());
            Assert.Equal(0, await page.GetByRole(AriaRole.Link, new() { Name = offMachine, Exact = true }).CountAsync());
        }
        // Nor a visible link off the machine ("Powered by Scalar" and the like).
        var offSiteLinks = await page.EvaluateAsync<string[]>(
            "() => [...document.querySelectorAll('a[href]')].filter(a => a.offsetParent !== null && new URL(a.href, location.href).origin !== location.origin && !a.href.startsWith('blob:') && !a.href.startsWith('data:')).map(a => a.href + ' ' + a.className + ' ' + a.textContent.trim())");
        Assert.True(offSiteLinks.Length == 0, string.Join("\n", offSiteLinks));
        lock (consoleErrors)
        {
            Assert.DoesNotContain(consoleErrors, e => e.Contains("Content Security Policy", StringComparison.OrdinalIgnoreCase));
        }
        Assert.Empty(browser.PageErrors);

        // The policy allows only this origin, and inline script only with the nonce of this response.
        var csp = await response!.HeaderValueAsync("content-security-policy");
        Assert.NotNull(csp);
        Assert.Contains("default-src 'self'", csp);
        Assert.Contains("frame-ancestors 'none'", csp);
        var nonce = Nonce().Match(csp);
        Assert.True(nonce.Success, csp);
        Assert.Contains($"nonce=\"{nonce.Groups[1].Value}\"", await response.TextAsync());
        Assert.DoesNotContain("'unsafe-eval'", csp);
        Assert.DoesNotContain("script-src 'self' 'unsafe-inline'", csp);
    }
}
