using System.Collections.Concurrent;
using System.Text;
using System.Text.Json;
using LoraDeploy.Auth;
using LoraDeploy.Inference;
using LoraDeploy.Tests.Serving;
using LoraDeploy.Workers;
using Microsoft.AspNetCore.Http;
using Microsoft.Playwright;

namespace LoraDeploy.Tests.Dashboard;

/// <summary>
/// The "Try it" panel on a running image deploy, in headless Chromium against the real server and a
/// <see cref="FakeWorker"/> answering the image progress stream: progress shown, the image and seed shown, errors shown.
/// </summary>
public sealed class TryItPanelTests
{
    private const string Pool = E2eEnvironment.Flux;
    /// <summary>A valid 1×1 PNG, so the browser really decodes the image.</summary>
    private const string OnePixelPng = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";

    static TryItPanelTests() => Assertions.SetDefaultExpectTimeout(15_000);

    private sealed class Context(E2eEnvironment env, DashboardBrowser browser, FakeWorker? worker) : IAsyncDisposable
    {
        public E2eEnvironment Env => env;
        public DashboardBrowser Browser => browser;
        public FakeWorker Worker { get; set; } = worker!;

        public async ValueTask DisposeAsync()
        {
            if (Worker is not null)
            {
                await Worker.DisposeAsync();
            }
            await browser.DisposeAsync();
            await env.DisposeAsync();
        }
    }

    private static async Task<(Context Context, IPage Page, string Sha)> StartAsync(string name)
    {
        DashboardBrowser.RequireChromium();
        var settings = ServingCoreTests.PoolSettings();
        settings["Workers:TimeoutSeconds"] = "120";
        settings["Workers:RequestTimeoutSeconds"] = "60";
        var env = E2eEnvironment.WithSettings(settings);
        Context? c = null;
        try
        {
            await env.StartAsync();
            c = new Context(env, await DashboardBrowser.LaunchAsync(), null);
            var id = (await env.CreateViaApiAsync(name, env.GoodUrl)).GetProperty("deploy_id").GetString()!;
            var page = await c.Browser.NewPageAsync();
            await page.GotoAsync(new Uri(env.BaseUrl, $"/#/lora/{name}").ToString());
            await page.GetByLabel("API token").FillAsync(env.Token);
            await page.GetByRole(AriaRole.Button, new() { Name = "Sign in" }).ClickAsync();
            await page.GetByRole(AriaRole.Heading, new() { Name = "Serving" }).WaitForAsync(new() { Timeout = 60_000 });
            // Not running yet (no worker): no panel.
            await Assertions.Expect(page.GetByRole(AriaRole.Heading, new() { Name = "Try it" })).ToHaveCountAsync(0);

            var workerToken = await env.Server.QueryAsync(db => WorkerTokens.CreateAsync(db, "gpu-box", DateTime.UtcNow, CancellationToken.None));
            c.Worker = await FakeWorker.StartAsync(env.BaseUrl, workerToken, "gpu-a", Pool);
            var deadline = DateTime.UtcNow.AddSeconds(60);
            while ((await env.GetJsonAsync($"deploy/{id}")).GetProperty("status").GetString() != "running")
            {
                Assert.True(DateTime.UtcNow < deadline, "the deploy never ran");
                await Task.Delay(100);
            }
            await page.GetByRole(AriaRole.Heading, new() { Name = "Try it" }).WaitForAsync(new() { Timeout = 20_000 });
            return (c, page, env.Sha256);
        }
        catch
        {
            if (c is not null)
            {
                await c.DisposeAsync();
            }
            else
            {
                await env.DisposeAsync();
            }
            throw;
        }
    }

    private static string Answer(long seed) => JsonSerializer.Serialize(new
    {
        images = new[] { "data:image/png;base64," + OnePixelPng },
        nsfw_content_detected = new[] { false },
        seed,
        request_id = "req-1",
        inference_status = new { status = "succeeded", runtime_ms = 3 },
    });

