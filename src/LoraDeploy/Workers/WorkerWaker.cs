using System.Net.Http.Headers;

namespace LoraDeploy.Workers;

/// <summary>
/// Tells workers that their assignments changed (<see cref="WorkerProtocol.WakePath"/>), so they heartbeat now and learn
/// them from the reply instead of at their next period. Best-effort and never awaited by placement: a worker that cannot
/// be reached (or predates the route) simply learns at its next heartbeat.
/// </summary>
public sealed partial class WorkerWaker(IHttpClientFactory http, TimeProvider time, ILogger<WorkerWaker> logger)
{
    /// <summary>A wake is worth less than a heartbeat period; a worker slower than this to answer hears it at the next beat.</summary>
    public static readonly TimeSpan Timeout = TimeSpan.FromSeconds(2);

    /// <summary>Starts one call per worker and returns at once.</summary>
    public void Wake(IEnumerable<(string Id, string Url, string CallKey)> workers)
    {
        foreach (var worker in workers)
        {
            _ = WakeAsync(worker.Id, worker.Url, worker.CallKey);
        }
    }

    private async Task WakeAsync(string id, string url, string callKey)
    {
        try
        {
            using var timeout = new CancellationTokenSource(Timeout, time);
            using var request = new HttpRequestMessage(HttpMethod.Post, url.TrimEnd('/') + WorkerProtocol.WakePath);
            request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", callKey);
            using var response = await http.CreateClient(Inference.InferenceEndpoints.WorkerClientName).SendAsync(request, timeout.Token);
            if (!response.IsSuccessStatusCode)
            {
                LogRefused(id, (int)response.StatusCode);
            }
        }
        catch (Exception e) when (e is HttpRequestException or OperationCanceledException or InvalidOperationException or UriFormatException)
        {
            LogUnreachable(id, e.Message);
        }
    }

    [LoggerMessage(Level = LogLevel.Debug, Message = "Worker {WorkerId} answered the wake with {Status}; it learns its assignments at its next heartbeat")]
    private partial void LogRefused(string workerId, int status);

    [LoggerMessage(Level = LogLevel.Debug, Message = "Worker {WorkerId} could not be woken ({Reason}); it learns its assignments at its next heartbeat")]
    private partial void LogUnreachable(string workerId, string reason);
}
