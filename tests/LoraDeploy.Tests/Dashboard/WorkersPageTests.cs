using System.Net;
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Text.RegularExpressions;
using LoraDeploy.Auth;
using LoraDeploy.Tests.Serving;
using LoraDeploy.Workers;
using Microsoft.EntityFrameworkCore;
using Microsoft.Playwright;

namespace LoraDeploy.Tests.Dashboard;

/// <summary>
/// The dashboard's Workers page (admin tokens) and the instances on a deploy's view, in headless Chromium against the
/// real server with a serving pool and test workers (<see cref="FakeWorker"/>) registered through the worker protocol.
/// Each test has a server of its own: workers and placement are server-wide state.
/// </summary>
public sealed class WorkersPageTests
{
    private const string Pool = E2eEnvironment.Flux;

    static WorkersPageTests() => Assertions.SetDefaultExpectTimeout(15_000);

    /// <summary>A comfyui pool for FLUX.1 (never called: the test workers answer themselves); no embedded worker.</summary>
    private static Dictionary<string, string?> PoolSettings()
    {
        var settings = ServingCoreTests.PoolSettings();
        // Workers stay listed while a loaded CI machine delays their heartbeats; the page's own refresh is what is tested.
        settings["Workers:TimeoutSeconds"] = "120";
        settings["Workers:MaxOutstandingPerPool"] = "200";
        settings["Workers:RequestTimeoutSeconds"] = "60";
        return settings;
    }

    private sealed class Context(E2eEnvironment env, DashboardBrowser browser, string adminToken, string workerToken) : IAsyncDisposable
    {
        public E2eEnvironment Env => env;
        public DashboardBrowser Browser => browser;
        public string AdminToken => adminToken;
        public string WorkerToken => workerToken;
        public List<FakeWorker> Workers { get; } = [];

        public string Url(string hash) => new Uri(env.BaseUrl, "/" + hash).ToString();

        public async Task<FakeWorker> WorkerAsync(string id, int slots = 2)
        {
            var worker = await FakeWorker.StartAsync(env.BaseUrl, workerToken, id, Pool, slots: slots);
            Workers.Add(worker);
            return worker;
        }

        public async ValueTask DisposeAsync()
        {
            foreach (var worker in Workers)
            {
                await worker.DisposeAsync();
            }
            await browser.DisposeAsync();
            await env.DisposeAsync();
        }
    }

    private static async Task<Context> StartAsync()
    {
        DashboardBrowser.RequireChromium(); // skip (or fail under CI) before starting any server
        var env = E2eEnvironment.WithSettings(PoolSettings());
        try
        {
            await env.StartAsync();
            var admin = await env.Server.QueryAsync(db =>
                ApiTokens.CreateForUserAsync(db, "ops-admin", isAdmin: true, "test", DateTime.UtcNow, CancellationToken.None));
            var worker = await env.Server.QueryAsync(db => WorkerTokens.CreateAsync(db, "gpu-box", DateTime.UtcNow, CancellationToken.None));
            return new Context(env, await DashboardBrowser.LaunchAsync(), admin, worker);
        }
        catch
        {
            await env.DisposeAsync();
            throw;
        }
    }

    private static async Task SignInAsync(Context c, IPage page, string token, string hash)
    {
        await page.GotoAsync(c.Url(hash));
        await page.GetByLabel("API token").FillAsync(token);
        await page.GetByRole(AriaRole.Button, new() { Name = "Sign in" }).ClickAsync();
        await page.GetByRole(AriaRole.Button, new() { Name = "Sign out" }).WaitForAsync();
    }

    /// <summary>Creates a deploy as the environment's user and waits until its import is done (deploying or later).</summary>
    private static async Task<(string Id, string Sha)> DeployAsync(Context c, string name)
    {
        var id = (await c.Env.CreateViaApiAsync(name, c.Env.GoodUrl)).GetProperty("deploy_id").GetString()!;
        var deadline = DateTime.UtcNow.AddSeconds(60);
        while ((await c.Env.GetJsonAsync($"deploy/{id}")).GetProperty("status").GetString() is "initializing" or "downloading")
        {
            Assert.True(DateTime.UtcNow < deadline, $"deploy {name} never finished its import");
            await Task.Delay(100);
        }
        return (id, c.Env.Sha256);
    }

    private static async Task WaitForRunningAsync(Context c, string id, int running)
    {
        var deadline = DateTime.UtcNow.AddSeconds(60);
        while (true)
        {
            var deploy = await c.Env.GetJsonAsync($"deploy/{id}");
            if (deploy.GetProperty("status").GetString() == "running" && deploy.GetProperty("instances").GetProperty("running").GetInt32() == running)
            {
                return;
            }
            Assert.True(DateTime.UtcNow < deadline, $"deploy {id} never ran on {running} worker(s): {deploy}");
            await Task.Delay(100);
        }
    }

    private static ILocator WorkerRow(IPage page, string id) => page.Locator($"tbody tr[data-worker-id='{id}']");

