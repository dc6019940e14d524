using System.Globalization;
using System.Net;
using System.Net.Http.Json;
using System.Reflection;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.Extensions.Options;

namespace LoraDeploy.Workers.Host;

/// <summary>
/// Starts the engines, then, for each engine unit: registers with the server, heartbeats (queue depth, busy slots,
/// resident adapters) and applies the server's assignments. A 404 heartbeat means the server forgot this worker:
/// register again. While the server is unreachable the worker keeps serving and retries with backoff, logging once
/// per outage.
/// </summary>
public sealed class WorkerAgent(
    WorkerRuntime runtime,
    IHttpClientFactory http,
    IOptions<WorkerOptions> options,
    IConfiguration configuration,
    IServer server,
    IHostApplicationLifetime lifetime,
    TimeProvider time,
    ILogger<WorkerAgent> logger) : BackgroundService
{
    private static readonly TimeSpan MaxBackoff = TimeSpan.FromSeconds(30);

    public static string Version { get; } =
        typeof(WorkerAgent).Assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion ?? "0.0.0";

    /// <summary>The URL the server is told to call (known once the listener is up).</summary>
    public string? AdvertisedUrl { get; private set; }

    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        // The listener's real address (port 0 resolves at start) exists only once the server has started.
        var started = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        await using (lifetime.ApplicationStarted.Register(() => started.TrySetResult()))
        {
            await started.Task.WaitAsync(stoppingToken);
        }
        AdvertisedUrl = AdvertiseUrl();
        foreach (var unit in runtime.Units)
        {
            logger.LogInformation("Starting the {Engine} engine for pools {Pools}.", unit.Engine.Engine, string.Join(", ", unit.Pools.Keys));
            await unit.Engine.StartAsync([.. unit.Pools.Values], stoppingToken);
            unit.Started = true;
        }
        var id = WorkerIdentity.Get(options.Value, configuration);
        await Task.WhenAll(runtime.Units.Select(unit =>
            RunUnitAsync(unit, runtime.Units.Count == 1 ? id : WorkerIdentity.ForEngine(id, unit.Engine.Engine), stoppingToken)));
    }

    private async Task RunUnitAsync(WorkerUnit unit, string id, CancellationToken ct)
    {
        string? registeredId = null;
        var period = TimeSpan.FromSeconds(2);
        var failures = 0;
        try
        {
            while (!ct.IsCancellationRequested)
            {
                try
                {
                    if (unit.Engine.Problem is { } problem)
                    {
                        // The engine cannot serve (its ComfyUI stopped, say): out of routing now, back once it recovers.
                        if (registeredId is not null)
                        {
                            logger.LogWarning("The {Engine} engine cannot serve ({Problem}): leaving routing until it recovers.", unit.Engine.Engine, problem);
                            await LeaveAsync(registeredId);
                            registeredId = null;
                        }
                        if (await unit.Engine.CheckHealthAsync(ct) is not null)
                        {
                            await unit.WaitForNextBeatAsync(period, time, ct);
                            continue;
                        }
                        logger.LogInformation("The {Engine} engine can serve again: registering.", unit.Engine.Engine);
                    }
                    if (registeredId is null)
                    {
                        var registered = await RegisterAsync(unit, id, ct);
                        registeredId = registered.Id;
                        period = TimeSpan.FromSeconds(Math.Clamp(registered.HeartbeatSeconds, 1, 300));
                        logger.LogInformation("Registered as worker {Id} ({Engine}: {Pools}) at {Url}; heartbeat every {Seconds} s.",
                            registeredId, unit.Engine.Engine, string.Join(", ", unit.Pools.Keys), AdvertisedUrl, period.TotalSeconds);
                    }
                    var assignments = await HeartbeatAsync(unit, registeredId, ct);
                    if (failures > 0)
                    {
                        logger.LogInformation("The server at {Server} answers again.", options.Value.Server);
                        failures = 0;
                    }
                    if (assignments is null)
                    {
                        logger.LogWarning("The server no longer knows worker {Id} (missed heartbeats?): registering again.", registeredId);
                        registeredId = null;
                        continue;
                    }
                    unit.Residency.Apply(assignments, unit.Wake);
                    await unit.WaitForNextBeatAsync(period, time, ct);
                }
                catch (Exception e) when (!ct.IsCancellationRequested)
                {
                    if (failures++ == 0)
                    {
                        logger.LogWarning("The server at {Server} cannot be reached or refused this worker ({Reason}); still serving, retrying with backoff.",
                            options.Value.Server, e.Message);
                    }
                    var backoff = TimeSpan.FromSeconds(Math.Min(MaxBackoff.TotalSeconds, Math.Pow(2, Math.Min(failures, 5)) / 2));
                    await Task.Delay(backoff, time, ct);
                }
            }
        }
        finally
        {
            // Cancelled means this worker is stopping (the only way the loop ends): say so while the server still listens.
            if (registeredId is not null && ct.IsCancellationRequested)
            {
                await LeaveAsync(registeredId);
            }
        }
    }

    /// <summary>Stopping on purpose: tell the server, so requests stop coming now rather than after missed heartbeats.</summary>
    private async Task LeaveAsync(string id)
    {
        try
        {
            using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(2));
            using var response = await http.CreateClient(WorkerBlobCache.HttpClientName).PostAsync(string.Format(WorkerProtocol.LeavePathFormat, id), null, timeout.Token);
            logger.LogInformation("Left the server as worker {Id} ({Status}).", id, (int)response.StatusCode);
        }
        catch (Exception e) when (e is HttpRequestException or OperationCanceledException or ObjectDisposedException)
        {
            logger.LogInformation("Could not tell the server that worker {Id} stops ({Reason}); it forgets it after missed heartbeats.", id, e.Message);
        }
    }

    private async Task<WorkerRegistered> RegisterAsync(WorkerUnit unit, string id, CancellationToken ct)
    {
        var registration = new WorkerRegistration(id, unit.Engine.Engine, [.. unit.Pools.Keys], unit.Slots.Count, AdvertisedUrl!, Version, runtime.CallKey);
        var client = http.CreateClient(WorkerBlobCache.HttpClientName);
        using var response = await client.PostAsJsonAsync(WorkerProtocol.RegisterPath, registration, WorkerJsonContext.Default.WorkerRegistration, ct);
        await EnsureSuccessAsync(response, "registration", ct);
        return await response.Content.ReadFromJsonAsync(WorkerJsonContext.Default.WorkerRegistered, ct)
            ?? throw new HttpRequestException("the server answered the registration with an empty body");
    }

    /// <summary>The assignments, or null when the server answered 404 (it does not know this worker).</summary>
    private async Task<WorkerAssignments?> HeartbeatAsync(WorkerUnit unit, string id, CancellationToken ct)
    {
        var heartbeat = new WorkerHeartbeat(unit.Slots.QueueDepth, unit.Slots.BusySlots, unit.Residency.Snapshot());
        var client = http.CreateClient(WorkerBlobCache.HttpClientName);
        var path = string.Format(CultureInfo.InvariantCulture, WorkerProtocol.HeartbeatPathFormat, Uri.EscapeDataString(id));
        using var response = await client.PostAsJsonAsync(path, heartbeat, WorkerJsonContext.Default.WorkerHeartbeat, ct);
        if (response.StatusCode == HttpStatusCode.NotFound)
        {
            return null;
        }
        await EnsureSuccessAsync(response, "heartbeat", ct);
        return await response.Content.ReadFromJsonAsync(WorkerJsonContext.Default.WorkerAssignments, ct)
            ?? throw new HttpRequestException("the server answered the heartbeat with an empty body");
    }

    private static async Task EnsureSuccessAsync(HttpResponseMessage response, string what, CancellationToken ct)
    {
        if (!response.IsSuccessStatusCode)
        {
            var body = await response.Content.ReadAsStringAsync(ct);
            throw new HttpRequestException(
                $"the server answered the {what} with {(int)response.StatusCode}: {(body.Length > 300 ? body[..300] : body)}", null, response.StatusCode);
        }
    }

    /// <summary><see cref="WorkerOptions.AdvertiseUrl"/>, else the first address listened on (a wildcard host becomes this machine's name).</summary>
    private string AdvertiseUrl()
    {
        if (options.Value.AdvertiseUrl is { Length: > 0 } configured)
        {
            return configured.TrimEnd('/');
        }
        var address = server.Features.Get<IServerAddressesFeature>()?.Addresses.FirstOrDefault()
            ?? throw new InvalidOperationException("The worker listens on no address; give --urls.");
        var uri = new UriBuilder(address.Replace("://+", "://0.0.0.0", StringComparison.Ordinal).Replace("://*", "://0.0.0.0", StringComparison.Ordinal));
        if (uri.Host is "0.0.0.0" or "[::]" or "::")
        {
            uri.Host = Dns.GetHostName();
        }
        return uri.Uri.GetLeftPart(UriPartial.Authority);
    }
}
