using System.Text.RegularExpressions;
using LoraDeploy.Tests.Pipeline;
using Microsoft.EntityFrameworkCore;
using Microsoft.Playwright;

namespace LoraDeploy.Tests.Dashboard;

/// <summary>
/// The dashboard in headless Chromium against the real server and the CivitAI simulator. Each test saves
/// screenshots under <c>screenshots/</c> in the test output folder.
/// </summary>
public sealed class DashboardTests(E2eEnvironment env) : IClassFixture<E2eEnvironment>
{
    private static readonly TimeSpan DeployTimeout = TimeSpan.FromSeconds(60);

    static DashboardTests() => Assertions.SetDefaultExpectTimeout(15_000);

    private async Task<DashboardBrowser> StartAsync()
    {
        DashboardBrowser.RequireChromium(); // skip (or fail under CI) before starting any server
        await env.StartAsync();
        return await DashboardBrowser.LaunchAsync();
    }

    private string Url(string hash) => new Uri(env.BaseUrl, "/" + hash).ToString();

    private async Task SignInAsync(IPage page, string hash = "#/deploys")
    {
        await page.GotoAsync(Url(hash));
        await page.GetByLabel("API token").FillAsync(env.Token);
        await page.GetByRole(AriaRole.Button, new() { Name = "Sign in" }).ClickAsync();
        await page.GetByRole(AriaRole.Button, new() { Name = "Sign out" }).WaitForAsync();
    }

    private static async Task FillNewFormAsync(IPage page, string name, string url, bool isPrivate = true)
    {
        await page.GetByLabel("Name", new() { Exact = true }).FillAsync(name);
        await page.GetByLabel("Base model").SelectOptionAsync(E2eEnvironment.Flux);
        await page.GetByLabel("CivitAI URL").FillAsync(url);
        await page.GetByLabel("Private", new() { Exact = false }).SetCheckedAsync(isPrivate);
    }

    private static ILocator Row(IPage page, string modelName) =>
        page.Locator("tbody tr").Filter(new() { Has = page.GetByRole(AriaRole.Link, new() { Name = modelName, Exact = true }) });

