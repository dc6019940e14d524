using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;

namespace LoraDeploy.Tests.Simulator;

/// <summary>The prompt queue, the one executor (main.py's <c>prompt_worker</c> + <c>PromptExecutor</c>), the output cache and history.</summary>
public sealed partial class ComfyUiSimulator
{
    private sealed record Job(double Number, string PromptId, JsonObject Prompt, JsonObject ExtraData, string? ClientId, List<string> Outputs)
    {
        public long Sequence { get; init; }

        /// <summary>The queue tuple as /queue and history show it: [number, prompt_id, prompt, extra_data, outputs_to_execute].</summary>
        public JsonArray ToJson() => new(
            Number == Math.Floor(Number) && Math.Abs(Number) < 1e15 ? JsonValue.Create((long)Number) : JsonValue.Create(Number),
            PromptId, Prompt.DeepClone(), ExtraData.DeepClone(), new JsonArray([.. Outputs.Select(o => (JsonNode)o)]));
    }

    /// <summary>A node's cached result: its UI output (SaveImage's images) and what it was computed from.</summary>
    private sealed record CacheEntry(JsonObject? Ui);

    private sealed class InterruptedException() : Exception("Processing interrupted");

    /// <summary>comfy_execution.progress: every node's state this prompt; each change broadcasts <c>progress_state</c> with the non-pending ones.</summary>
    private sealed class ProgressRegistry(ComfyUiSimulator sim, string promptId)
    {
        private readonly Dictionary<string, (double Value, double Max, string State)> _nodes = new(StringComparer.Ordinal);

        public void Start(string id) => Set(id, 0, 1, "running");

        public void Update(string id, double value, double max) => Set(id, value, max, "running");

        public void Finish(string id) => Set(id, _nodes.TryGetValue(id, out var n) ? n.Max : 1, _nodes.TryGetValue(id, out var m) ? m.Max : 1, "finished");

        private void Set(string id, double value, double max, string state)
        {
            _nodes[id] = (value, max, state);
            var nodes = new JsonObject();
            foreach (var (node, s) in _nodes)
            {
                nodes[node] = new JsonObject
                {
                    ["value"] = s.Value, ["max"] = s.Max, ["state"] = s.State, ["node_id"] = node, ["prompt_id"] = promptId,
                    ["display_node_id"] = node, ["parent_node_id"] = null, ["real_node_id"] = node,
                };
            }
            sim.Send("progress_state", new JsonObject { ["prompt_id"] = promptId, ["nodes"] = nodes }, null);
        }
    }

    private readonly Lock _queueGate = new();
    private readonly List<Job> _pending = [];
    private readonly SemaphoreSlim _queueSignal = new(0);
    private readonly Dictionary<string, JsonObject> _history = new(StringComparer.Ordinal);
    private readonly List<string> _historyOrder = [];
    private Dictionary<string, CacheEntry> _cache = new(StringComparer.Ordinal);
    private Job? _running;
    private string? _lastNode;
    private long _number, _sequence;
    private volatile bool _interrupt, _freeMemory;

    private void Put(Job job)
    {
        lock (_queueGate)
        {
            _pending.Add(job with { Sequence = _sequence++ });
        }
        QueueUpdated();
        _queueSignal.Release();
    }

    private void WipeQueue()
    {
        lock (_queueGate)
        {
            _pending.Clear();
        }
        QueueUpdated();
    }

    private void DeleteQueueItem(string promptId)
    {
        bool removed;
        lock (_queueGate)
        {
            removed = _pending.RemoveAll(j => j.PromptId == promptId) > 0;
        }
        if (removed)
        {
            QueueUpdated();
        }
    }

    /// <summary><c>/interrupt</c>: a prompt id interrupts only that prompt while it runs; null interrupts whatever runs.</summary>
    private void Interrupt(string? promptId)
    {
        lock (_queueGate)
        {
            if (promptId is null || _running?.PromptId == promptId)
            {
                _interrupt = true;
            }
        }
    }

    private JsonObject QueueInfo()
    {
        lock (_queueGate)
        {
            return new JsonObject { ["exec_info"] = new JsonObject { ["queue_remaining"] = _pending.Count + (_running is null ? 0 : 1) } };
        }
    }