    private static ILocator Cell(ILocator row, string label) => row.Locator($"td[data-label='{label}']");

    [Fact]
    public async Task An_admin_sees_every_worker_with_pools_slots_queue_resident_adapters_instances_and_heartbeat()
    {
        await using var c = await StartAsync();
        var (id, sha) = await DeployAsync(c, "ops-resident");
        await c.WorkerAsync("gpu-a", slots: 3);
        await WaitForRunningAsync(c, id, running: 1);

        var page = await c.Browser.NewPageAsync();
        await SignInAsync(c, page, c.AdminToken, "#/deploys");
        var link = page.GetByRole(AriaRole.Link, new() { Name = "Workers", Exact = true });
        await Assertions.Expect(link).ToBeVisibleAsync();
        await link.ClickAsync();
        await page.GetByRole(AriaRole.Heading, new() { Name = "Workers", Exact = true }).WaitForAsync();

        var row = WorkerRow(page, "gpu-a");
        await Assertions.Expect(Cell(row, "Worker")).ToContainTextAsync("gpu-box");
        await Assertions.Expect(Cell(row, "Worker")).ToContainTextAsync("comfyui");
        await Assertions.Expect(Cell(row, "Pools")).ToHaveTextAsync(Pool);
        await Assertions.Expect(Cell(row, "Slots")).ToHaveTextAsync("0/3 busy");
        await Assertions.Expect(Cell(row, "Queue")).ToHaveTextAsync("0");
        var resident = Cell(row, "Resident adapters").Locator("code");
        await Assertions.Expect(resident).ToHaveTextAsync(sha[..12]);
        await Assertions.Expect(resident).ToHaveAttributeAsync("data-sha256", sha);
        await Assertions.Expect(Cell(row, "Instances")).ToHaveTextAsync("1");
        await Assertions.Expect(Cell(row, "Last heartbeat")).ToContainTextAsync(new Regex(@"^\d+ s ago$"));
        await Assertions.Expect(page.Locator("main")).ToContainTextAsync("1 worker, 0/3 slots busy");
        await DashboardBrowser.ScreenshotAsync(page, "40-workers");

        // The page refreshes by itself: a worker that registers now appears without a reload.
        await c.WorkerAsync("gpu-b");
        await Assertions.Expect(WorkerRow(page, "gpu-b")).ToHaveCountAsync(1, new() { Timeout = 20_000 });
        await Assertions.Expect(Cell(WorkerRow(page, "gpu-b"), "Resident adapters")).ToHaveTextAsync("none");
        await Assertions.Expect(page.Locator("main")).ToContainTextAsync("2 workers, 0/5 slots busy");
        await DashboardBrowser.ScreenshotAsync(page, "41-workers-two");
        Assert.Empty(c.Browser.PageErrors);
    }

    [Fact]
    public async Task Load_figures_a_late_heartbeat_and_hostile_worker_strings_are_shown_as_text_and_fit_a_phone()
    {
        await using var c = await StartAsync();
        // A worker speaking the protocol by hand: its version is markup, its URL a 600-character unbroken path.
        var longUrl = "http://127.0.0.1:9/" + new string('x', 600);
        const string version = "<img src=x onerror=\"window.pwned=1\">";
        using (var http = new HttpClient { BaseAddress = c.Env.BaseUrl })
        {
            http.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", c.WorkerToken);
            var registered = await http.PostAsJsonAsync(WorkerProtocol.RegisterPath,
                new WorkerRegistration("odd-worker", "comfyui", [Pool], 4, longUrl, version, new string('k', 40)), WorkerJsonContext.Default.WorkerRegistration);
            Assert.Equal(HttpStatusCode.OK, registered.StatusCode);
            var beat = await http.PostAsJsonAsync(string.Format(WorkerProtocol.HeartbeatPathFormat, "odd-worker"),
                new WorkerHeartbeat(QueueDepth: 7, BusySlots: 3, Adapters: []), WorkerJsonContext.Default.WorkerHeartbeat);
            Assert.Equal(HttpStatusCode.OK, beat.StatusCode);
        }
        // It then falls silent: its last heartbeat is 40 s old (still listed: Workers:TimeoutSeconds is 120 here).
        await c.Env.Server.QueryAsync(db => db.Workers.Where(w => w.Id == "odd-worker")
            .ExecuteUpdateAsync(set => set.SetProperty(w => w.LastHeartbeatAt, DateTime.UtcNow.AddSeconds(-40))));

        foreach (var phone in new[] { false, true })
        {
            var page = await c.Browser.NewPageAsync(phone);
            await SignInAsync(c, page, c.AdminToken, "#/workers");
            var row = WorkerRow(page, "odd-worker");
            await Assertions.Expect(Cell(row, "Slots")).ToHaveTextAsync("3/4 busy");
            await Assertions.Expect(Cell(row, "Queue")).ToHaveTextAsync("7");
            await Assertions.Expect(Cell(row, "Instances")).ToHaveTextAsync("0");
            await Assertions.Expect(Cell(row, "Last heartbeat")).ToContainTextAsync(new Regex(@"^4\d s ago"));
            await Assertions.Expect(Cell(row, "Last heartbeat")).ToContainTextAsync("missing heartbeats");
            await Assertions.Expect(Cell(row, "Worker")).ToContainTextAsync(version);
            await Assertions.Expect(Cell(row, "Worker").Locator("img")).ToHaveCountAsync(0);
            Assert.Null(await page.EvaluateAsync<int?>("window.pwned"));
            var width = phone ? 390 : 1280;
            await DashboardBrowser.ScreenshotAsync(page, $"42-workers-odd-{width}");

            var overflow = await page.EvaluateAsync<int>("document.documentElement.scrollWidth - document.documentElement.clientWidth");
            Assert.True(overflow <= 0, $"#/workers scrolls sideways by {overflow}px at {width}px");
            var spill = await page.EvaluateAsync<string>(
                "() => [...document.querySelectorAll('td, td div, td li')].filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.className || e.tagName).join(', ')");
            Assert.True(spill == "", $"#/workers at {width}px: text runs out of {spill}");
        }
        Assert.Empty(c.Browser.PageErrors);
    }

