using System.Diagnostics;
using System.Runtime.InteropServices;
using LoraDeploy.Lora.Peft;
using LoraDeploy.Lora.Tests.Support;
using LoraDeploy.Serving.LlamaCpp;

namespace LoraDeploy.ServingBench;

/// <summary>
/// The llama.cpp engine (issue 14), no HTTP: on the largest random Llama that fits the time (Hidden 1024, 16 heads, 8 layers,
/// FF 2816, ≈ 104 M parameters, F32), generation speed with one adapter ÷ without, same engine, same prompt; the cost of
/// switching a context's adapter set; loading a ~200 MB adapter GGUF beside reading the file; PEFT → GGUF conversion
/// beside reading its input.
/// </summary>
public static partial class LlamaCppBench
{
    private static readonly int[] Prompt = [1, 270, 271, 272, 273, 274, 275, 276];

    public static async Task RunAsync(int rounds, int tokens, int bigAdapterMiB, int threads)
    {
        var dir = Path.Combine(BenchPaths.Scratch, "llamacpp-" + Guid.NewGuid().ToString("N")[..8]);
        Directory.CreateDirectory(dir);
        try
        {
            await RunInAsync(dir, rounds, tokens, bigAdapterMiB, threads);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    private static async Task RunInAsync(string dir, int rounds, int tokens, int bigAdapterMiB, int threads)
    {
        var clock = Stopwatch.StartNew();
        var model = new TinyLlama { Hidden = 1024, Layers = 8, Heads = 16, KvHeads = 16, FeedForward = 2816, ContextLength = 512, VocabSize = 320, WeightStd = 0.05f }.Generate();
        // Every generation must run its full length: the end-of-generation tokens (</s> and <|im_end|>) get all-zero
        // output rows, so their logit is exactly 0 while the best of the other 318 random logits is well above it.
        var lmHead = model.Weights["lm_head.weight"];
        foreach (var eog in new[] { 2, 3 + 256 + 1 })
        {
            Array.Clear(lmHead, eog * model.Hidden, model.Hidden);
        }
        var gguf = model.WriteGguf(Path.Combine(dir, "base.gguf"));
        var parameters = model.Weights.Values.Sum(w => (long)w.Length);
        Stats.Note($"base model: {parameters / 1e6:F1} M parameters, {new FileInfo(gguf).Length / 1048576.0:F0} MiB F32 GGUF, written in {clock.Elapsed.TotalSeconds:F1} s");
        var baseModel = LlamaCppBaseModel.ReadFile(gguf);

        // A typical adapter (rank 16, every projection) and a second one for switching.
        var small = ConvertAdapter(dir, "r16-a", new PeftAdapterFixture { Rank = 16, Alpha = 16, Seed = 3, Std = 0.02f }, model, baseModel);
        var other = ConvertAdapter(dir, "r16-b", new PeftAdapterFixture { Rank = 16, Alpha = 16, Seed = 4, Std = 0.02f }, model, baseModel);

        // The big adapter: rank chosen so the F32 GGUF is about bigAdapterMiB.
        var perRankBytes = Enumerable.Range(0, model.Layers).SelectMany(model.Projections).Sum(p => (long)(p.In + p.Out) * 4);
        var bigRank = (int)Math.Round(bigAdapterMiB * 1048576.0 / perRankBytes);
        clock.Restart();
        var bigFixture = new PeftAdapterFixture { Rank = bigRank, Alpha = bigRank, Seed = 5, Std = 0.002f }.Generate(model);
        var (bigConfig, bigWeights) = bigFixture.WriteTo(Path.Combine(dir, "big"));
        bigFixture.Modules.Clear();
        GC.Collect();
        Stats.Note($"big adapter: rank {bigRank}, safetensors {new FileInfo(bigWeights).Length / 1048576.0:F0} MiB, generated in {clock.Elapsed.TotalSeconds:F1} s");

        // ---- PEFT → GGUF conversion beside reading the input once ----
        var conversions = new List<(double Convert, double Cat, double CopySync)>();
        var bigGguf = Path.Combine(dir, "big.gguf");
        var config = PeftAdapterConfig.ReadFile(bigConfig);
        for (var round = 0; round < 3; round++)
        {
            var cat = Timed(() => Cat(bigWeights));
            var copy = Path.Combine(dir, "copy.bin");
            var copySync = Timed(() => CopyAndSync(bigWeights, copy));
            File.Delete(copy);
            File.Delete(bigGguf);
            var convert = Timed(() => PeftLoraConverter.Convert(config, bigWeights, baseModel, bigGguf));
            conversions.Add((convert, cat, copySync));
        }
        var inputMiB = new FileInfo(bigWeights).Length / 1048576.0;
        var outputMiB = new FileInfo(bigGguf).Length / 1048576.0;
        Stats.Table($"PEFT → GGUF conversion of a {inputMiB:F0} MiB adapter (rank {bigRank}, F32; output {outputMiB:F0} MiB, fsynced), input in the page cache",
            ["round", "`cat input > /dev/null`", "copy input + fsync", "convert (read, permute q/k, fold scale, write, fsync)", "convert MiB/s", "cat ÷ convert", "copy+fsync ÷ convert"],
            conversions.Select((c, i) => (IReadOnlyList<string>)
            [
                (i + 1).ToString(System.Globalization.CultureInfo.InvariantCulture),
                $"{Stats.F(c.Cat * 1000, 0)} ms", $"{Stats.F(c.CopySync * 1000, 0)} ms", $"{Stats.F(c.Convert * 1000, 0)} ms",
                Stats.F(inputMiB / c.Convert, 0), Stats.F(c.Cat / c.Convert), Stats.F(c.CopySync / c.Convert),
            ]));
        File.Delete(bigWeights);

        // ---- the engine ----
        await using var engine = LlamaCppEngine.Load(new LlamaCppEngineOptions
        {
            ModelPath = gguf,
            ContextSize = 512,
            Threads = threads,
            Slots = 1,
        });
        Check(engine.LoadAdapter("r16-a", small));
        Check(engine.LoadAdapter("r16-b", other));

        // ---- cold and warm load of the big adapter beside reading the same file ----
        var loads = new List<(string Kind, double Cat, double Load)>();
        for (var round = 0; round < 3; round++)
        {
            Evict(bigGguf);
            var coldCat = Timed(() => Cat(bigGguf));
            Evict(bigGguf);
            var coldLoad = Timed(() => Check(engine.LoadAdapter("big", bigGguf)));
            await engine.UnloadAdapterAsync("big");
            loads.Add(("cold (fadvise DONTNEED first)", coldCat, coldLoad));
            var warmCat = Timed(() => Cat(bigGguf));
            var warmLoad = Timed(() => Check(engine.LoadAdapter("big", bigGguf)));
            await engine.UnloadAdapterAsync("big");
            loads.Add(("warm (page cache)", warmCat, warmLoad));
        }
        Stats.Table($"Loading a {outputMiB:F0} MiB adapter GGUF (llama_adapter_lora_init on CPU) beside `cat` of the same file",
            ["page cache", "`cat file > /dev/null`, median (range)", "load, median (range)", "load ÷ cat, median"],
            loads.GroupBy(l => l.Kind).Select(g => (IReadOnlyList<string>)
            [
                g.Key,
                Ms(g.Select(l => l.Cat).ToList()), Ms(g.Select(l => l.Load).ToList()),
                Stats.F(Stats.Median(g.Select(l => l.Load / l.Cat))),
            ]));
        Check(engine.LoadAdapter("big", bigGguf));

        // ---- generation: tokens/s with an adapter ÷ base, same engine, same prompt, interleaved ----
        var speeds = new Dictionary<string, List<double>> { ["base"] = [], ["r16-a"] = [], ["big"] = [] };
        var generated = new Dictionary<string, List<int>> { ["base"] = [], ["r16-a"] = [], ["big"] = [] };
        foreach (var id in speeds.Keys)
        {
            await GenerateAsync(engine, id, tokens); // warm: context created, prompt cached for this set
        }
        for (var round = 0; round < rounds; round++)
        {
            foreach (var id in round % 2 == 0 ? speeds.Keys.ToList() : speeds.Keys.Reverse().ToList())
            {
                var (n, perSecond) = await GenerateAsync(engine, id, tokens);
                speeds[id].Add(perSecond);
                generated[id].Add(n);
            }
        }
        var baseSpeeds = speeds["base"];
        Stats.Table($"Generation on one context ({threads} thread{(threads == 1 ? "" : "s")}), {tokens} tokens asked, greedy, same {Prompt.Length}-token prompt, {rounds} interleaved rounds",
            ["adapter set", "tokens/s, median (range)", "÷ base, median (range of per-round ratios)", "tokens generated"],
            speeds.Select(s => (IReadOnlyList<string>)
            [
                s.Key switch { "base" => "none (base)", "r16-a" => "rank 16, all 7 projections × 8 layers", _ => $"rank {bigRank} (the {outputMiB:F0} MiB adapter)" },
                Stats.Spread(s.Value, 1),
                Stats.Spread(s.Value.Select((v, i) => v / baseSpeeds[i]).ToList()),
                string.Join(",", generated[s.Key].Distinct()),
            ]));
        await engine.UnloadAdapterAsync("big");

        // ---- switching the context's adapter set (llama_set_adapters_lora + KV clear) ----
        var switchRows = new List<IReadOnlyList<string>>();
        foreach (var (label, prompt) in new[] { ("1-token prompt", new[] { 1 }), ("64-token prompt", Enumerable.Range(0, 64).Select(i => 270 + i % 40).ToArray()) })
        {
            var same = new List<double>();
            var switching = new List<double>();
            for (var block = 0; block < 6; block++)
            {
                for (var i = 0; i < 10; i++)
                {
                    same.Add(await OneTokenAsync(engine, "r16-a", prompt));
                }
                for (var i = 0; i < 10; i++)
                {
                    switching.Add(await OneTokenAsync(engine, i % 2 == 0 ? "r16-b" : "r16-a", prompt));
                }
            }
            switchRows.Add([
                label, Stats.F(Stats.Median(same) * 1000), Stats.F(Stats.Median(switching) * 1000),
                Stats.F((Stats.Median(switching) - Stats.Median(same)) * 1000),
                Stats.F(Stats.Percentile(switching, 0.9) * 1000)]);
        }
        Stats.Table("A one-token request (max_tokens 1) on one context: same adapter as the last request vs the other one (60 each, in blocks of 10)",
            ["prompt", "same adapter, median ms", "switching, median ms", "switch costs, ms (difference of medians)", "switching p90 ms"],
            switchRows);
        Stats.Note("1-token prompt: both cases decode the one token, so the difference is the switch itself (set + KV clear);" +
            " 64-token prompt: the same adapter reuses 63 cached tokens, a switch decodes all 64 again.");
    }

    private static string ConvertAdapter(string dir, string name, PeftAdapterFixture fixture, TinyLlama model, LlamaCppBaseModel baseModel)
    {
        fixture.Generate(model);
        var (config, weights) = fixture.WriteTo(Path.Combine(dir, name));
        var output = Path.Combine(dir, name + ".gguf");
        PeftLoraConverter.Convert(PeftAdapterConfig.ReadFile(config), weights, baseModel, output);
        return output;
    }

    private static void Check(LoraLoadResult result)
    {
        if (result is LoraLoadResult.Refused refused)
        {
            throw new InvalidOperationException($"llama.cpp refused {refused.AdapterId}: {refused.Reason}");
        }
    }

    /// <summary>Generation speed: tokens after the first ÷ time from the first token to the last (prompt decode excluded).</summary>
    private static async Task<(int Tokens, double PerSecond)> GenerateAsync(LlamaCppEngine engine, string adapter, int tokens)
    {
        var request = new LlamaCppRequest
        {
            Prompt = new LlamaCppPrompt.Tokens(Prompt),
            Adapters = adapter == "base" ? [] : [new LlamaCppAdapterUse(adapter)],
            MaxTokens = tokens,
            Temperature = 0,
        };
        long first = 0, last = 0;
        var n = 0;
        await foreach (var chunk in engine.GenerateAsync(request))
        {
            if (chunk.Kind == LlamaCppChunkKind.Completion)
            {
                last = Stopwatch.GetTimestamp();
                if (n++ == 0)
                {
                    first = last;
                }
            }
        }
        return (n, n < 2 ? double.NaN : (n - 1) / Stopwatch.GetElapsedTime(first, last).TotalSeconds);
    }

    private static async Task<double> OneTokenAsync(LlamaCppEngine engine, string adapter, int[] prompt)
    {
        var request = new LlamaCppRequest { Prompt = new LlamaCppPrompt.Tokens(prompt), Adapters = [new LlamaCppAdapterUse(adapter)], MaxTokens = 1, Temperature = 0 };
        var started = Stopwatch.GetTimestamp();
        await foreach (var _ in engine.GenerateAsync(request))
        {
        }
        return Stopwatch.GetElapsedTime(started).TotalSeconds;
    }

    private static double Timed(Action action)
    {
        var started = Stopwatch.GetTimestamp();
        action();
        return Stopwatch.GetElapsedTime(started).TotalSeconds;
    }

    private static string Ms(IReadOnlyCollection<double> seconds) => Stats.Spread(seconds.Select(s => s * 1000).ToList(), 0) + " ms";

    /// <summary><c>cat file &gt; /dev/null</c>, the real tool.</summary>
    private static void Cat(string path)
    {
        using var cat = Process.Start(new ProcessStartInfo("sh", ["-c", "cat \"$0\" > /dev/null", path]) { UseShellExecute = false })!;
        cat.WaitForExit();
        if (cat.ExitCode != 0)
        {
            throw new InvalidOperationException($"cat {path} failed ({cat.ExitCode})");
        }
    }

    private static void CopyAndSync(string from, string to)
    {
        using var source = new FileStream(from, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16);
        using var target = new FileStream(to, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 20);
        source.CopyTo(target, 1 << 20);
        target.Flush(flushToDisk: true);
    }

    /// <summary>
    /// Asks the kernel to drop the file's cached pages (posix_fadvise DONTNEED after fsync), the per-file, unprivileged
    /// stand-in for drop_caches. The host under this VM may still cache the disk.
    /// </summary>
    private static void Evict(string path)
    {
        using var file = new FileStream(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite);
        file.Flush(flushToDisk: true);
        var result = posix_fadvise((int)file.SafeFileHandle.DangerousGetHandle(), 0, 0, 4 /* POSIX_FADV_DONTNEED */);
        if (result != 0)
        {
            throw new InvalidOperationException($"posix_fadvise failed: {result}");
        }
    }

    [LibraryImport("libc", SetLastError = false)]
    private static partial int posix_fadvise(int fd, long offset, long length, int advice);
}
