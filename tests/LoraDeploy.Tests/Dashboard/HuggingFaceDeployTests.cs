using System.Net.Http.Json;
using System.Text.Json;
using System.Text.RegularExpressions;
using LoraDeploy.Lora.Tests.Support;
using LoraDeploy.Tests.Serving;
using LoraDeploy.Tests.Simulator;
using Microsoft.Playwright;

namespace LoraDeploy.Tests.Dashboard;

/// <summary>
/// The real server with an LLM pool (<see cref="LoraModelImportTests.LlmPoolSettings"/>: a generated tiny Llama GGUF
/// and the <see cref="HuggingFaceSimulator"/>), so an import from the dashboard really runs to <c>deploying</c>.
/// Started on first use, so a test that skips starts nothing.
/// </summary>
public sealed class HuggingFaceDashboardEnvironment : IAsyncDisposable
{
    public const string Pool = LoraModelImportTests.Pool;

    private readonly SemaphoreSlim _gate = new(1, 1);
    private string? _dir;
    private HuggingFaceSimulator? _hub;
    private TinyLlama? _model;
    private E2eEnvironment? _env;

    public HuggingFaceSimulator Hub => _hub ?? throw NotStarted();

    public E2eEnvironment Env => _env ?? throw NotStarted();

    public async Task StartAsync()
    {
        await _gate.WaitAsync();
        try
        {
            if (_env is not null)
            {
                return;
            }
            _dir ??= Directory.CreateTempSubdirectory("dash-hf-").FullName;
            _hub ??= await HuggingFaceSimulator.StartAsync();
            _model ??= new TinyLlama().Generate();
            var gguf = _model.WriteGguf(Path.Combine(_dir, "tiny.gguf"));
            var env = E2eEnvironment.WithSettings(LoraModelImportTests.LlmPoolSettings(_hub, gguf));
            try
            {
                await env.StartAsync();
            }
            catch
            {
                await env.DisposeAsync();
                throw;
            }
            _env = env;
        }
        finally
        {
            _gate.Release();
        }
    }

    /// <summary>A PEFT adapter repo that fits the pool's base.</summary>
    public HfSimRepo AddAdapter(string repoId, HfVisibility visibility = HfVisibility.Public)
    {
        var fixture = new PeftAdapterFixture { Rank = 4, Alpha = 8 };
        return Hub.AddAdapter(repoId, fixture.Generate(_model ?? throw NotStarted()).Safetensors().ToBytes(), visibility, fixture.ConfigJson());
    }

    private static InvalidOperationException NotStarted() => new("call StartAsync first");

    public async ValueTask DisposeAsync()
    {
        if (_env is not null)
        {
            await _env.DisposeAsync();
        }
        if (_hub is not null)
        {
            await _hub.DisposeAsync();
        }
        if (_dir is not null)
        {
            Directory.Delete(_dir, recursive: true);
        }
        _gate.Dispose();
    }
}

/// <summary>
/// "New deployment" → "Hugging Face PEFT adapter (LLM)" in headless Chromium against the real server: the form posts
/// <c>/lora-model</c>, 422s land beside their fields, and the Hugging Face token is sent once and kept nowhere.
/// </summary>
public sealed class HuggingFaceDeployTests(HuggingFaceDashboardEnvironment fixture) : IClassFixture<HuggingFaceDashboardEnvironment>
{
    private const string Pool = HuggingFaceDashboardEnvironment.Pool;
    private static readonly TimeSpan DeployTimeout = TimeSpan.FromSeconds(60);

    static HuggingFaceDeployTests() => Assertions.SetDefaultExpectTimeout(15_000);

    private E2eEnvironment Env => fixture.Env;

    private async Task<DashboardBrowser> StartAsync()
    {
        DashboardBrowser.RequireChromium(); // skip (or fail under CI) before starting any server
        await fixture.StartAsync();
        return await DashboardBrowser.LaunchAsync();
    }

    private string Url(string hash) => new Uri(Env.BaseUrl, "/" + hash).ToString();

    private async Task<IPage> NewFormAsync(DashboardBrowser browser, bool phone = false)
    {
        var page = await browser.NewPageAsync(phone);
        await page.GotoAsync(Url("#/new"));
        await page.GetByLabel("API token").FillAsync(Env.Token);
        await page.GetByRole(AriaRole.Button, new() { Name = "Sign in" }).ClickAsync();
        await page.GetByRole(AriaRole.Heading, new() { Name = "New LoRA deployment" }).WaitForAsync();
        await page.GetByLabel("Hugging Face PEFT adapter (LLM)").CheckAsync();
        // The pools are in once the only LLM pool is chosen.
        await Assertions.Expect(page.GetByLabel("Base model")).ToHaveValueAsync(Pool);
        return page;
    }

