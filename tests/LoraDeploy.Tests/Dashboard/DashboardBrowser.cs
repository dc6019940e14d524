using Microsoft.Playwright;

namespace LoraDeploy.Tests.Dashboard;

/// <summary>
/// Headless Chromium for the dashboard tests, found through <c>LORADEPLOY_CHROMIUM</c> (a path). Unset: the test is
/// skipped, except under <c>CI=true</c>, where it fails: CI must install Chromium and run these.
/// </summary>
public sealed class DashboardBrowser : IAsyncDisposable
{
    public const string Variable = "LORADEPLOY_CHROMIUM";

    private static readonly string[] ChromiumArgs =
    [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ];

    private readonly IPlaywright _playwright;
    private readonly List<string> _pageErrors = [];

    private DashboardBrowser(IPlaywright playwright, IBrowser browser)
    {
        _playwright = playwright;
        Browser = browser;
    }

    public IBrowser Browser { get; }

    /// <summary>Uncaught script errors on any page opened through <see cref="NewPageAsync"/>.</summary>
    public IReadOnlyList<string> PageErrors
    {
        get
        {
            lock (_pageErrors)
            {
                return [.. _pageErrors];
            }
        }
    }

    public static string ScreenshotDir
    {
        get
        {
            var dir = Path.Combine(AppContext.BaseDirectory, "screenshots");
            Directory.CreateDirectory(dir);
            return dir;
        }
    }

    /// <summary>The Chromium path, or skip (fail under CI) when it is not configured.</summary>
    public static string RequireChromium()
    {
        var path = Environment.GetEnvironmentVariable(Variable);
        if (string.IsNullOrWhiteSpace(path))
        {
            if (TestBackend.IsCi)
            {
                Assert.Fail($"CI=true but {Variable} is not set: .ci/run must install Chromium and point {Variable} at it.");
            }
            Assert.Skip($"Dashboard tests need headless Chromium: set {Variable} (e.g. /usr/bin/chromium).");
        }
        Assert.True(File.Exists(path), $"{Variable}={path} does not exist");
        return path;
    }

    public static async Task<DashboardBrowser> LaunchAsync()
    {
        var path = RequireChromium();
        var playwright = await Playwright.CreateAsync();
        try
        {
            var browser = await playwright.Chromium.LaunchAsync(new BrowserTypeLaunchOptions
            {
                ExecutablePath = path,
                Headless = true,
                Args = ChromiumArgs,
            });
            return new DashboardBrowser(playwright, browser);
        }
        catch
        {
            playwright.Dispose();
            throw;
        }
    }

    /// <summary>A fresh context (its own sessionStorage) and page; a phone viewport when asked.</summary>
    public async Task<IPage> NewPageAsync(bool phone = false)
    {
        var context = await Browser.NewContextAsync(new BrowserNewContextOptions
        {
            ViewportSize = phone ? new ViewportSize { Width = 390, Height = 844 } : new ViewportSize { Width = 1280, Height = 800 },
            IsMobile = phone,
            HasTouch = phone,
        });
        context.SetDefaultTimeout(30_000); // generous: CI runs servers, pipelines and Chromium on 2 cores
        var page = await context.NewPageAsync();
        page.PageError += (_, error) =>
        {
            lock (_pageErrors)
            {
                _pageErrors.Add(error);
            }
        };
        return page;
    }

    public static Task ScreenshotAsync(IPage page, string name) =>
        page.ScreenshotAsync(new PageScreenshotOptions { Path = Path.Combine(ScreenshotDir, name + ".png"), FullPage = true });

    public async ValueTask DisposeAsync()
    {
        await Browser.DisposeAsync();
        _playwright.Dispose();
    }
}