    private string? CurrentNodeFor(string sid)
    {
        lock (_queueGate)
        {
            return _running?.ClientId == sid ? _lastNode : null;
        }
    }

    private void QueueUpdated() => Send("status", new JsonObject { ["status"] = QueueInfo() }, null);

    private JsonObject QueueJson()
    {
        lock (_queueGate)
        {
            return new JsonObject
            {
                ["queue_running"] = _running is null ? new JsonArray() : new JsonArray(_running.ToJson()),
                ["queue_pending"] = new JsonArray([.. Ordered().Select(j => (JsonNode)j.ToJson())]),
            };
        }
    }

    private IEnumerable<Job> Ordered() => _pending.OrderBy(j => j.Number).ThenBy(j => j.Sequence);

    private JsonObject HistoryJson(string? promptId, Microsoft.Extensions.Primitives.StringValues maxItems)
    {
        lock (_queueGate)
        {
            if (promptId is not null)
            {
                return _history.TryGetValue(promptId, out var entry) ? new JsonObject { [promptId] = entry.DeepClone() } : [];
            }
            var ids = _historyOrder.AsEnumerable();
            if (int.TryParse(maxItems.ToString(), CultureInfo.InvariantCulture, out var max))
            {
                ids = ids.Skip(Math.Max(0, _historyOrder.Count - max));
            }
            return new JsonObject(ids.Select(id => KeyValuePair.Create(id, (JsonNode?)_history[id].DeepClone())));
        }
    }

    // ---- the executor -------------------------------------------------------------------------

    private async Task ExecutorLoopAsync(CancellationToken cancellationToken)
    {
        while (!cancellationToken.IsCancellationRequested)
        {
            await _queueSignal.WaitAsync(cancellationToken);
            Job? job;
            lock (_queueGate)
            {
                job = Ordered().FirstOrDefault();
                if (job is null)
                {
                    // Woken by /free, or the job was deleted from the queue before it ran.
                    ApplyFlags();
                    continue;
                }
                _pending.Remove(job);
                _running = job;
            }
            QueueUpdated();
            var (success, messages, outputs, meta) = await ExecuteAsync(job, cancellationToken);
            lock (_queueGate)
            {
                _running = null;
                _lastNode = null;
                if (_history.Count > 10_000)
                {
                    _history.Remove(_historyOrder[0]);
                    _historyOrder.RemoveAt(0);
                }
                _history[job.PromptId] = new JsonObject
                {
                    ["prompt"] = job.ToJson(),
                    ["outputs"] = outputs,
                    ["status"] = new JsonObject
                    {
                        ["status_str"] = success ? "success" : "error",
                        ["completed"] = success,
                        ["messages"] = messages,
                    },
                    ["meta"] = meta,
                };
                _historyOrder.Remove(job.PromptId);
                _historyOrder.Add(job.PromptId);
            }
            QueueUpdated();
            // History is written before the final "executing node=null", so a client may fetch it on that message.
            _finished[job.PromptId] = System.Diagnostics.Stopwatch.GetTimestamp();
            if (job.ClientId is not null)
            {
                Send("executing", new JsonObject { ["node"] = null, ["prompt_id"] = job.PromptId }, job.ClientId);
            }
            ApplyFlags();
        }
    }

    /// <summary>What <c>/free</c> asked for, done between prompts: free_memory also resets the node cache.</summary>
    private void ApplyFlags()
    {
        if (_freeMemory)
        {
            _freeMemory = false;
            _cache = new(StringComparer.Ordinal);
        }
    }

    private long Now() => _time.GetUtcNow().ToUnixTimeMilliseconds();