    [Fact]
    public async Task Sign_in_create_a_deployment_watch_it_deploy_and_delete_it()
    {
        await using var browser = await StartAsync();
        var page = await browser.NewPageAsync();

        await page.GotoAsync(Url(""));
        await page.GetByRole(AriaRole.Heading, new() { Name = "Sign in" }).WaitForAsync();
        await DashboardBrowser.ScreenshotAsync(page, "01-sign-in");
        await SignInAsync(page);
        await page.GetByRole(AriaRole.Heading, new() { Name = "Deployments" }).WaitForAsync();
        await DashboardBrowser.ScreenshotAsync(page, "02-deployments");

        await page.GetByRole(AriaRole.Link, new() { Name = "New deployment" }).First.ClickAsync();
        await page.GetByRole(AriaRole.Heading, new() { Name = "New LoRA deployment" }).WaitForAsync();
        await Assertions.Expect(page.GetByLabel("Base model").Locator("option[value='black-forest-labs/FLUX-1-dev']")).ToHaveCountAsync(1);
        await FillNewFormAsync(page, "dash-pixel", env.GoodUrl);
        await page.GetByLabel("Description (optional)").FillAsync("pixel sprites, from the dashboard");
        await DashboardBrowser.ScreenshotAsync(page, "03-new-filled");
        await page.GetByRole(AriaRole.Button, new() { Name = "Deploy" }).ClickAsync();

        await Assertions.Expect(page).ToHaveURLAsync(new Regex("#/lora/dash-pixel$"), new() { Timeout = 30_000 });
        await page.GetByRole(AriaRole.Heading, new() { Name = $"{env.User}/dash-pixel" }).WaitForAsync();
        await DashboardBrowser.ScreenshotAsync(page, "04-lora-started");
        await page.Locator("[data-status='deploying'], [data-status='running']").First
            .WaitForAsync(new() { Timeout = (float)DeployTimeout.TotalMilliseconds });
        await Assertions.Expect(page.Locator(".hash")).ToHaveTextAsync(env.Sha256);
        var report = page.Locator("section", new() { Has = page.GetByRole(AriaRole.Heading, new() { Name = "Adapter report" }) });
        await Assertions.Expect(report).ToContainTextAsync("flux1");
        await Assertions.Expect(page.GetByRole(AriaRole.Link, new() { Name = "Open on CivitAI" })).ToHaveAttributeAsync("href", new Regex("^https?://"));
        // The CivitAI model's recorded license terms and NSFW level.
        var civitai = page.Locator("section", new() { Has = page.GetByRole(AriaRole.Heading, new() { Name = "CivitAI", Exact = true }) });
        await Assertions.Expect(civitai.Locator("dt", new() { HasText = "Commercial use" }).Locator("+ dd")).ToHaveTextAsync("Image, RentCivit");
        await Assertions.Expect(civitai.Locator("dt", new() { HasText = "Derivatives allowed" }).Locator("+ dd")).ToHaveTextAsync("yes");
        await Assertions.Expect(civitai.Locator("dt", new() { HasText = "Creator" }).Locator("+ dd")).ToHaveTextAsync("simulated");
        await Assertions.Expect(civitai.Locator("dt", new() { HasText = "NSFW level" }).Locator("+ dd")).ToHaveTextAsync("PG (1)");
        await DashboardBrowser.ScreenshotAsync(page, "05-lora-deployed");

        await page.GetByRole(AriaRole.Link, new() { Name = "All deployments" }).ClickAsync();
        var row = Row(page, $"{env.User}/dash-pixel");
        await Assertions.Expect(row.Locator("[data-status]")).ToHaveAttributeAsync("data-status", new Regex("deploying|running"));
        await DashboardBrowser.ScreenshotAsync(page, "06-deployments-deployed");

        await row.GetByRole(AriaRole.Button, new() { Name = $"Delete {env.User}/dash-pixel" }).ClickAsync();
        var dialog = page.GetByRole(AriaRole.Dialog);
        await Assertions.Expect(dialog).ToBeVisibleAsync();
        await Assertions.Expect(dialog).ToContainTextAsync("cannot be undone");
        await DashboardBrowser.ScreenshotAsync(page, "07-delete-dialog");
        await dialog.GetByRole(AriaRole.Button, new() { Name = "Delete" }).ClickAsync();
        await Assertions.Expect(row).ToHaveCountAsync(0);
        Assert.Equal("deleted", (await env.GetJsonAsync("deploy/list?status=deleted")).EnumerateArray()
            .Single(d => d.GetProperty("model_name").GetString() == $"{env.User}/dash-pixel").GetProperty("status").GetString());
        Assert.Empty(browser.PageErrors);
    }

    [Fact]
    public async Task Validation_errors_appear_next_to_their_fields()
    {
        await using var browser = await StartAsync();
        var page = await browser.NewPageAsync();
        await SignInAsync(page, "#/new");
        await page.GetByRole(AriaRole.Heading, new() { Name = "New LoRA deployment" }).WaitForAsync();

        await page.GetByLabel("Name", new() { Exact = true }).FillAsync("-starts-with-a-dash");
        await page.GetByLabel("Base model").SelectOptionAsync(E2eEnvironment.Flux);
        await page.GetByLabel("CivitAI URL").FillAsync("https://example.com/not-civitai");
        await page.GetByRole(AriaRole.Button, new() { Name = "Deploy" }).ClickAsync();

        await Assertions.Expect(page.Locator("#lora_name-error")).ToContainTextAsync("lora_name");
        await Assertions.Expect(page.Locator("#civit_url-error")).ToContainTextAsync("CivitAI");
        await Assertions.Expect(page.Locator("#base_model-error")).ToBeEmptyAsync();
        await Assertions.Expect(page.GetByLabel("Name", new() { Exact = true })).ToHaveAttributeAsync("aria-invalid", "true");
        await Assertions.Expect(page.GetByLabel("Name", new() { Exact = true })).ToBeFocusedAsync();
        await DashboardBrowser.ScreenshotAsync(page, "08-new-validation-errors");

        // Fixing the fields and resubmitting clears the old messages.
        await page.GetByLabel("Name", new() { Exact = true }).FillAsync("dash-valid-after-fix");
        await page.GetByLabel("CivitAI URL").FillAsync(env.MissingUrl);
        await page.GetByRole(AriaRole.Button, new() { Name = "Deploy" }).ClickAsync();
        await Assertions.Expect(page).ToHaveURLAsync(new Regex("#/lora/dash-valid-after-fix$"), new() { Timeout = 30_000 });
        Assert.Empty(browser.PageErrors);
    }