    [Fact]
    public async Task A_user_token_sees_no_workers_link_and_a_clear_message_on_the_workers_page()
    {
        await using var c = await StartAsync();
        await c.WorkerAsync("gpu-a");
        var page = await c.Browser.NewPageAsync();
        await SignInAsync(c, page, c.Env.Token, "#/deploys");
        await page.GetByRole(AriaRole.Heading, new() { Name = "Deployments" }).WaitForAsync();
        await page.WaitForLoadStateAsync(LoadState.NetworkIdle);
        await Assertions.Expect(page.GetByRole(AriaRole.Link, new() { Name = "Workers", Exact = true })).ToBeHiddenAsync();

        await page.GotoAsync(c.Url("#/workers"));
        await Assertions.Expect(page.Locator(".notice.error")).ToContainTextAsync("administrators only");
        await Assertions.Expect(page.Locator("tbody tr")).ToHaveCountAsync(0);
        await Assertions.Expect(page.GetByText("gpu-a")).ToHaveCountAsync(0);
        await DashboardBrowser.ScreenshotAsync(page, "43-workers-not-admin");
        Assert.Empty(c.Browser.PageErrors);
    }

    [Fact]
    public async Task A_deploy_shows_its_instances_pending_then_running_as_workers_take_it()
    {
        await using var c = await StartAsync();
        var (id, _) = await DeployAsync(c, "ops-instances");
        var page = await c.Browser.NewPageAsync();
        await SignInAsync(c, page, c.Env.Token, "#/lora/ops-instances");

        // No worker yet: wanted, so counted as pending.
        var serving = page.Locator("section", new() { Has = page.GetByRole(AriaRole.Heading, new() { Name = "Serving" }) });
        var instances = serving.Locator(".instances");
        await Assertions.Expect(instances).ToHaveTextAsync("0 running · 1 pending");
        await Assertions.Expect(page.Locator("[data-status]").First).ToHaveAttributeAsync("data-status", "deploying");
        await Assertions.Expect(serving).ToContainTextAsync("min 1, max 1 instances");
        await DashboardBrowser.ScreenshotAsync(page, "44-lora-pending");

        // A worker takes it; the open page follows without a reload.
        await c.WorkerAsync("gpu-a");
        await WaitForRunningAsync(c, id, running: 1);
        await Assertions.Expect(instances).ToHaveTextAsync("1 running · 0 pending", new() { Timeout = 20_000 });
        await Assertions.Expect(page.Locator("[data-status]").First).ToHaveAttributeAsync("data-status", "running");
        await DashboardBrowser.ScreenshotAsync(page, "45-lora-running");

        // Scaled to two copies with one worker: one runs, one waits.
        using (var http = c.Env.Http())
        {
            var put = await http.PutAsJsonAsync($"deploy/{id}", new { settings = new { min_instances = 2, max_instances = 2 } });
            Assert.True(put.IsSuccessStatusCode, await put.Content.ReadAsStringAsync());
        }
        await Assertions.Expect(instances).ToHaveTextAsync("1 running · 1 pending", new() { Timeout = 20_000 });
        await Assertions.Expect(serving).ToContainTextAsync("min 2, max 2 instances");

        await page.GotoAsync(c.Url("#/deploys"));
        var row = page.Locator("tbody tr").Filter(new() { Has = page.GetByRole(AriaRole.Link, new() { Name = $"{c.Env.User}/ops-instances", Exact = true }) });
        await Assertions.Expect(row.Locator("td[data-label='Instances']")).ToHaveTextAsync("1 running · 1 pending");
        await DashboardBrowser.ScreenshotAsync(page, "46-deployments-instances");
        Assert.Empty(c.Browser.PageErrors);
    }
}