    private async Task<(bool Success, JsonArray Messages, JsonObject Outputs, JsonObject Meta)> ExecuteAsync(Job job, CancellationToken cancellationToken)
    {
        _interrupt = false;
        var clientId = job.ClientId;
        var prompt = job.Prompt;
        var promptId = job.PromptId;
        var messages = new JsonArray();
        void AddMessage(string type, JsonObject data, bool broadcast)
        {
            data["timestamp"] = Now();
            messages.Add(new JsonArray(type, data.DeepClone()));
            if (clientId is not null || broadcast)
            {
                Send(type, data, clientId);
            }
        }

        AddMessage("execution_start", new JsonObject { ["prompt_id"] = promptId }, broadcast: false);
        var signatures = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var id in prompt.Select(p => p.Key))
        {
            Signature(prompt, id, signatures);
        }
        var cache = _options.CacheEnabled ? _cache : new Dictionary<string, CacheEntry>(StringComparer.Ordinal);
        // The classic cache keeps only what the current prompt can use.
        var keep = signatures.Values.ToHashSet(StringComparer.Ordinal);
        foreach (var stale in cache.Keys.Where(k => !keep.Contains(k)).ToList())
        {
            cache.Remove(stale);
        }
        var cached = prompt.Select(p => p.Key).Where(id => cache.ContainsKey(signatures[id])).ToList();
        AddMessage("execution_cached", new JsonObject { ["nodes"] = new JsonArray([.. cached.Select(c => (JsonNode)c)]), ["prompt_id"] = promptId }, broadcast: false);