    [Fact]
    public async Task A_taken_name_is_reported_next_to_the_name_field()
    {
        await using var browser = await StartAsync();
        await env.CreateViaApiAsync("dash-taken", env.MissingUrl);
        var page = await browser.NewPageAsync();
        await SignInAsync(page, "#/new");

        await FillNewFormAsync(page, "dash-taken", env.GoodUrl);
        await page.GetByRole(AriaRole.Button, new() { Name = "Deploy" }).ClickAsync();

        await Assertions.Expect(page.Locator("#lora_name-error")).ToContainTextAsync("dash-taken");
        await DashboardBrowser.ScreenshotAsync(page, "09-new-name-taken");
    }

    [Fact]
    public async Task A_failed_deployment_shows_its_fail_reason()
    {
        await using var browser = await StartAsync();
        var page = await browser.NewPageAsync();
        await SignInAsync(page, "#/new");

        await FillNewFormAsync(page, "dash-missing", env.MissingUrl);
        await page.GetByRole(AriaRole.Button, new() { Name = "Deploy" }).ClickAsync();
        await Assertions.Expect(page).ToHaveURLAsync(new Regex("#/lora/dash-missing$"), new() { Timeout = 30_000 });
        await page.Locator("[data-status='failed']").WaitForAsync(new() { Timeout = (float)DeployTimeout.TotalMilliseconds });

        var reason = (await env.GetJsonAsync("v1/lora/dash-missing")).GetProperty("fail_reason").GetString();
        Assert.False(string.IsNullOrWhiteSpace(reason));
        await Assertions.Expect(page.Locator(".notice.error")).ToHaveTextAsync(reason!);
        await DashboardBrowser.ScreenshotAsync(page, "10-lora-failed");

        await page.GotoAsync(Url("#/deploys"));
        await Assertions.Expect(Row(page, $"{env.User}/dash-missing").Locator(".fail-reason")).ToHaveTextAsync(reason!);
        await DashboardBrowser.ScreenshotAsync(page, "11-deployments-failed");
    }

    [Fact]
    public async Task Public_loras_are_listed_without_signing_in()
    {
        await using var browser = await StartAsync();
        await env.CreateViaApiAsync("dash-public", env.GoodUrl, isPrivate: false, description: "shared with everyone");
        await env.CreateViaApiAsync("dash-private", env.GoodUrl, isPrivate: true);
        var page = await browser.NewPageAsync();

        await page.GotoAsync(Url("#/public"));
        await page.GetByRole(AriaRole.Heading, new() { Name = "Public LoRAs" }).WaitForAsync();
        var row = page.Locator("tbody tr").Filter(new() { Has = page.GetByText($"{env.User}/dash-public", new() { Exact = true }) });
        await Assertions.Expect(row).ToHaveCountAsync(1);
        await Assertions.Expect(row).ToContainTextAsync("shared with everyone");
        await Assertions.Expect(page.GetByText($"{env.User}/dash-private")).ToHaveCountAsync(0);
        await Assertions.Expect(page.GetByRole(AriaRole.Button, new() { Name = "Sign out" })).ToBeHiddenAsync();
        await DashboardBrowser.ScreenshotAsync(page, "12-public");
    }

    [Fact]
    public async Task A_bad_token_is_refused_and_sign_out_forgets_the_token()
    {
        await using var browser = await StartAsync();
        var page = await browser.NewPageAsync();

        await page.GotoAsync(Url("#/deploys"));
        await page.GetByLabel("API token").FillAsync("not-a-real-token");
        await page.GetByRole(AriaRole.Button, new() { Name = "Sign in" }).ClickAsync();
        await Assertions.Expect(page.Locator("#token-error")).ToHaveTextAsync("That token was not accepted.");
        await DashboardBrowser.ScreenshotAsync(page, "13-sign-in-refused");

        await page.GetByLabel("API token").FillAsync(env.Token);
        await page.GetByRole(AriaRole.Button, new() { Name = "Sign in" }).ClickAsync();
        await page.GetByRole(AriaRole.Heading, new() { Name = "Deployments" }).WaitForAsync();
        Assert.Equal(env.Token, await page.EvaluateAsync<string>("sessionStorage.getItem('loradeploy.token')"));

        await page.GetByRole(AriaRole.Button, new() { Name = "Sign out" }).ClickAsync();
        await page.GetByRole(AriaRole.Heading, new() { Name = "Sign in" }).WaitForAsync();
        Assert.Null(await page.EvaluateAsync<string?>("sessionStorage.getItem('loradeploy.token')"));
        await page.ReloadAsync();
        await page.GetByRole(AriaRole.Heading, new() { Name = "Sign in" }).WaitForAsync();
    }

