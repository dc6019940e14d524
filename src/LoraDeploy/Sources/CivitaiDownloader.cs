using System.Buffers;
using System.Net;
using System.Net.Http.Headers;
using System.Security.Cryptography;
using Microsoft.Extensions.Options;
using Polly.Timeout;

using LoraDeploy.Lora;
using LoraDeploy.Storage;

namespace LoraDeploy.Sources;

/// <summary>
/// Streams a resolved CivitAI file into a staging file of the blob store while hashing it, resuming with Range after drops
/// and crashes, and asking CivitAI for a fresh signed link when the old one stops working.
/// Durability (fsync, rename, storing) is the caller's job.
/// </summary>
public sealed class CivitaiDownloader(
    HttpClient http,
    IOptionsMonitor<CivitaiOptions> civitaiOptions,
    IOptionsMonitor<ImportOptions> importOptions,
    TimeProvider time,
    ILogger<CivitaiDownloader> logger)
{
    private const int BufferSize = 1024 * 1024;

    /// <summary>Downloads into (or resumes) the staging file <paramref name="stagingName"/> of <paramref name="blobs"/>.</summary>
    public async Task<DownloadResult> DownloadAsync(ResolvedCivitaiFile file, IBlobStore blobs, string stagingName, IProgress<long>? progress, CancellationToken cancellationToken)
    {
        var state = new State(file, civitaiOptions.CurrentValue, importOptions.CurrentValue, progress);
        try
        {
            await using (var output = blobs.OpenStaging(stagingName))
            {
                state.Output = output;
                await RunAsync(state, cancellationToken).ConfigureAwait(false);
                await output.FlushAsync(cancellationToken).ConfigureAwait(false);
            }
            var sha = Convert.ToHexStringLower(state.Hash.GetHashAndReset());
            logger.LogInformation("Downloaded CivitAI file {FileId} ({Bytes} bytes, sha256 {Sha256})", file.FileId, state.Have, sha);
            return new DownloadResult(sha, state.Have);
        }
        catch (DownloadFailedException ex) when (ex.DiscardStaging)
        {
            // The bytes themselves are the problem (too big, not safetensors): resuming them later would be wrong.
            TryDelete(blobs, stagingName);
            throw;
        }
        finally
        {
            state.Hash.Dispose();
        }
    }

    private sealed class State(ResolvedCivitaiFile file, CivitaiOptions civitai, ImportOptions import, IProgress<long>? progress)
    {
        public ResolvedCivitaiFile File { get; } = file;
        public CivitaiOptions Civitai { get; } = civitai;
        public ImportOptions Import { get; } = import;
        public IProgress<long>? Progress { get; } = progress;
        public Stream Output { get; set; } = null!;
        public IncrementalHash Hash { get; } = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        public long Have { get; set; }
        public byte[] Head { get; } = new byte[9];
        public bool HeadChecked { get; set; }
        public DownloadAttemptBudget Budget { get; set; } = null!;
        public string Name => $"CivitAI file {File.FileId} of version {File.VersionId}";
    }

    private async Task RunAsync(State s, CancellationToken ct)
    {
        await HashExistingAsync(s, ct).ConfigureAwait(false);
        if (s.Have > s.Import.MaxFileBytes)
        {
            Restart(s);
        }
        if (s.Have > 0)
        {
            logger.LogInformation("Resuming {File} from byte {Offset} of an existing staging file", s.Name, s.Have);
        }

        // Every request of this download, retried by the resilience handler or resumed here, spends from one budget.
        var budget = new DownloadAttemptBudget(s.Import, s.Have);
        s.Budget = budget;
        Uri? signed = null;
        var passesWithoutNewData = 0;
        while (true)
        {
            ct.ThrowIfCancellationRequested();
            var furthestBefore = budget.Furthest;
            var usingSigned = signed is not null;
            using var request = usingSigned ? new HttpRequestMessage(HttpMethod.Get, signed) : CivitaiHttp.CreateRequest(s.File.DownloadUrl, s.Civitai);
            request.Options.Set(DownloadAttemptBudget.Key, budget);
            if (s.Have > 0)
            {
                request.Headers.Range = new RangeHeaderValue(s.Have, null);
            }

            HttpResponseMessage response;
            try
            {
                response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, ct).ConfigureAwait(false);
            }
            catch (OutboundRequestRefusedException ex)
            {
                throw new DownloadFailedException($"the download of {s.Name} was refused: {ex.Message}", ReasonClass.Refused, ex);
            }
            catch (DownloadAttemptsExhaustedException ex)
            {
                throw new DownloadFailedException($"the download of {s.Name} cannot make progress: {ex.Message}; try again later", budget.LastProblemClass, ex);
            }
            catch (UpstreamAnswerException ex)
            {
                throw new DownloadFailedException($"the download of {s.Name} failed: {ex.Message}", ex.ReasonClass, ex);
            }
            catch (Exception ex) when (ex is HttpRequestException or TimeoutRejectedException && !ct.IsCancellationRequested)
            {
                // The resilience handler has already retried this; another round here would only multiply its attempts.
                throw new DownloadFailedException($"could not download {s.Name} ({ex.Message}); check the network and try again", ReasonClass.Network, ex);
            }

            string problem;
            using (response)
            {
                var finalUri = response.RequestMessage?.RequestUri ?? request.RequestUri!;
                var fromCivitai = SameOrigin(finalUri, s.Civitai.GetBaseUri());
                var status = (int)response.StatusCode;

                if (usingSigned && status is 400 or 401 or 403 or 404 or 410)
                {
                    // Signed links expire (about a day at CivitAI); ask CivitAI for a fresh one.
                    logger.LogInformation("Signed link for {File} answered {Status}; asking CivitAI for a fresh one", s.Name, status);
                    signed = null;
                    problem = $"the storage link CivitAI gave answered {status}";
                }
                else if (status == 416 && s.Have > 0)
                {
                    if (response.Content.Headers.ContentRange?.Length is { } length && length == s.Have)
                    {
                        break; // the staging file already holds every byte
                    }
                    problem = $"the storage host {finalUri.IdnHost} rejected the range from byte {s.Have}";
                    Restart(s);
                }
                else if (!response.IsSuccessStatusCode)
                {
                    if (fromCivitai)
                    {
                        var body = await CivitaiHttp.ReadErrorAsync(response, s.Import, time, ct).ConfigureAwait(false);
                        var (reasonClass, reason) = CivitaiHttp.DescribeDownloadError(response.StatusCode, body, s.File.VersionId, s.Civitai.HasToken, time);
                        throw new DownloadFailedException(reason, reasonClass);
                    }
                    // 429 and 5xx were retried by the resilience handler already; anything else will not change by asking again.
                    throw new DownloadFailedException(
                        $"the storage host {finalUri.IdnHost} answered {status} for {s.Name}; try again later",
                        status == 429 ? ReasonClass.RateLimited : ReasonClass.Upstream);
                }
                else
                {
                    if (!fromCivitai)
                    {
                        signed = finalUri;
                    }
                    var outcome = await ReceiveAsync(s, response, finalUri, ct).ConfigureAwait(false);
                    if (outcome is null)
                    {
                        break;
                    }
                    problem = outcome;
                }
            }

            // Back to the network: the attempt budget bounds how often, and a pass that brought nothing new waits first.
            budget.LastProblem = problem;
            budget.LastProblemClass = ReasonClass.Network;
            passesWithoutNewData = budget.Furthest > furthestBefore ? 0 : passesWithoutNewData + 1;
            if (passesWithoutNewData > 0)
            {
                await Task.Delay(Backoff(s.Import, passesWithoutNewData), time, ct).ConfigureAwait(false);
            }
        }

        if (!s.HeadChecked)
        {
            CheckHead(s, s.Have);
        }
    }

    /// <summary>Streams one successful answer into the staging file; null when the file is complete, else what went wrong.</summary>
    private async Task<string?> ReceiveAsync(State s, HttpResponseMessage response, Uri finalUri, CancellationToken ct)
    {
        var range = response.Content.Headers.ContentRange;
        if (response.StatusCode == HttpStatusCode.PartialContent)
        {
            if (range?.From != s.Have)
            {
                logger.LogWarning("{File}: asked for bytes from {Offset} but got {Range}; starting over", s.Name, s.Have, range);
                var asked = s.Have;
                Restart(s);
                return $"the storage host {finalUri.IdnHost} sent bytes {range?.ToString() ?? "without a Content-Range"} when asked for bytes from {asked}";
            }
        }
        else if (s.Have > 0)
        {
            // 200 to a Range request: the server ignored it, so the body starts at byte 0.
            logger.LogInformation("{File}: server ignored Range; starting over", s.Name);
            Restart(s);
        }

        long? total = range?.Length ?? (response.Content.Headers.ContentLength is { } cl ? cl + s.Have : null);
        if (total > s.Import.MaxFileBytes)
        {
            throw new DownloadFailedException(
                $"{s.Name} is {total} bytes, over Import:MaxFileBytes ({s.Import.MaxFileBytes}); raise the limit to import it",
                ReasonClass.TooLarge) { DiscardStaging = true };
        }
        CheckContentType(s, response.Content.Headers.ContentType?.MediaType);

        try
        {
            await using var body = await response.Content.ReadAsStreamAsync(ct).ConfigureAwait(false);
            await CopyAsync(s, body, ct).ConfigureAwait(false);
        }
        catch (BodyInterruptedException ex)
        {
            logger.LogInformation("{File}: connection dropped at byte {Offset} ({Error}); resuming", s.Name, s.Have, ex.InnerException?.Message);
            return $"the connection broke off at byte {s.Have} ({ex.InnerException?.Message})";
        }

        if (total is { } t && s.Have < t)
        {
            return $"the answer ended early at byte {s.Have} of {t}";
        }
        return null;
    }

    /// <summary>Exponential wait before going back after passes without new data, capped like the retry strategy's.</summary>
    private static TimeSpan Backoff(ImportOptions import, int passesWithoutNewData)
    {
        var factor = Math.Pow(2, Math.Min(passesWithoutNewData - 1, 30));
        var delay = import.RetryBaseDelay.TotalMilliseconds * factor;
        return delay >= import.RetryMaxDelay.TotalMilliseconds ? import.RetryMaxDelay : TimeSpan.FromMilliseconds(delay);
    }

    private static async Task HashExistingAsync(State s, CancellationToken ct)
    {
        var output = s.Output;
        if (output.Length == 0)
        {
            return;
        }
        output.Position = 0;
        var buffer = ArrayPool<byte>.Shared.Rent(BufferSize);
        try
        {
            int n;
            while ((n = await output.ReadAsync(buffer.AsMemory(0, BufferSize), ct).ConfigureAwait(false)) > 0)
            {
                NoteHead(s, buffer.AsSpan(0, n));
                s.Hash.AppendData(buffer, 0, n);
                s.Have += n;
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }

        // A partial file that does not start like safetensors is left over from something else; start clean.
        if (s.Have >= s.Head.Length)
        {
            s.HeadChecked = AdapterFileKind.LooksLikeSafetensors(s.Head);
            if (!s.HeadChecked)
            {
                Restart(s);
            }
        }
    }

    /// <summary>Reads the body with two buffers so the next network read overlaps hashing and writing the current one.</summary>
    private async Task CopyAsync(State s, Stream body, CancellationToken ct)
    {
        var idleTimeout = s.Import.ReadIdleTimeout;
        // The minimum rate is checked per window of this body, so a trickle cannot hold a download slot for ever.
        var windowStart = time.GetTimestamp();
        var windowBytes = 0L;
        using var idle = new CancellationTokenSource(Timeout.InfiniteTimeSpan, time);
        await using var link = ct.UnsafeRegister(static o => ((CancellationTokenSource)o!).Cancel(), idle);
        byte[][] buffers = [ArrayPool<byte>.Shared.Rent(BufferSize), ArrayPool<byte>.Shared.Rent(BufferSize)];
        var current = 0;
        Task<int> pending = Task.FromResult(0);
        try
        {
            idle.CancelAfter(idleTimeout);
            pending = body.ReadAsync(buffers[current].AsMemory(0, BufferSize), idle.Token).AsTask();
            while (true)
            {
                int n;
                try
                {
                    n = await pending.ConfigureAwait(false);
                }
                catch (Exception ex) when (ex is IOException or HttpRequestException or OperationCanceledException && !ct.IsCancellationRequested)
                {
                    throw new BodyInterruptedException(ex);
                }
                if (n == 0)
                {
                    return;
                }

                var chunk = buffers[current];
                current ^= 1;
                idle.CancelAfter(idleTimeout);
                pending = body.ReadAsync(buffers[current].AsMemory(0, BufferSize), idle.Token).AsTask();

                if (s.Have + n > s.Import.MaxFileBytes)
                {
                    throw new DownloadFailedException(
                        $"{s.Name} grew past Import:MaxFileBytes ({s.Import.MaxFileBytes} bytes) while downloading; raise the limit to import it",
                        ReasonClass.TooLarge) { DiscardStaging = true };
                }
                if (!s.HeadChecked)
                {
                    NoteHead(s, chunk.AsSpan(0, n));
                    if (s.Have + n >= s.Head.Length)
                    {
                        CheckHead(s, s.Have + n);
                    }
                }
                // Three-way overlap: the next network read is in flight, the write runs on the I/O pool, and this
                // thread hashes the same bytes meanwhile (the buffer is not reused until both are done).
                var write = s.Output.WriteAsync(chunk.AsMemory(0, n), ct);
                s.Hash.AppendData(chunk, 0, n);
                await write.ConfigureAwait(false);
                s.Have += n;
                s.Budget.NoteOffset(s.Have);
                s.Progress?.Report(s.Have);

                windowBytes += n;
                var elapsed = time.GetElapsedTime(windowStart);
                if (elapsed >= s.Import.MinRateWindow)
                {
                    if (windowBytes < s.Import.MinBytesPerSecond * elapsed.TotalSeconds)
                    {
                        throw new DownloadFailedException(
                            $"the download of {s.Name} was slower than Import:MinBytesPerSecond ({s.Import.MinBytesPerSecond} bytes/s): {windowBytes} bytes in {elapsed.TotalSeconds:0.#} s at byte {s.Have}; the storage host or the network is too slow, try again later",
                            ReasonClass.Network);
                    }
                    windowStart = time.GetTimestamp();
                    windowBytes = 0;
                }
            }
        }
        finally
        {
            // Never hand a buffer back to the pool while a read may still be filling it.
            if (!pending.IsCompleted)
            {
                await body.DisposeAsync().ConfigureAwait(false);
                try
                {
                    await pending.ConfigureAwait(false);
                }
                catch (Exception)
                {
                    // The read was aborted on purpose; its error is not the one to report.
                }
            }
            ArrayPool<byte>.Shared.Return(buffers[0]);
            ArrayPool<byte>.Shared.Return(buffers[1]);
        }
    }

    private static void NoteHead(State s, ReadOnlySpan<byte> data)
    {
        var offset = s.Have;
        for (var i = 0; i < data.Length && offset + i < s.Head.Length; i++)
        {
            s.Head[offset + i] = data[i];
        }
    }

    private static void CheckHead(State s, long knownBytes)
    {
        s.HeadChecked = true;
        var known = (int)Math.Min(knownBytes, s.Head.Length);
        if (known < s.Head.Length || !AdapterFileKind.LooksLikeSafetensors(s.Head))
        {
            throw new DownloadFailedException(
                $"{s.Name} is {AdapterFileKind.Describe(s.Head.AsSpan(0, known)) ?? "not a safetensors file (its first bytes match no format this service knows)"}; CivitAI may have served an error page or another file than the one it lists",
                ReasonClass.NotSafetensors) { DiscardStaging = true };
        }
    }

    private static void CheckContentType(State s, string? mediaType)
    {
        if (mediaType is null)
        {
            return;
        }
        var what = mediaType.ToLowerInvariant() switch
        {
            "text/html" or "application/xhtml+xml" => "an HTML page",
            "application/json" or "text/json" or "application/problem+json" => "a JSON document",
            "text/plain" => "plain text",
            "application/xml" or "text/xml" => "an XML document",
            _ => null,
        };
        if (what is not null)
        {
            throw new DownloadFailedException(
                $"{s.Name} came back as {what} ({mediaType}), not a safetensors file; CivitAI may have served an error or login page instead of the file",
                ReasonClass.NotSafetensors) { DiscardStaging = true };
        }
    }

    private static void Restart(State s)
    {
        s.Output.SetLength(0);
        s.Output.Position = 0;
        s.Hash.GetHashAndReset();
        s.Have = 0;
        s.HeadChecked = false;
        Array.Clear(s.Head);
    }

    private static bool SameOrigin(Uri a, Uri b) =>
        Uri.Compare(a, b, UriComponents.SchemeAndServer, UriFormat.Unescaped, StringComparison.OrdinalIgnoreCase) == 0;

    private static void TryDelete(IBlobStore blobs, string stagingName)
    {
        try
        {
            blobs.DeleteStaging(stagingName);
        }
        catch (IOException)
        {
            // Best effort; the caller owns the staging folder and sweeps it.
        }
    }

    private sealed class BodyInterruptedException(Exception inner) : Exception(inner.Message, inner);
}
