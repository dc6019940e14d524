using System.Buffers;
using System.Net;
using System.Net.Http.Headers;
using System.Security.Cryptography;
using Polly.Timeout;

using LoraDeploy.Lora;
using LoraDeploy.Storage;

namespace LoraDeploy.Sources;

/// <summary>What a source tells <see cref="ResumableDownload"/> about the one file it fetches.</summary>
internal abstract class DownloadTarget
{
    /// <summary>The file as messages name it, e.g. "CivitAI file 1 of version 2".</summary>
    public abstract string Name { get; }

    /// <summary>The source as messages name it, e.g. "CivitAI".</summary>
    public abstract string SourceName { get; }

    /// <summary>The source's own origin: its answers are its errors to explain; any other host's are storage's.</summary>
    public abstract Uri SourceOrigin { get; }

    /// <summary>A GET of the source's link for the file (which may redirect to signed storage), with its credential if any.</summary>
    public abstract HttpRequestMessage CreateSourceRequest();

    /// <summary>Turns an unsuccessful answer of the source's own host into the failure to report.</summary>
    public abstract Task<DownloadFailedException> DescribeSourceErrorAsync(HttpResponseMessage response, CancellationToken ct);

    /// <summary>The exact size the source lists, when it knows it (checked before, while and after fetching); null when it does not.</summary>
    public virtual long? ExpectedBytes => null;

    /// <summary>The SHA-256 (lowercase hex) the source lists and vouches for exactly; the finished file must match it. Null checks nothing.</summary>
    public virtual string? ExpectedSha256 => null;
}

/// <summary>
/// The source-neutral download loop: streams one file into a staging file of the blob store while hashing it,
/// resuming with Range after drops and crashes, asking the source for a fresh signed link when the old one stops
/// working, checking the first bytes look like safetensors, keeping to Import:MaxFileBytes and spending every
/// request from one <see cref="DownloadAttemptBudget"/>. Durability (fsync, rename, storing) is the caller's job.
/// </summary>
internal sealed class ResumableDownload(HttpClient http, TimeProvider time, ILogger logger)
{
    private const int BufferSize = 1024 * 1024;

    /// <summary>Downloads into (or resumes) the staging file <paramref name="stagingName"/> of <paramref name="blobs"/>.</summary>
    public async Task<DownloadResult> RunAsync(DownloadTarget target, IBlobStore blobs, string stagingName, ImportOptions import, IProgress<long>? progress, CancellationToken cancellationToken)
    {
        var state = new State(target, import, progress);
        try
        {
            if (target.ExpectedBytes > import.MaxFileBytes)
            {
                // Known up front, so no byte is fetched.
                throw new DownloadFailedException(
                    $"{target.Name} is {target.ExpectedBytes} bytes, over Import:MaxFileBytes ({import.MaxFileBytes}); raise the limit to import it",
                    ReasonClass.TooLarge) { DiscardStaging = true };
            }
            await using (var output = blobs.OpenStaging(stagingName))
            {
                state.Output = output;
                await LoopAsync(state, cancellationToken).ConfigureAwait(false);
                await output.FlushAsync(cancellationToken).ConfigureAwait(false);
            }
            var sha = Convert.ToHexStringLower(state.Hash.GetHashAndReset());
            Verify(state, sha);
            return new DownloadResult(sha, state.Have);
        }
        catch (DownloadFailedException ex) when (ex.DiscardStaging)
        {
            // The bytes themselves are the problem (too big, not safetensors, not the listed file): resuming them later would be wrong.
            TryDelete(blobs, stagingName);
            throw;
        }
        finally
        {
            state.Hash.Dispose();
        }
    }

    private sealed class State(DownloadTarget target, ImportOptions import, IProgress<long>? progress)
    {
        public DownloadTarget Target { get; } = target;
        public ImportOptions Import { get; } = import;
        public IProgress<long>? Progress { get; } = progress;
        public Stream Output { get; set; } = null!;
        public IncrementalHash Hash { get; } = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        public long Have { get; set; }
        public byte[] Head { get; } = new byte[9];
        public bool HeadChecked { get; set; }
        public DownloadAttemptBudget Budget { get; set; } = null!;
        public string Name => Target.Name;
    }