    [Fact]
    public async Task Delete_asks_for_confirmation_and_cancel_changes_nothing()
    {
        await using var browser = await StartAsync();
        var deploy = await env.CreateViaApiAsync("dash-cancel", env.MissingUrl);
        var page = await browser.NewPageAsync();
        await SignInAsync(page);

        var row = Row(page, $"{env.User}/dash-cancel");
        await row.GetByRole(AriaRole.Button, new() { Name = $"Delete {env.User}/dash-cancel" }).ClickAsync();
        var dialog = page.GetByRole(AriaRole.Dialog);
        await Assertions.Expect(dialog).ToBeVisibleAsync();
        await Assertions.Expect(dialog.GetByRole(AriaRole.Button, new() { Name = "Cancel" })).ToBeFocusedAsync();
        await page.Keyboard.PressAsync("Escape");
        await Assertions.Expect(dialog).ToBeHiddenAsync();
        await Assertions.Expect(row).ToHaveCountAsync(1);
        var status = (await env.GetJsonAsync($"deploy/{deploy.GetProperty("deploy_id").GetString()}")).GetProperty("status").GetString();
        Assert.NotEqual("deleted", status);
    }

    [Fact]
    public async Task Every_page_fits_a_phone_and_has_no_dead_links()
    {
        await using var browser = await StartAsync();
        await env.CreateViaApiAsync("dash-phone", env.GoodUrl, isPrivate: false, description: "seen on a phone");
        var page = await browser.NewPageAsync(phone: true);
        await SignInAsync(page);

        using var http = new HttpClient { BaseAddress = env.BaseUrl };
        foreach (var (hash, shot) in new[]
                 {
                     ("#/deploys", "20-phone-deployments"), ("#/new", "21-phone-new"),
                     ("#/lora/dash-phone", "22-phone-lora"), ("#/public", "23-phone-public"), ("#/nowhere", "24-phone-not-found"),
                     ("#/tokens", "25-phone-tokens"),
                 })
        {
            await page.GotoAsync(Url(hash));
            await page.Locator("main h1").First.WaitForAsync();
            await page.WaitForLoadStateAsync(LoadState.NetworkIdle);
            await DashboardBrowser.ScreenshotAsync(page, shot);

            var overflow = await page.EvaluateAsync<int>("document.documentElement.scrollWidth - document.documentElement.clientWidth");
            Assert.True(overflow <= 0, $"{hash} scrolls sideways by {overflow}px on a phone");

            foreach (var href in await page.Locator("a[href]").EvaluateAllAsync<string[]>("els => els.map(e => e.getAttribute('href'))"))
            {
                if (href.StartsWith('#'))
                {
                    Assert.Matches("^#(main|/deploys|/new|/public|/workers|/tokens|/lora/[^/]+)$", href);
                }
                else if (href.StartsWith('/'))
                {
                    using var response = await http.GetAsync(href);
                    Assert.True(response.IsSuccessStatusCode, $"{hash} links to {href}, which answers {(int)response.StatusCode}");
                }
                else
                {
                    Assert.Matches("^https?://", href);
                }
            }
        }
        Assert.Empty(browser.PageErrors);
    }
    /// <summary>The longest fail reasons the pipeline writes: two SHA-256s, and a 200-character tensor name.</summary>
    private static readonly string[] LongFailReasons =
    [
        $"The downloaded bytes have SHA-256 {new string('a', 64)}, but CivitAI lists {new string('b', 64)} for file 3018; the file was not stored. It may have been replaced or corrupted on CivitAI's side: try again later or report it to the model's author.",
        $"Value error, 3 tensors are not LoRA-family parameters (e.g. '{string.Concat(Enumerable.Repeat("lora_unet_down_blocks_", 10))[..200]}')",
    ];

