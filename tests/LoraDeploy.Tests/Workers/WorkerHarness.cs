using System.Net.Http.Headers;
using LoraDeploy.Workers;
using LoraDeploy.Workers.Host;
using Microsoft.AspNetCore.Builder;

namespace LoraDeploy.Tests.Workers;

/// <summary>A real worker app (loopback Kestrel) with the <see cref="TestEchoEngine"/>, registered with a <see cref="FakeWorkerServer"/>.</summary>
public sealed class WorkerHarness : IAsyncDisposable
{
    public const string Pool = "tiny-llama";

    private readonly bool _ownsDataDir;

    private WorkerHarness(FakeWorkerServer server, WebApplication app, TestEchoEngine engine, string dataDir, bool ownsDataDir)
    {
        _ownsDataDir = ownsDataDir;
        Server = server;
        App = app;
        Engine = engine;
        DataDir = dataDir;
    }

    public FakeWorkerServer Server { get; }

    public WebApplication App { get; }

    public TestEchoEngine Engine { get; }

    public string DataDir { get; }

    /// <summary>What the worker logged.</summary>
    public CapturedLog Log { get; private init; } = new();

    public WorkerRegistration Registration => Server.Registrations.First();

    public WorkerBlobCache Cache => App.Services.GetRequiredService<WorkerBlobCache>();

    public WorkerUnit Unit => App.Services.GetRequiredService<WorkerRuntime>().Units.Single();

    /// <param name="settings">Extra settings (<c>Worker:Slots</c>, <c>BaseModels:tiny-llama:MaxAdaptersPerWorker</c>, …).</param>
    /// <param name="engine">The engine (default: a llamacpp <see cref="TestEchoEngine"/>).</param>
    /// <param name="moreEngines">Engines of other kinds beside it.</param>
    /// <param name="heartbeatSeconds">The heartbeat period the server gives the worker.</param>
    public static async Task<WorkerHarness> StartAsync(IReadOnlyDictionary<string, string>? settings = null, string? dataDir = null,
        TestEchoEngine? engine = null, IReadOnlyList<TestEchoEngine>? moreEngines = null, int heartbeatSeconds = 1)
    {
        var server = await FakeWorkerServer.StartAsync();
        server.HeartbeatSeconds = heartbeatSeconds;
        var ownsDataDir = dataDir is null;
        dataDir ??= Path.Combine(Path.GetTempPath(), "loradeploy-tests", Guid.NewGuid().ToString("N"));
        var args = new List<string>
        {
            "--urls", "http://127.0.0.1:0",
            $"--DataDir={dataDir}",
            $"--Worker:Server={server.Url}",
            $"--Worker:Token={FakeWorkerServer.Token}",
            $"--BaseModels:{Pool}:Family=llama",
            $"--BaseModels:{Pool}:Engine=llamacpp",
            $"--BaseModels:{Pool}:Gguf=/models/tiny.gguf",
        };
        args.AddRange((settings ?? new Dictionary<string, string>()).Select(s => $"--{s.Key}={s.Value}"));
        engine ??= new TestEchoEngine();
        var log = new CapturedLog();
        var app = WorkerHost.Build([.. args], [engine, .. moreEngines ?? []], builder =>
        {
            builder.Logging.AddFilter("Microsoft", LogLevel.Warning);
            builder.Logging.AddProvider(log);
        });
        await app.StartAsync();
        var harness = new WorkerHarness(server, app, engine, dataDir, ownsDataDir) { Log = log };
        await Eventually.TrueAsync(() => !server.Heartbeats.IsEmpty, "the worker registers and heartbeats");
        return harness;
    }

    /// <summary>A client for the worker's surface, presenting the call key the worker registered (or <paramref name="callKey"/>).</summary>
    public HttpClient CreateClient(string? callKey = "registered")
    {
        var client = new HttpClient { BaseAddress = new Uri(Registration.Url) };
        if (callKey is not null)
        {
            client.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", callKey == "registered" ? Registration.CallKey : callKey);
        }
        return client;
    }

    /// <summary>An inference request as the server sends it.</summary>
    public static HttpRequestMessage Infer(string body = """{"prompt":"hi"}""", string adapters = "", string pool = Pool, string operation = Operations.Completions)
    {
        var request = new HttpRequestMessage(HttpMethod.Post, WorkerProtocol.InferPath) { Content = new StringContent(body, System.Text.Encoding.UTF8, "application/json") };
        request.Headers.Add(WorkerProtocol.PoolHeader, pool);
        request.Headers.Add(WorkerProtocol.OperationHeader, operation);
        request.Headers.Add(WorkerProtocol.AdaptersHeader, adapters);
        return request;
    }

    /// <summary>The state the last heartbeat reported for an adapter (null: not reported).</summary>
    public ResidentAdapter? Reported(string sha256) => Server.LastHeartbeat?.Adapters.FirstOrDefault(a => a.Sha256 == sha256);

    public async ValueTask DisposeAsync()
    {
        await App.StopAsync();
        await App.DisposeAsync();
        await Server.DisposeAsync();
        if (_ownsDataDir)
        {
            try
            {
                Directory.Delete(DataDir, recursive: true);
            }
            catch (IOException)
            {
            }
        }
    }
}

/// <summary>Waits for a condition the system reaches on its own (heartbeats, loads): a generous limit, never a timing claim.</summary>
public static class Eventually
{
    public static async Task TrueAsync(Func<bool> condition, string what)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
        while (!condition())
        {
            if (DateTime.UtcNow > deadline)
            {
                Assert.Fail($"Gave up waiting: {what}.");
            }
            await Task.Delay(25);
        }
    }

    public static async Task TrueAsync(Func<Task<bool>> condition, string what)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
        while (!await condition())
        {
            if (DateTime.UtcNow > deadline)
            {
                Assert.Fail($"Gave up waiting: {what}.");
            }
            await Task.Delay(25);
        }
    }
}

/// <summary>Keeps every log message (category, level, text) for assertions on what a person would read.</summary>
public sealed class CapturedLog : ILoggerProvider
{
    private readonly System.Collections.Concurrent.ConcurrentQueue<(string Category, LogLevel Level, string Message)> _entries = new();

    public IReadOnlyList<(string Category, LogLevel Level, string Message)> Entries => [.. _entries];

    public ILogger CreateLogger(string categoryName) => new Logger(this, categoryName);

    public void Dispose()
    {
    }

    private sealed class Logger(CapturedLog log, string category) : ILogger
    {
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

        public bool IsEnabled(LogLevel logLevel) => true;

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
            log._entries.Enqueue((category, logLevel, formatter(state, exception)));
    }
}
