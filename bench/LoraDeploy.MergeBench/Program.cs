using System.Buffers.Binary;
using System.Diagnostics;
using System.Globalization;
using LoraDeploy.Lora.Merge;
using LoraDeploy.Lora.Tests.Support;

// Merge benchmark (issue 17): a synthetic Llama-shaped BF16 base of about 2 GB and a PEFT rank-32 LoRA on every
// linear layer, merged by LoraMerger, against `cp BASE OUT; sync` in the same run; peak RSS growth of the merge.
//   prepare DIR [--gib 2]      write DIR/base.safetensors, DIR/adapter_model.safetensors, DIR/adapter_config.json
//   run DIR [--rounds 3]       per round: cp+sync twice (the faster is the baseline), an O_DIRECT copy + fsync (dd),
//                              one merge in a child process (for its own peak RSS)
//   merge DIR OUT              one merge; prints seconds, RSS before and peak (kB)
return args switch
{
    ["prepare", var dir, ..] => Prepare(dir, Option(args, "--gib", 2.0)),
    ["run", var dir, ..] => Run(dir, (int)Option(args, "--rounds", 3.0)),
    ["merge", var dir, var output] => MergeOnce(dir, output),
    _ => Usage(),
};

static int Usage()
{
    Console.Error.WriteLine("usage: prepare DIR [--gib 2] | run DIR [--rounds 3] | merge DIR OUT");
    return 2;
}

static double Option(string[] args, string name, double fallback)
{
    var i = Array.IndexOf(args, name);
    return i >= 0 && i + 1 < args.Length ? double.Parse(args[i + 1], CultureInfo.InvariantCulture) : fallback;
}

static int Prepare(string dir, double gib)
{
    Directory.CreateDirectory(dir);
    const int hidden = 2048, feedForward = 5632, vocab = 32000, rank = 32;
    var layerBytes = 2L * (4L * hidden * hidden + 3L * hidden * feedForward + 2 * hidden);
    var layers = (int)Math.Max(1, (gib * (1L << 30) - 4L * vocab * hidden) / layerBytes);
    var projections = new (string Name, int In, int Out)[]
    {
        ("self_attn.q_proj", hidden, hidden), ("self_attn.k_proj", hidden, hidden), ("self_attn.v_proj", hidden, hidden),
        ("self_attn.o_proj", hidden, hidden), ("mlp.gate_proj", hidden, feedForward), ("mlp.up_proj", hidden, feedForward),
        ("mlp.down_proj", feedForward, hidden),
    };

    var baseWriter = new SafetensorsWriter().Metadata("format", "pt");
    baseWriter.Tensor("model.embed_tokens.weight", "BF16", [vocab, hidden]);
    var adapterWriter = new SafetensorsWriter();
    var random = new Random(1);
    for (var layer = 0; layer < layers; layer++)
    {
        baseWriter.Tensor($"model.layers.{layer}.input_layernorm.weight", "BF16", [hidden]);
        baseWriter.Tensor($"model.layers.{layer}.post_attention_layernorm.weight", "BF16", [hidden]);
        foreach (var (name, inFeatures, outFeatures) in projections)
        {
            var module = $"model.layers.{layer}.{name}";
            baseWriter.Tensor(module + ".weight", "BF16", [outFeatures, inFeatures]);
            adapterWriter.Tensor($"base_model.model.{module}.lora_A.weight", "F32", [rank, inFeatures], RandomF32(random, rank * inFeatures, 0.02));
            adapterWriter.Tensor($"base_model.model.{module}.lora_B.weight", "F32", [outFeatures, rank], RandomF32(random, outFeatures * rank, 0.02));
        }
    }
    baseWriter.Tensor("model.norm.weight", "BF16", [hidden]);
    baseWriter.Tensor("lm_head.weight", "BF16", [vocab, hidden]);

    // The writer leaves unset data as holes; a benchmark base needs real bytes (cp copies holes for free).
    var basePath = Path.Combine(dir, "base.safetensors");
    var (head, dataLength) = baseWriter.BuildHead();
    using (var file = new FileStream(basePath, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20))
    {
        file.Write(head);
        var buffer = new byte[1 << 22];
        var state = 0x9E3779B97F4A7C15UL;
        for (long written = 0; written < dataLength; written += buffer.Length)
        {
            var chunk = (int)Math.Min(buffer.Length, dataLength - written);
            for (var i = 0; i < chunk; i += 2)
            {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // BF16: random sign and mantissa, exponent 2^-7 … 2^-3 (weights of a trained model's size).
                var bits = (ushort)(((uint)state & 0x807F) | ((120u + (uint)(state >> 32) % 5) << 7));
                BinaryPrimitives.WriteUInt16LittleEndian(buffer.AsSpan(i), bits);
            }
            file.Write(buffer.AsSpan(0, chunk));
        }
    }
    adapterWriter.WriteTo(Path.Combine(dir, "adapter_model.safetensors"));
    File.WriteAllText(Path.Combine(dir, "adapter_config.json"),
        $$"""{"peft_type": "LORA", "r": {{rank}}, "lora_alpha": 64, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}""");
    Console.WriteLine($"{layers} layers; base {new FileInfo(basePath).Length:N0} bytes; adapter {new FileInfo(Path.Combine(dir, "adapter_model.safetensors")).Length:N0} bytes");
    return 0;
}

static byte[] RandomF32(Random random, int count, double amplitude)
{
    var bytes = new byte[count * 4];
    for (var i = 0; i < count; i++)
    {
        BinaryPrimitives.WriteSingleLittleEndian(bytes.AsSpan(i * 4), (float)((random.NextDouble() * 2 - 1) * amplitude));
    }
    return bytes;
}