    private static async Task FillAsync(IPage page, string repo, string name, string? token = null)
    {
        await page.GetByLabel("Hugging Face repo").FillAsync(repo);
        await page.GetByLabel("Name", new() { Exact = true }).FillAsync(name);
        await page.GetByLabel("Base model").SelectOptionAsync(Pool);
        await page.GetByLabel("Hugging Face token (optional)").FillAsync(token ?? "");
    }

    /// <summary>Everything the page keeps that a script or a later visitor could read: storage, the DOM, every control's value.</summary>
    private static Task<string> EverythingKeptAsync(IPage page) => page.EvaluateAsync<string>("""
        () => [
          JSON.stringify({ ...localStorage }),
          JSON.stringify({ ...sessionStorage }),
          document.documentElement.outerHTML,
          [...document.querySelectorAll("input, textarea, select")].map((e) => e.value).join("\n"),
          location.href,
        ].join("\n")
        """);

    /// <summary>Waits for the deploy view to settle and expects <c>deploying</c>; a failed import says why.</summary>
    private static async Task ExpectDeployingAsync(IPage page)
    {
        var status = page.Locator("main .page-head [data-status]");
        await Assertions.Expect(status).ToHaveAttributeAsync("data-status", new Regex("^(deploying|running|failed)$"),
            new() { Timeout = (float)DeployTimeout.TotalMilliseconds });
        var reason = await page.Locator("main .notice.error").AllTextContentsAsync();
        Assert.True(await status.GetAttributeAsync("data-status") == "deploying", $"the import did not reach deploying: {string.Join(" ", reason)}");
    }

    [Fact]
    public async Task A_hugging_face_adapter_deploys_from_the_form_and_its_view_reaches_deploying()
    {
        await using var browser = await StartAsync();
        fixture.AddAdapter("alice/dash-adapter");

        // The list says which base models are LLM pools.
        var models = await Env.GetJsonAsync("v1/base-models");
        Assert.Equal("llamacpp", models.EnumerateArray().Single(m => m.GetProperty("name").GetString() == Pool).GetProperty("engine").GetString());
        Assert.Equal(JsonValueKind.Null, models.EnumerateArray().Single(m => m.GetProperty("name").GetString() == E2eEnvironment.Flux).GetProperty("engine").ValueKind);

        var page = await browser.NewPageAsync();
        await page.GotoAsync(Url("#/new"));
        await page.GetByLabel("API token").FillAsync(Env.Token);
        await page.GetByRole(AriaRole.Button, new() { Name = "Sign in" }).ClickAsync();
        // CivitAI stays the default, and its base models are the image ones only.
        await Assertions.Expect(page.GetByLabel("CivitAI LoRA (image)")).ToBeCheckedAsync();
        await Assertions.Expect(page.GetByLabel("Base model").Locator($"option[value='{E2eEnvironment.Flux}']")).ToHaveCountAsync(1);
        await Assertions.Expect(page.GetByLabel("Base model").Locator($"option[value='{Pool}']")).ToHaveCountAsync(0);

        await page.GetByLabel("Hugging Face PEFT adapter (LLM)").CheckAsync();
        await Assertions.Expect(page.GetByLabel("CivitAI URL")).ToHaveCountAsync(0);
        await Assertions.Expect(page.GetByLabel("Base model").Locator("option")).ToHaveCountAsync(1);
        await Assertions.Expect(page.GetByLabel("Base model")).ToHaveValueAsync(Pool);
        await Assertions.Expect(page.GetByLabel("Hugging Face token (optional)")).ToHaveAttributeAsync("type", "password");
        await Assertions.Expect(page.GetByLabel("Hugging Face token (optional)")).ToHaveAttributeAsync("autocomplete", "off");
        await FillAsync(page, "https://huggingface.co/alice/dash-adapter", "dash-llm");
        await DashboardBrowser.ScreenshotAsync(page, "40-new-hf-filled");
        await page.GetByRole(AriaRole.Button, new() { Name = "Deploy" }).ClickAsync();

        await Assertions.Expect(page).ToHaveURLAsync(new Regex("#/lora/dash-llm$"), new() { Timeout = 30_000 });
        await page.GetByRole(AriaRole.Heading, new() { Name = $"{Env.User}/dash-llm" }).WaitForAsync();
        await ExpectDeployingAsync(page);
        await Assertions.Expect(page.GetByRole(AriaRole.Link, new() { Name = "alice/dash-adapter" }))
            .ToHaveAttributeAsync("href", "https://huggingface.co/alice/dash-adapter");
        var report = page.Locator("section", new() { Has = page.GetByRole(AriaRole.Heading, new() { Name = "Adapter report" }) });
        await Assertions.Expect(report).ToContainTextAsync("q_proj");
        await DashboardBrowser.ScreenshotAsync(page, "41-hf-deploying");

        var lora = await Env.GetJsonAsync("v1/lora/dash-llm");
        Assert.Equal(("huggingface", Pool), (lora.GetProperty("source").GetProperty("type").GetString(), lora.GetProperty("base_model").GetString()));
        var deploy = await Env.GetJsonAsync($"deploy/{lora.GetProperty("deploy_id").GetString()}");
        Assert.Equal(("text-generation", "deploying"), (deploy.GetProperty("task").GetString(), deploy.GetProperty("status").GetString()));
        Assert.Empty(browser.PageErrors);
    }