    /// <summary>A source that lists the exact size and hash gets exactly that file, or a failure.</summary>
    private static void Verify(State s, string sha)
    {
        if (s.Target.ExpectedBytes is { } expected && s.Have != expected)
        {
            throw new DownloadFailedException(
                $"{s.Name} ended at {s.Have} bytes, but {s.Target.SourceName} lists {expected}; the storage host served an incomplete or different file, try again later",
                ReasonClass.HashMismatch) { DiscardStaging = true };
        }
        if (s.Target.ExpectedSha256 is { } listed && !string.Equals(listed, sha, StringComparison.OrdinalIgnoreCase))
        {
            throw new DownloadFailedException(
                $"{s.Name} arrived with SHA-256 {sha}, but {s.Target.SourceName} lists {listed.ToLowerInvariant()}; the bytes were corrupted on the way or the storage host served another file, try again later",
                ReasonClass.HashMismatch) { DiscardStaging = true };
        }
    }

    private async Task LoopAsync(State s, CancellationToken ct)
    {
        await HashExistingAsync(s, ct).ConfigureAwait(false);
        if (s.Have > s.Import.MaxFileBytes || s.Have > s.Target.ExpectedBytes)
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
            using var request = usingSigned ? new HttpRequestMessage(HttpMethod.Get, signed) : s.Target.CreateSourceRequest();
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
                var fromSource = SameOrigin(finalUri, s.Target.SourceOrigin);
                var status = (int)response.StatusCode;

                if (usingSigned && status is 400 or 401 or 403 or 404 or 410)
                {
                    // Signed links expire (about a day at CivitAI); ask the source for a fresh one.
                    logger.LogInformation("Signed link for {File} answered {Status}; asking {Source} for a fresh one", s.Name, status, s.Target.SourceName);
                    signed = null;
                    problem = $"the storage link {s.Target.SourceName} gave answered {status}";
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
                    if (fromSource)
                    {
                        throw await s.Target.DescribeSourceErrorAsync(response, ct).ConfigureAwait(false);
                    }
                    // 429 and 5xx were retried by the resilience handler already; anything else will not change by asking again.
                    throw new DownloadFailedException(
                        $"the storage host {finalUri.IdnHost} answered {status} for {s.Name}; try again later",
                        status == 429 ? ReasonClass.RateLimited : ReasonClass.Upstream);
                }
                else
                {
                    if (!fromSource)
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
        if (s.Target.ExpectedBytes is { } expected)
        {
            if (total is { } announced && announced != expected)
            {
                throw new DownloadFailedException(
                    $"the storage host {finalUri.IdnHost} is sending {announced} bytes for {s.Name}, but {s.Target.SourceName} lists {expected}; it is serving another file, try again later",
                    ReasonClass.HashMismatch) { DiscardStaging = true };
            }
            // Without a length in the answer, the listed size still tells an early end from a complete file.
            total ??= expected;
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
                if (s.Have + n > s.Target.ExpectedBytes)
                {
                    throw new DownloadFailedException(
                        $"{s.Name} grew past the {s.Target.ExpectedBytes} bytes {s.Target.SourceName} lists while downloading; the storage host is serving another file, try again later",
                        ReasonClass.HashMismatch) { DiscardStaging = true };
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
                $"{s.Name} is {AdapterFileKind.Describe(s.Head.AsSpan(0, known)) ?? "not a safetensors file (its first bytes match no format this service knows)"}; {s.Target.SourceName} may have served an error page or another file than the one it lists",
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
                $"{s.Name} came back as {what} ({mediaType}), not a safetensors file; {s.Target.SourceName} may have served an error or login page instead of the file",
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