        var progress = new ProgressRegistry(this, promptId);
        var outputs = new JsonObject();
        var meta = new JsonObject();
        var executed = new List<string>();
        var success = true;
        foreach (var id in ExecutionOrder(prompt, job.Outputs, n => cache.ContainsKey(signatures[n])))
        {
            var node = (JsonObject)prompt[id]!;
            var classType = node["class_type"]!.ToString();
            JsonObject NodeMeta() => new() { ["node_id"] = id, ["display_node"] = id, ["parent_node"] = null, ["real_node_id"] = id };
            if (cache.TryGetValue(signatures[id], out var hit))
            {
                progress.Finish(id);
                if (hit.Ui is not null)
                {
                    outputs[id] = hit.Ui.DeepClone();
                    meta[id] = NodeMeta();
                    if (clientId is not null)
                    {
                        Send("executed", new JsonObject { ["node"] = id, ["display_node"] = id, ["output"] = hit.Ui.DeepClone(), ["prompt_id"] = promptId }, clientId);
                    }
                }
                continue;
            }
            progress.Start(id);
            if (clientId is not null)
            {
                lock (_queueGate)
                {
                    _lastNode = id;
                }
                Send("executing", new JsonObject { ["node"] = id, ["display_node"] = id, ["prompt_id"] = promptId }, clientId);
            }
            try
            {
                if (_interrupt)
                {
                    throw new InterruptedException();
                }
                var ui = await RunNodeAsync(job, id, classType, progress, cancellationToken);
                cache[signatures[id]] = new CacheEntry(ui);
                if (ui is not null)
                {
                    outputs[id] = ui.DeepClone();
                    meta[id] = NodeMeta();
                    if (clientId is not null)
                    {
                        Send("executed", new JsonObject { ["node"] = id, ["display_node"] = id, ["output"] = ui.DeepClone(), ["prompt_id"] = promptId }, clientId);
                    }
                }
                progress.Finish(id);
                executed.Add(id);
            }
            catch (InterruptedException)
            {
                success = false;
                AddMessage("execution_interrupted", new JsonObject
                {
                    ["prompt_id"] = promptId, ["node_id"] = id, ["node_type"] = classType, ["executed"] = Ids(executed),
                }, broadcast: true);
                break;
            }
            catch (PythonError ex)
            {
                success = false;
                AddMessage("execution_error", new JsonObject
                {
                    ["prompt_id"] = promptId,
                    ["node_id"] = id,
                    ["node_type"] = classType,
                    ["executed"] = Ids(executed),
                    ["exception_message"] = ex.Message,
                    ["exception_type"] = ex.PythonType,
                    ["traceback"] = new JsonArray($"  File \"/comfy/execution.py\", line 1, in {classType}\n"),
                    ["current_inputs"] = CurrentInputs(node),
                    ["current_outputs"] = Ids(cache.Keys.Count == 0 ? [] : prompt.Select(p => p.Key).Where(n => cache.ContainsKey(signatures[n]))),
                }, broadcast: false);
                break;
            }
        }
        if (success)
        {
            AddMessage("execution_success", new JsonObject { ["prompt_id"] = promptId }, broadcast: false);
        }
        if (_options.CacheEnabled)
        {
            _cache = cache;
        }
        return (success, messages, outputs, meta);
    }

    private static JsonArray Ids(IEnumerable<string> ids) => new([.. ids.Select(i => (JsonNode)i)]);

    private static JsonObject CurrentInputs(JsonObject node)
    {
        var result = new JsonObject();
        foreach (var (name, value) in node["inputs"] as JsonObject ?? [])
        {
            result[name] = value is JsonArray ? new JsonArray((JsonNode?)null) : new JsonArray(value?.DeepClone());
        }
        return result;
    }

    /// <summary>
    /// The order ComfyUI's ExecutionList runs nodes in: outputs are added with their uncached ancestors (a stack walk, so
    /// insertion order is ComfyUI's), then ready nodes are picked by <c>ux_friendly_pick_node</c>: an output first, else a
    /// node blocking an output, else one two links away from an output, else the first ready one.
    /// </summary>
    private List<string> ExecutionOrder(JsonObject prompt, List<string> outputs, Func<string, bool> isCached)
    {
        var pending = new List<string>();
        var blockCount = new Dictionary<string, int>(StringComparer.Ordinal);
        var blocking = new Dictionary<string, List<string>>(StringComparer.Ordinal);
        bool IsOutput(string id) => _nodeClasses[((JsonObject)prompt[id]!)["class_type"]!.ToString()].OutputNode;

        void AddNode(string start)
        {
            var stack = new List<string> { start };
            var links = new List<(string From, string To)>();
            while (stack.Count > 0)
            {
                var id = stack[^1];
                stack.RemoveAt(stack.Count - 1);
                if (blockCount.ContainsKey(id))
                {
                    continue;
                }
                pending.Add(id);
                blockCount[id] = 0;
                blocking[id] = [];
                foreach (var (_, value) in (JsonObject)((JsonObject)prompt[id]!)["inputs"]!)
                {
                    if (value is JsonArray { Count: 2 } link && link[0]?.ToString() is { } from && prompt.ContainsKey(from) && !isCached(from))
                    {
                        stack.Add(from);
                        links.Add((from, id));
                    }
                }
            }
            foreach (var (from, to) in links)
            {
                AddNode(from);
                if (!blocking[from].Contains(to))
                {
                    blocking[from].Add(to);
                    blockCount[to]++;
                }
            }
        }

        string Pick(List<string> ready) =>
            ready.FirstOrDefault(IsOutput)
            ?? ready.FirstOrDefault(n => blocking[n].Any(IsOutput))
            ?? ready.FirstOrDefault(n => blocking[n].Any(b => blocking[b].Any(IsOutput)))
            ?? ready[0];

        foreach (var output in outputs)
        {
            AddNode(output);
        }
        var order = new List<string>();
        while (pending.Count > 0)
        {
            var ready = pending.Where(n => blockCount[n] == 0).ToList();
            if (ready.Count == 0)
            {
                break; // a cycle; validation refuses those before they are queued
            }
            var next = Pick(ready);
            order.Add(next);
            pending.Remove(next);
            foreach (var blocked in blocking[next])
            {
                blockCount[blocked]--;
            }
        }
        return order;
    }

    /// <summary>CacheKeySetInputSignature: class, constant inputs and the ancestors' signatures; output nodes also their id.</summary>
    private string Signature(JsonObject prompt, string id, Dictionary<string, string> memo)
    {
        if (memo.TryGetValue(id, out var known))
        {
            return known;
        }
        memo[id] = "(cycle)";
        var node = (JsonObject)prompt[id]!;
        var classType = node["class_type"]!.ToString();
        var sb = new StringBuilder(classType);
        if (_nodeClasses.TryGetValue(classType, out var cls) && cls.OutputNode)
        {
            sb.Append("#id=").Append(id);
        }
        foreach (var (name, value) in (node["inputs"] as JsonObject ?? []).OrderBy(p => p.Key, StringComparer.Ordinal))
        {
            sb.Append('|').Append(name).Append('=');
            if (value is JsonArray { Count: 2 } link && link[0]?.ToString() is { } source && prompt.ContainsKey(source))
            {
                sb.Append('{').Append(Signature(prompt, source, memo)).Append("}.").Append(link[1]?.ToJsonString());
            }
            else
            {
                sb.Append(value?.ToJsonString() ?? "null");
            }
        }
        return memo[id] = sb.ToString();
    }

    // ---- what each node does -------------------------------------------------------------------

    private async Task<JsonObject?> RunNodeAsync(Job job, string id, string classType, ProgressRegistry progress, CancellationToken cancellationToken)
    {
        var inputs = (JsonObject)((JsonObject)job.Prompt[id]!)["inputs"]!;
        if (Faults.ExecutionError is { } fault && fault.ClassType == classType)
        {
            var tips = fault.ExceptionType.Contains("OutOfMemory", StringComparison.Ordinal)
                ? "This error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked before you might have accidentally set the batch_size to a large number."
                : "";
            throw new PythonError(fault.ExceptionType, $"{fault.ExceptionMessage}\n{tips}");
        }
        switch (classType)
        {
            case "CheckpointLoaderSimple":
                RequireFile("checkpoints", inputs["ckpt_name"]);
                break;
            case "UNETLoader":
                RequireFile("diffusion_models", inputs["unet_name"]);
                break;
            case "DualCLIPLoader":
                RequireFile("text_encoders", inputs["clip_name1"]);
                RequireFile("text_encoders", inputs["clip_name2"]);
                break;
            case "VAELoader" when inputs["vae_name"]?.ToString() != "pixel_space":
                RequireFile("vae", inputs["vae_name"]);
                break;
            case "LoraLoader" when StrengthOf(inputs["strength_model"]) != 0 || StrengthOf(inputs["strength_clip"]) != 0:
            case "LoraLoaderModelOnly" when StrengthOf(inputs["strength_model"]) != 0:
                // Both strengths 0 returns the inputs unchanged without opening the file.
                RequireFile("loras", inputs["lora_name"]);
                break;
            case "KSampler":
                await SampleAsync(job, id, (int)PyInt(inputs["steps"]), progress, cancellationToken);
                break;
            case "SaveImage":
                return SaveImages(job, id);
        }
        return null;
    }

    private static double StrengthOf(JsonNode? value) => value is null ? 1 : PyFloat(value);

    /// <summary><c>folder_paths.get_full_path_or_raise</c>.</summary>
    private void RequireFile(string folder, JsonNode? name)
    {
        if (_folders[folder].FullPath(name?.ToString() ?? "") is null)
        {
            throw new PythonError("FileNotFoundError", $"Model in folder '{folder}' with filename '{name}' not found.\n");
        }
    }

    private async Task SampleAsync(Job job, string id, int steps, ProgressRegistry progress, CancellationToken cancellationToken)
    {
        for (var step = 1; step <= steps; step++)
        {
            if (Faults.Stall == ComfySimStall.Jobs)
            {
                // A hung sampler: no progress and no reaction to /interrupt until the stall is lifted.
                await WaitWhileAsync(() => Faults.Stall == ComfySimStall.Jobs, cancellationToken);
            }
            if (_interrupt)
            {
                throw new InterruptedException();
            }
            if (Faults.StepDelay > TimeSpan.Zero)
            {
                await Task.Delay(Faults.StepDelay, _time, cancellationToken);
            }
            if (Faults.DieAtStep == step)
            {
                _ = Task.Run(KillAsync, CancellationToken.None);
                await Task.Delay(Timeout.InfiniteTimeSpan, _time, cancellationToken);
            }
            // main.py's hook: progress_state (a broadcast) first, then progress to the prompt's client, or to every socket when it has none.
            progress.Update(id, step, steps);
            Send("progress", new JsonObject { ["value"] = step, ["max"] = steps, ["prompt_id"] = job.PromptId, ["node"] = id }, job.ClientId);
        }
    }
}