    [Fact]
    public async Task A_bad_repo_or_name_shows_the_422_message_beside_its_field()
    {
        await using var browser = await StartAsync();
        var page = await NewFormAsync(browser);

        await FillAsync(page, "not a repo!", "dash-bad-repo");
        await page.GetByRole(AriaRole.Button, new() { Name = "Deploy" }).ClickAsync();
        var repoError = page.Locator("#hf_model_name-error");
        await Assertions.Expect(repoError).ToContainTextAsync("owner/repo");
        await Assertions.Expect(repoError).Not.ToContainTextAsync("Value error");
        await Assertions.Expect(page.GetByLabel("Hugging Face repo")).ToHaveAttributeAsync("aria-invalid", "true");
        await Assertions.Expect(page.GetByLabel("Hugging Face repo")).ToBeFocusedAsync();
        await Assertions.Expect(page.Locator("#lora_model_name-error")).ToBeEmptyAsync();
        await Assertions.Expect(page.Locator("#base_model_name-error")).ToBeEmptyAsync();
        await Assertions.Expect(page).ToHaveURLAsync(new Regex("#/new$"));
        await DashboardBrowser.ScreenshotAsync(page, "42-new-hf-bad-repo");

        // A bad name instead: the repo's message goes, the name gets its own.
        await FillAsync(page, "alice/whatever", "-starts-with-a-dash");
        await page.GetByRole(AriaRole.Button, new() { Name = "Deploy" }).ClickAsync();
        await Assertions.Expect(page.Locator("#lora_model_name-error")).ToContainTextAsync("lora_model_name");
        await Assertions.Expect(repoError).ToBeEmptyAsync();
        await Assertions.Expect(page.GetByLabel("Hugging Face repo")).Not.ToHaveAttributeAsync("aria-invalid", "true");
        await Assertions.Expect(page.GetByLabel("Name", new() { Exact = true })).ToBeFocusedAsync();

        // A name already taken (409) is reported beside the name too.
        using (var http = Env.Http())
        {
            using var taken = await http.PostAsJsonAsync("lora-model", new { hf_model_name = "alice/taken", lora_model_name = "dash-hf-taken", base_model_name = Pool });
            Assert.True(taken.IsSuccessStatusCode, await taken.Content.ReadAsStringAsync());
        }
        await FillAsync(page, "alice/whatever", "dash-hf-taken");
        await page.GetByRole(AriaRole.Button, new() { Name = "Deploy" }).ClickAsync();
        await Assertions.Expect(page.Locator("#lora_model_name-error")).ToContainTextAsync("dash-hf-taken");
        await Assertions.Expect(page.Locator("#lora_model_name-error")).ToContainTextAsync("already exists");
        Assert.Empty(browser.PageErrors);
    }