static int MergeOnce(string dir, string output)
{
    var before = Status("VmRSS");
    var stopwatch = Stopwatch.StartNew();
    // Phases (on stderr): inputs read and planned until the first tensor is done; tensors until the last; then the closing flush.
    double first = 0, last = 0;
    var progress = new SynchronousProgress(p =>
    {
        last = stopwatch.Elapsed.TotalSeconds;
        first = first == 0 ? last : first;
    });
    var result = LoraMerger.Merge(Path.Combine(dir, "base.safetensors"), [new MergeAdapter(Path.Combine(dir, "adapter_model.safetensors"))], output,
        new MergeOptions { Progress = progress });
    var seconds = stopwatch.Elapsed.TotalSeconds;
    Console.Error.WriteLine(string.Create(CultureInfo.InvariantCulture,
        $"phases: first tensor done at {first:0.000} s, last at {last:0.000} s, flushed and renamed at {seconds:0.000} s"));
    Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
        $"{seconds:0.000} {before} {Status("VmHWM")} {result.TensorsMerged} {result.BytesWritten}"));
    return 0;
}

static long Status(string field)
{
    var line = File.ReadLines("/proc/self/status").First(l => l.StartsWith(field + ":", StringComparison.Ordinal));
    return long.Parse(line[(field.Length + 1)..].Trim().Split(' ')[0], CultureInfo.InvariantCulture);
}

static int Run(string dir, int rounds)
{
    var basePath = Path.Combine(dir, "base.safetensors");
    var output = Path.Combine(dir, "out.safetensors");
    var copy = Path.Combine(dir, "copy.safetensors");
    var baseBytes = new FileInfo(basePath).Length;
    Console.WriteLine($"base {baseBytes:N0} bytes, {rounds} rounds");
    var ratios = new List<double>();
    var floors = new List<double>();
    for (var round = 1; round <= rounds; round++)
    {
        // Baseline: the faster of two copies back to back. In these VMs a copy into memory the guest has just freed
        // takes 1.3 s and one into memory handed back to the host 3–5 s, and which one the first copy gets depends on
        // what ran before (the merge writes with O_DIRECT and frees nothing); the second always gets the first's.
        var cpFirst = Timed("sh", "-c", $"cp '{basePath}' '{copy}' && sync");
        File.Delete(copy);
        var cpSecond = Timed("sh", "-c", $"cp '{basePath}' '{copy}' && sync");
        File.Delete(copy);
        var cp = Math.Min(cpFirst, cpSecond);
        // The merge's own write path with nothing to compute: the base's bytes written with O_DIRECT, then fsync.
        var direct = Timed("dd", $"if={basePath}", $"of={copy}", "bs=8M", "oflag=direct", "conv=fsync", "status=none");
        File.Delete(copy);
        var stopwatch = Stopwatch.StartNew();
        var (exit, text) = Capture(Environment.ProcessPath!, "merge", dir, output);
        var wall = stopwatch.Elapsed.TotalSeconds;
        if (exit != 0)
        {
            Console.Error.WriteLine(text);
            return 1;
        }
        var lines = text.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        var parts = lines[0].Split(' ');
        var seconds = double.Parse(parts[0], CultureInfo.InvariantCulture);
        long rssBefore = long.Parse(parts[1], CultureInfo.InvariantCulture), peak = long.Parse(parts[2], CultureInfo.InvariantCulture);
        File.Delete(output);
        var ratio = cp / seconds;
        ratios.Add(ratio);
        floors.Add(direct / seconds);
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"round {round}: cp+sync {cpFirst:0.00} then {cpSecond:0.00} s (baseline {baseBytes / cp / 1e6:0} MB/s); O_DIRECT copy + fsync {direct:0.00} s; merge {seconds:0.00} s in-process, {wall:0.00} s with process start ({baseBytes / seconds / 1e6:0} MB/s); throughput ratio {ratio:0.00}× (× the O_DIRECT copy {direct / seconds:0.00}); RSS {rssBefore / 1024} MiB before, peak {peak / 1024} MiB (growth {(peak - rssBefore) / 1024} MiB)"));
        Console.WriteLine("  " + lines.FirstOrDefault(l => l.StartsWith("phases:", StringComparison.Ordinal)));
    }
    Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
        $"ratio median {Median(ratios):0.00}× (min {ratios.Min():0.00}, max {ratios.Max():0.00}); against the O_DIRECT copy {Median(floors):0.00}× (min {floors.Min():0.00}, max {floors.Max():0.00})"));
    return 0;
}

static double Median(List<double> values) => values.Order().ElementAt(values.Count / 2);

static double Timed(string command, params string[] arguments)
{
    var stopwatch = Stopwatch.StartNew();
    var (exit, text) = Capture(command, arguments);
    if (exit != 0)
    {
        throw new InvalidOperationException($"{command} failed: {text}");
    }
    return stopwatch.Elapsed.TotalSeconds;
}

static (int Exit, string Output) Capture(string command, params string[] arguments)
{
    var start = new ProcessStartInfo(command) { RedirectStandardOutput = true, RedirectStandardError = true };
    foreach (var argument in arguments)
    {
        start.ArgumentList.Add(argument);
    }
    using var process = Process.Start(start)!;
    var output = process.StandardOutput.ReadToEnd() + process.StandardError.ReadToEnd();
    process.WaitForExit();
    return (process.ExitCode, output);
}

/// <summary>Reports on the merging thread (Progress&lt;T&gt; would post to the thread pool and report late).</summary>
sealed class SynchronousProgress(Action<MergeProgress> report) : IProgress<MergeProgress>
{
    public void Report(MergeProgress value) => report(value);
}
