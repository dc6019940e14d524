using System.Diagnostics;
using System.Globalization;

namespace LoraDeploy.ServingBench;

/// <summary>One measured run: every request's latency, the errors, and how long the run took.</summary>
public sealed class RunResult(string name, List<double> latenciesMs, int errors, TimeSpan elapsed, string? firstError)
{
    public string Name => name;
    public TimeSpan Elapsed => elapsed;
    private List<double> Latencies => latenciesMs;
    public int Count => latenciesMs.Count;
    public int Errors => errors;
    public string? FirstError => firstError;
    public double Throughput => latenciesMs.Count / elapsed.TotalSeconds;
    public double P50 => Stats.Percentile(latenciesMs, 0.50);
    public double P90 => Stats.Percentile(latenciesMs, 0.90);
    public double P99 => Stats.Percentile(latenciesMs, 0.99);
    public double Max => latenciesMs.Count == 0 ? double.NaN : latenciesMs.Max();
    /// <summary>This process's CPU time (every thread: load, server and in-process worker) per answered request, µs.</summary>
    public double CpuMicrosPerRequest { get; init; } = double.NaN;
    /// <summary>Bytes allocated in this process per answered request.</summary>
    public double AllocatedPerRequest { get; init; } = double.NaN;

    /// <summary>Several runs of one side as one: every latency, the summed time, and CPU and allocations per request over all.</summary>
    public static RunResult Combine(IReadOnlyList<RunResult> runs)
    {
        var total = Math.Max(1, runs.Sum(r => r.Count));
        return new(runs[0].Name, runs.SelectMany(r => r.Latencies).ToList(), runs.Sum(r => r.Errors),
            TimeSpan.FromTicks(runs.Sum(r => r.Elapsed.Ticks)), runs.Select(r => r.FirstError).FirstOrDefault(e => e is not null))
        {
            CpuMicrosPerRequest = runs.Sum(r => r.CpuMicrosPerRequest * r.Count) / total,
            AllocatedPerRequest = runs.Sum(r => r.AllocatedPerRequest * r.Count) / total,
        };
    }
}

public static class Load
{
    /// <summary>
    /// <paramref name="connections"/> loops, each sending one request after another until <paramref name="duration"/>
    /// is up (a plain closed-loop load, like wrk's). Non-2xx answers and exceptions count as errors, not latencies.
    /// </summary>
    public static async Task<RunResult> ClosedLoopAsync(string name, int connections, TimeSpan duration, Func<int, Task<HttpResponseMessage>> send)
    {
        var recorder = new Recorder(connections);
        var (cpu, allocated) = (Process.GetCurrentProcess().TotalProcessorTime, GC.GetTotalAllocatedBytes());
        var started = Stopwatch.GetTimestamp();
        var stopAt = started + (long)(duration.TotalSeconds * Stopwatch.Frequency);
        await Task.WhenAll(Enumerable.Range(0, connections).Select(async c =>
        {
            while (Stopwatch.GetTimestamp() < stopAt)
            {
                await recorder.TimeAsync(c, () => send(c));
            }
        }));
        // CPU per request depends much less than throughput on what else the machine runs, so it shows what a side
        // costs even when a noisy minute moves the req/s.
        return recorder.Result(name, Stopwatch.GetElapsedTime(started),
            Process.GetCurrentProcess().TotalProcessorTime - cpu, GC.GetTotalAllocatedBytes() - allocated);
    }

    /// <summary>
    /// An open loop: <paramref name="rate"/> requests a second spread evenly over <paramref name="connections"/>
    /// connections, each sent at its due time whatever the others are doing. Below saturation nothing queues, so two
    /// such runs at one rate compare what each path costs a request, which a closed loop turns into queueing delay.
    /// Latency counts from the send; <see cref="RunResult.Throughput"/> below the rate means it could not keep up.
    /// </summary>
    public static async Task<RunResult> PacedAsync(string name, int connections, double rate, TimeSpan duration, Func<int, Task<HttpResponseMessage>> send)
    {
        var recorder = new Recorder(connections);
        var total = (long)(rate * duration.TotalSeconds);
        var started = Stopwatch.GetTimestamp();
        await Task.WhenAll(Enumerable.Range(0, connections).Select(async c =>
        {
            for (long i = c; i < total; i += connections)
            {
                var due = started + (long)(i / rate * Stopwatch.Frequency);
                var wait = Stopwatch.GetElapsedTime(Stopwatch.GetTimestamp(), due);
                if (wait > TimeSpan.Zero)
                {
                    await Task.Delay(wait);
                }
                await recorder.TimeAsync(c, () => send(c));
            }
        }));
        return recorder.Result(name, Stopwatch.GetElapsedTime(started));
    }