    [Fact]
    public async Task The_token_is_used_for_the_import_and_kept_nowhere_in_the_page()
    {
        await using var browser = await StartAsync();
        fixture.AddAdapter("alice/dash-private", HfVisibility.Private); // needs Hub.ValidToken
        var secret = fixture.Hub.ValidToken;
        var page = await NewFormAsync(browser);

        // Refused (422): the form stays, its token field is empty, the token is nowhere.
        await FillAsync(page, "alice/dash-private@", "dash-private", secret);
        await page.GetByRole(AriaRole.Button, new() { Name = "Deploy" }).ClickAsync();
        await Assertions.Expect(page.Locator("#hf_model_name-error")).ToContainTextAsync("revision");
        await Assertions.Expect(page.GetByLabel("Hugging Face token (optional)")).ToHaveValueAsync("");
        Assert.DoesNotContain(secret, await EverythingKeptAsync(page));

        // Accepted: the private repo imports (so the token reached the server) and the page keeps nothing of it.
        await FillAsync(page, "alice/dash-private", "dash-private", secret);
        await page.GetByRole(AriaRole.Button, new() { Name = "Deploy" }).ClickAsync();
        await Assertions.Expect(page).ToHaveURLAsync(new Regex("#/lora/dash-private$"), new() { Timeout = 30_000 });
        await ExpectDeployingAsync(page);
        Assert.DoesNotContain(secret, await EverythingKeptAsync(page));

        // Nor does a new form: the field starts empty, not refilled from anywhere.
        await page.GotoAsync(Url("#/new"));
        await page.GetByLabel("Hugging Face PEFT adapter (LLM)").CheckAsync();
        await Assertions.Expect(page.GetByLabel("Hugging Face token (optional)")).ToHaveValueAsync("");
        Assert.DoesNotContain(secret, await EverythingKeptAsync(page));
        Assert.Empty(browser.PageErrors);
    }

    [Fact]
    public async Task The_hugging_face_form_fits_a_phone()
    {
        await using var browser = await StartAsync();
        var page = await NewFormAsync(browser, phone: true);
        await FillAsync(page, "not a repo!", "dash-phone");
        await page.GetByRole(AriaRole.Button, new() { Name = "Deploy" }).ClickAsync();
        await Assertions.Expect(page.Locator("#hf_model_name-error")).ToContainTextAsync("owner/repo");
        await DashboardBrowser.ScreenshotAsync(page, "43-phone-new-hf");
        var overflow = await page.EvaluateAsync<int>("document.documentElement.scrollWidth - document.documentElement.clientWidth");
        Assert.True(overflow <= 0, $"the Hugging Face form scrolls sideways by {overflow}px on a phone");
        Assert.Empty(browser.PageErrors);
    }
}

/// <summary>A server without an LLM pool (only the default image base models): the Hugging Face choice says how to add one.</summary>
public sealed class HuggingFaceNoLlmPoolTests(E2eEnvironment env) : IClassFixture<E2eEnvironment>
{
    static HuggingFaceNoLlmPoolTests() => Assertions.SetDefaultExpectTimeout(15_000);

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Without_an_llm_pool_the_hugging_face_choice_explains_how_to_configure_one(bool phone)
    {
        DashboardBrowser.RequireChromium();
        await env.StartAsync();
        await using var browser = await DashboardBrowser.LaunchAsync();
        Assert.All((await env.GetJsonAsync("v1/base-models")).EnumerateArray(), m => Assert.Equal(JsonValueKind.Null, m.GetProperty("engine").ValueKind));

        var page = await browser.NewPageAsync(phone);
        await page.GotoAsync(new Uri(env.BaseUrl, "/#/new").ToString());
        await page.GetByLabel("API token").FillAsync(env.Token);
        await page.GetByRole(AriaRole.Button, new() { Name = "Sign in" }).ClickAsync();
        await page.GetByLabel("CivitAI URL").WaitForAsync();
        await page.WaitForLoadStateAsync(LoadState.NetworkIdle);

        await page.GetByLabel("Hugging Face PEFT adapter (LLM)").CheckAsync();
        var message = page.Locator("[data-no-llm-pool]");
        await Assertions.Expect(message).ToBeVisibleAsync();
        await Assertions.Expect(message).ToContainTextAsync("BaseModels:{name}:Engine=llamacpp");
        await Assertions.Expect(message).ToContainTextAsync("BaseModels:{name}:Gguf=");
        await Assertions.Expect(page.GetByLabel("Hugging Face repo")).ToHaveCountAsync(0);
        await Assertions.Expect(page.GetByRole(AriaRole.Button, new() { Name = "Deploy" })).ToBeHiddenAsync();
        await DashboardBrowser.ScreenshotAsync(page, phone ? "44-phone-new-hf-no-pool" : "44-new-hf-no-pool");
        var overflow = await page.EvaluateAsync<int>("document.documentElement.scrollWidth - document.documentElement.clientWidth");
        Assert.True(overflow <= 0, $"the no-pool message scrolls sideways by {overflow}px");

        // Back to CivitAI: its form and button return.
        await page.GetByLabel("CivitAI LoRA (image)").CheckAsync();
        await Assertions.Expect(message).ToHaveCountAsync(0);
        await Assertions.Expect(page.GetByLabel("CivitAI URL")).ToBeVisibleAsync();
        await Assertions.Expect(page.GetByRole(AriaRole.Button, new() { Name = "Deploy" })).ToBeVisibleAsync();
        Assert.Empty(browser.PageErrors);
    }
}