    [Fact]
    public async Task A_prompt_shows_progress_then_the_image_and_the_seed()
    {
        var (c, page, sha) = await StartAsync("try-pixels");
        await using var _ = c;
        var release = new TaskCompletionSource();
        var bodies = new ConcurrentQueue<(JsonElement Body, string Adapters)>();
        c.Worker.Answer = async http =>
        {
            using var body = await JsonDocument.ParseAsync(http.Request.Body);
            bodies.Enqueue((body.RootElement.Clone(), http.Request.Headers[WorkerProtocol.AdaptersHeader].ToString()));
            await ImageProgressStream.WriteProgressAsync(http.Response, 1, 4, http.RequestAborted);
            await ImageProgressStream.WriteProgressAsync(http.Response, 2, 4, http.RequestAborted);
            await release.Task.WaitAsync(TimeSpan.FromSeconds(30), http.RequestAborted); // the page shows step 2 meanwhile
            await ImageProgressStream.WriteProgressAsync(http.Response, 4, 4, http.RequestAborted);
            await ImageProgressStream.WriteResultAsync(http.Response, Encoding.UTF8.GetBytes(Answer(7)), http.RequestAborted);
        };

        await page.GetByLabel("Prompt").FillAsync("a pixel-art castle");
        await page.GetByLabel("LoRA scale").FillAsync("0.8");
        await page.GetByLabel("Seed").FillAsync("7");
        await page.GetByRole(AriaRole.Button, new() { Name = "Generate" }).ClickAsync();

        var status = page.Locator(".try-status");
        await Assertions.Expect(status).ToContainTextAsync("Step 2 of 4");
        await Assertions.Expect(status.Locator("progress")).ToHaveAttributeAsync("max", "4");
        await Assertions.Expect(page.GetByRole(AriaRole.Button, new() { Name = "Generate" })).ToBeDisabledAsync();
        await DashboardBrowser.ScreenshotAsync(page, "50-try-it-progress");
        release.SetResult();

        var image = page.GetByRole(AriaRole.Img, new() { Name = "Generated image: a pixel-art castle" });
        await Assertions.Expect(image).ToBeVisibleAsync();
        Assert.Equal(1, await image.EvaluateAsync<int>("img => img.decode().then(() => img.naturalWidth)"));
        await Assertions.Expect(page.Locator(".try-seed-used")).ToHaveTextAsync("7");
        await Assertions.Expect(page.GetByRole(AriaRole.Button, new() { Name = "Generate" })).ToBeEnabledAsync();
        await DashboardBrowser.ScreenshotAsync(page, "51-try-it-image");

        var (sent, adapters) = Assert.Single(bodies);
        Assert.Equal("a pixel-art castle", sent.GetProperty("prompt").GetString());
        Assert.True(sent.GetProperty("stream").GetBoolean());
        Assert.Equal(0.8, sent.GetProperty("lora_scale").GetDouble(), 6);
        Assert.Equal(7, sent.GetProperty("seed").GetInt64());
        Assert.Equal($"{sha}:0.8", adapters);
        Assert.Empty(c.Browser.PageErrors);
    }

    [Fact]
    public async Task Errors_are_shown_from_the_stream_from_the_gateway_and_for_bad_input()
    {
        var (c, page, _) = await StartAsync("try-errors");
        await using var _ = c;
        c.Worker.Answer = async http =>
        {
            await ImageProgressStream.WriteProgressAsync(http.Response, 1, 20, http.RequestAborted);
            await ImageProgressStream.WriteErrorAsync(http.Response, 503, "ComfyUI stopped answering; try again", http.RequestAborted);
        };
        var generate = page.GetByRole(AriaRole.Button, new() { Name = "Generate" });

        // No prompt: said at the field, nothing sent.
        await generate.ClickAsync();
        await Assertions.Expect(page.Locator("#try-prompt-error")).ToHaveTextAsync("Write a prompt.");
        await Assertions.Expect(page.GetByLabel("Prompt")).ToHaveAttributeAsync("aria-invalid", "true");
        Assert.Equal(0, c.Worker.Requests);

        // The worker fails mid-stream: its words are shown.
        await page.GetByLabel("Prompt").FillAsync("a castle");
        await generate.ClickAsync();
        await Assertions.Expect(page.Locator(".try-status .notice.error")).ToHaveTextAsync("ComfyUI stopped answering; try again");
        await Assertions.Expect(page.Locator(".try-image")).ToHaveCountAsync(0);

        // The gateway refuses a scale out of range: shown at the scale field.
        await page.GetByLabel("LoRA scale").FillAsync("99");
        await generate.ClickAsync();
        await Assertions.Expect(page.Locator("#try-scale-error")).ToContainTextAsync("lora_scale must be a number from -8 to 8");
        await Assertions.Expect(page.Locator(".try-status .notice.error")).ToHaveCountAsync(0);
        await DashboardBrowser.ScreenshotAsync(page, "52-try-it-errors");
        Assert.Empty(c.Browser.PageErrors);
    }
}