    /// <summary>Sends the given sequence of requests with <paramref name="connections"/> in flight at a time.</summary>
    public static async Task<RunResult> SequenceAsync<T>(string name, int connections, IReadOnlyList<T> items, Func<T, Task<HttpResponseMessage>> send)
    {
        var recorder = new Recorder(connections);
        var next = -1;
        var started = Stopwatch.GetTimestamp();
        await Task.WhenAll(Enumerable.Range(0, connections).Select(async c =>
        {
            int i;
            while ((i = Interlocked.Increment(ref next)) < items.Count)
            {
                var item = items[i];
                await recorder.TimeAsync(c, () => send(item));
            }
        }));
        return recorder.Result(name, Stopwatch.GetElapsedTime(started));
    }

    /// <summary>Latencies per connection (no locking: one list each), errors and the first error's text.</summary>
    private sealed class Recorder(int connections)
    {
        private readonly List<double>[] _latencies = Enumerable.Range(0, connections).Select(_ => new List<double>(4096)).ToArray();
        private int _errors;
        private string? _firstError;

        public async Task TimeAsync(int connection, Func<Task<HttpResponseMessage>> send)
        {
            var begin = Stopwatch.GetTimestamp();
            try
            {
                using var response = await send();
                var body = await response.Content.ReadAsByteArrayAsync();
                if (!response.IsSuccessStatusCode)
                {
                    Failed($"{(int)response.StatusCode} {System.Text.Encoding.UTF8.GetString(body)}");
                    return;
                }
            }
            catch (Exception e) when (e is HttpRequestException or TaskCanceledException)
            {
                Failed(e.Message);
                return;
            }
            _latencies[connection].Add(Stopwatch.GetElapsedTime(begin).TotalMilliseconds);
        }

        public RunResult Result(string name, TimeSpan elapsed, TimeSpan? cpu = null, long? allocated = null)
        {
            var latencies = _latencies.SelectMany(l => l).ToList();
            var answered = Math.Max(1, latencies.Count);
            return new(name, latencies, _errors, elapsed, _firstError)
            {
                CpuMicrosPerRequest = cpu is { } c ? c.TotalMicroseconds / answered : double.NaN,
                AllocatedPerRequest = allocated is { } a ? a / (double)answered : double.NaN,
            };
        }

        private void Failed(string what)
        {
            Interlocked.Increment(ref _errors);
            Interlocked.CompareExchange(ref _firstError, what, null);
        }
    }
}

public static class Stats
{
    /// <summary>Nearest-rank percentile.</summary>
    public static double Percentile(IReadOnlyCollection<double> values, double p)
    {
        if (values.Count == 0)
        {
            return double.NaN;
        }
        var sorted = values.Order().ToArray();
        var rank = (int)Math.Ceiling(p * sorted.Length) - 1;
        return sorted[Math.Clamp(rank, 0, sorted.Length - 1)];
    }

    public static double Median(IEnumerable<double> values) => Percentile(values.ToList(), 0.5);

    public static string F(double value, int decimals = 2) => value.ToString("F" + decimals, CultureInfo.InvariantCulture);

    /// <summary>"median (min–max)".</summary>
    public static string Spread(IReadOnlyCollection<double> values, int decimals = 2) =>
        $"{F(Median(values), decimals)} ({F(values.Min(), decimals)}–{F(values.Max(), decimals)})";

    /// <summary>Prints a Markdown table (so it can go into docs/benchmarks.md as it is).</summary>
    public static void Table(string title, IReadOnlyList<string> header, IEnumerable<IReadOnlyList<string>> rows)
    {
        Console.WriteLine();
        Console.WriteLine($"### {title}");
        Console.WriteLine();
        Console.WriteLine("| " + string.Join(" | ", header) + " |");
        Console.WriteLine("|" + string.Join("|", header.Select((_, i) => i == 0 ? "---" : "---:")) + "|");
        foreach (var row in rows)
        {
            Console.WriteLine("| " + string.Join(" | ", row) + " |");
        }
        Console.WriteLine();
    }

    public static void Note(string text) => Console.WriteLine($"# {text}");
}