    [Fact]
    public async Task The_longest_fail_reasons_fit_a_desktop_window_and_a_phone()
    {
        await using var browser = await StartAsync();
        for (var i = 0; i < LongFailReasons.Length; i++)
        {
            var name = $"dash-long-{i}";
            var id = (await env.CreateViaApiAsync(name, env.MissingUrl)).GetProperty("deploy_id").GetString()!;
            // Wait for the pipeline to be done with it, then write the reason where the pipeline cannot overwrite it.
            await ImportPipelineTests.WaitUntilAsync(async () =>
                (await env.GetJsonAsync($"deploy/{id}")).GetProperty("status").GetString() == "failed");
            var reason = LongFailReasons[i];
            await env.Server.QueryAsync(db => db.Deploys.Where(d => d.Id == id)
                .ExecuteUpdateAsync(set => set.SetProperty(d => d.FailReason, reason)));
        }

        foreach (var phone in new[] { false, true })
        {
            var page = await browser.NewPageAsync(phone);
            await SignInAsync(page);
            var width = phone ? 390 : 1280;
            foreach (var (hash, shot) in new[] { ("#/deploys", "list"), ("#/lora/dash-long-0", "lora-0"), ("#/lora/dash-long-1", "lora-1") })
            {
                await page.GotoAsync(Url(hash));
                await page.Locator(hash == "#/deploys" ? ".fail-reason" : ".notice.error").First.WaitForAsync();
                await DashboardBrowser.ScreenshotAsync(page, $"30-long-reason-{shot}-{width}");

                var overflow = await page.EvaluateAsync<int>("document.documentElement.scrollWidth - document.documentElement.clientWidth");
                Assert.True(overflow <= 0, $"{hash} scrolls sideways by {overflow}px at {width}px");
                // Every element that holds a reason, every table and card ends inside the window.
                var widest = await page.EvaluateAsync<double>(
                    "() => Math.max(...[...document.querySelectorAll('table, tr, td, .fail-reason, .notice, .table-wrap')].map(e => e.getBoundingClientRect().right))");
                Assert.True(widest <= width, $"{hash}: an element reaches {widest}px in a {width}px window");
                // ... and no text runs out of its box (a box of fixed width with an unbroken string spilling over it).
                var spill = await page.EvaluateAsync<string>(
                    "() => [...document.querySelectorAll('td, .fail-reason, .notice, .facts dd')].filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.className || e.tagName).join(', ')");
                Assert.True(spill == "", $"{hash} at {width}px: text runs out of {spill}");
            }
            if (!phone)
            {
                // The Actions column stays on screen beside the long reasons.
                await page.GotoAsync(Url("#/deploys"));
                var actions = Row(page, $"{env.User}/dash-long-0").Locator("td[data-label='Actions']");
                var box = await actions.BoundingBoxAsync();
                Assert.NotNull(box);
                Assert.True(box.X + box.Width <= width, $"Actions end at {box.X + box.Width}px");
            }
            // What a person reads carries no pydantic prefix.
            await page.GotoAsync(Url("#/lora/dash-long-1"));
            await Assertions.Expect(page.Locator(".notice.error")).ToHaveTextAsync(LongFailReasons[1]["Value error, ".Length..]);
        }
        Assert.Empty(browser.PageErrors);
    }

    [Fact]
    public async Task The_dashboard_and_its_files_send_security_headers_and_still_work()
    {
        await using var browser = await StartAsync();
        using var http = new HttpClient { BaseAddress = env.BaseUrl };
        foreach (var path in new[] { "/", "/index.html", "/app.js", "/api.js", "/app.css", "/favicon.svg" })
        {
            using var response = await http.GetAsync(path);
            Assert.Equal(System.Net.HttpStatusCode.OK, response.StatusCode);
            Assert.Equal("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
                string.Join(",", response.Headers.GetValues("Content-Security-Policy")));
            Assert.Equal("DENY", string.Join(",", response.Headers.GetValues("X-Frame-Options")));
            Assert.Equal("nosniff", string.Join(",", response.Headers.GetValues("X-Content-Type-Options")));
        }

        // Under that policy the dashboard still signs in and lists, and the browser reports no violation.
        var page = await browser.NewPageAsync();
        var violations = new List<string>();
        page.Console += (_, message) =>
        {
            if (message.Text.Contains("Content Security Policy", StringComparison.OrdinalIgnoreCase))
            {
                lock (violations)
                {
                    violations.Add(message.Text);
                }
            }
        };
        await SignInAsync(page);
        await page.Locator("main h1").First.WaitForAsync();
        await page.GotoAsync(Url("#/new"));
        await page.GetByLabel("CivitAI URL").WaitForAsync();
        await page.WaitForLoadStateAsync(LoadState.NetworkIdle);
        lock (violations)
        {
            Assert.Empty(violations);
        }
        Assert.Empty(browser.PageErrors);
    }
}
