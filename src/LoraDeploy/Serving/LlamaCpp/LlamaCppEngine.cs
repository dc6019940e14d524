using System.Runtime.CompilerServices;
using System.Text;
using LLama;
using LLama.Common;
using LLama.Native;
using Microsoft.Extensions.Logging.Abstractions;

namespace LoraDeploy.Serving.LlamaCpp;

/// <summary>
/// llama.cpp in-process: one base model, LoRA adapters loaded onto it, and up to <see cref="LlamaCppEngineOptions.Slots"/>
/// contexts. The adapter set (ids and scales) belongs to a context, not to a request, so each context serves one set at
/// a time: requests on a context run one after another, a context keeps its set and its prompt's KV cache between
/// requests (a request with the same set reuses the common prefix), and switching a context to another set clears its
/// KV cache (llama.cpp would otherwise silently reuse keys/values computed with the old adapters).
/// </summary>
public sealed class LlamaCppEngine : IAsyncDisposable
{
    private static readonly Encoding Utf8 = new UTF8Encoding(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: false);

    private readonly LlamaCppEngineOptions _options;
    private readonly ILogger _logger;
    private readonly LLamaWeights _weights;
    private readonly ModelParams _contextParams;
    private readonly int _vocabSize;

    private readonly Lock _gate = new();
    private readonly Dictionary<string, Adapter> _adapters = new(StringComparer.Ordinal);
    private readonly List<Slot> _slots = [];
    private readonly SemaphoreSlim _capacity;
    private long _clock;
    private bool _disposed;

    /// <summary>llama.cpp keeps a model's adapters in a set that init/free mutate: one at a time per model.</summary>
    private readonly Lock _adapterNative = new();

    private LlamaCppEngine(LlamaCppEngineOptions options, ILogger logger, LLamaWeights weights, ModelParams contextParams)
    {
        _options = options;
        _logger = logger;
        _weights = weights;
        _contextParams = contextParams;
        _vocabSize = weights.Vocab.Count;
        _capacity = new SemaphoreSlim(options.Slots, options.Slots);
        Model = new LlamaCppModelInfo((int)options.ContextSize, _vocabSize, weights.NativeHandle.ContextSize,
            weights.Vocab.ShouldAddBOS, ChatTemplate(weights));
    }

    /// <summary>
    /// The model's default chat template (what <c>llama_model_chat_template(model, NULL)</c> returns), read from the
    /// metadata LLamaSharp copied out with its length. Not <c>SafeLlamaModelHandle.GetTemplate</c>: it finds the end of
    /// the C string with a vectorised <c>IndexOf</c> over an <c>int.MaxValue</c>-long span, which reads past the
    /// terminator and crashed a CI run (AccessViolationException) when the string ended just before an unmapped page.
    /// </summary>
    private static string? ChatTemplate(LLamaWeights weights) =>
        weights.Metadata.TryGetValue("tokenizer.chat_template", out var template) ? template : null;

    /// <summary>Loads the base model (once); contexts are created when requests need them.</summary>
    /// <exception cref="LlamaCppEngineException">llama.cpp could not load the model; the message carries its reason.</exception>
    public static LlamaCppEngine Load(LlamaCppEngineOptions options, ILogger? logger = null)
    {
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        logger ??= NullLogger.Instance;
        var parameters = new ModelParams(options.ModelPath)
        {
            ContextSize = options.ContextSize,
            BatchSize = options.BatchSize,
            UBatchSize = options.BatchSize,
            Threads = options.Threads,
            BatchThreads = options.Threads,
            GpuLayerCount = options.GpuLayerCount,
            TypeK = options.KvCacheType,
            TypeV = options.KvCacheType,
            FlashAttention = options.FlashAttention,
            SeqMax = 1,
        };
        using var log = LlamaNativeLog.Begin(logger);
        try
        {
            var weights = LLamaWeights.LoadFromFile(parameters);
            return new LlamaCppEngine(options, logger, weights, parameters);
        }
        catch (LLama.Exceptions.LoadWeightsFailedException e)
        {
            var problems = log.Problems();
            throw new LlamaCppEngineException(
                $"llama.cpp could not load the base model '{options.ModelPath}': " +
                (problems.Count > 0 ? string.Join("; ", problems) : "no reason given"), e);
        }
    }

    public LlamaCppModelInfo Model { get; }

    /// <summary>Ids of the adapters that requests may use now (loaded and not being unloaded).</summary>
    public IReadOnlyList<string> ResidentAdapters
    {
        get
        {
            lock (_gate)
            {
                return _adapters.Values.Where(a => a.Unloading is null).Select(a => a.Id).Order(StringComparer.Ordinal).ToList();
            }
        }
    }

    /// <summary>
    /// Loads an adapter GGUF onto the base model. A file llama.cpp refuses (wrong architecture, a tensor the base lacks,
    /// a wrong shape, a truncated or non-GGUF file) comes back as <see cref="LoraLoadResult.Refused"/> with llama.cpp's
    /// reason and is never handed to a context. Loading an id that is already resident from the same file is a no-op.
    /// </summary>
    public LoraLoadResult LoadAdapter(string adapterId, string ggufPath)
    {
        ArgumentException.ThrowIfNullOrEmpty(adapterId);
        ArgumentException.ThrowIfNullOrEmpty(ggufPath);
        var path = Path.GetFullPath(ggufPath);
        lock (_gate)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (_adapters.TryGetValue(adapterId, out var existing))
            {
                return existing.Unloading is not null
                    ? new LoraLoadResult.Refused(adapterId, $"adapter '{adapterId}' is being unloaded; load it again once the unload has finished")
                    : existing.Path == path
                        ? new LoraLoadResult.Loaded(adapterId)
                        : new LoraLoadResult.Refused(adapterId, $"adapter id '{adapterId}' is already loaded from '{existing.Path}'; unload it first");
            }
        }
        if (!File.Exists(path))
        {
            return new LoraLoadResult.Refused(adapterId, $"adapter file '{path}' does not exist");
        }

        IntPtr handle;
        IReadOnlyList<string> problems;
        lock (_adapterNative)
        {
            using var log = LlamaNativeLog.Begin(_logger);
            handle = LlamaNative.llama_adapter_lora_init(_weights.NativeHandle, path);
            problems = log.Problems();
        }
        if (handle == IntPtr.Zero)
        {
            var reason = RefusalReason(problems);
            _logger.LogWarning("llama.cpp refused adapter {AdapterId} ({Path}): {Reason}", adapterId, path, reason);
            return new LoraLoadResult.Refused(adapterId, reason);
        }

        lock (_gate)
        {
            if (!_disposed && !_adapters.ContainsKey(adapterId))
            {
                _adapters.Add(adapterId, new Adapter(adapterId, path, handle, ++_clock));
                _logger.LogInformation("Loaded adapter {AdapterId} from {Path}", adapterId, path);
                return new LoraLoadResult.Loaded(adapterId);
            }
        }
        // Lost a race with a concurrent load of the same id (or disposal): ours is surplus.
        FreeAdapter(handle);
        return LoadAdapter(adapterId, ggufPath);
    }

    /// <summary>
    /// llama.cpp logs the detail first ("LoRA tensor 'x' does not exist in base model…", "invalid magic characters…")
    /// and then "llama_adapter_lora_init: failed to apply lora adapter: &lt;what&gt;"; the detail is the useful part.
    /// </summary>
    private static string RefusalReason(IReadOnlyList<string> problems)
    {
        if (problems.Count == 0)
        {
            return "llama.cpp refused the adapter file and gave no reason";
        }
        const string Marker = "failed to apply lora adapter:";
        var parts = problems
            .Select(p => p.Contains(Marker, StringComparison.Ordinal) ? p[(p.IndexOf(Marker, StringComparison.Ordinal) + Marker.Length)..].Trim() : StripFunction(p))
            .Where(p => p.Length > 0)
            .Distinct(StringComparer.Ordinal);
        return "llama.cpp refused the adapter: " + string.Join("; ", parts);
    }

    /// <summary>"gguf_init_from_file_impl: invalid magic" → "invalid magic".</summary>
    private static string StripFunction(string line)
    {
        var colon = line.IndexOf(": ", StringComparison.Ordinal);
        return colon > 0 && !line[..colon].Contains(' ') ? line[(colon + 2)..].Trim() : line.Trim();
    }

    /// <summary>
    /// Unloads an adapter: new requests naming it are refused at once; requests already using it finish first; then it
    /// is cleared from every context that still has it applied (freeing it while applied would leave the context a
    /// dangling pointer) and freed. Returns false when the id was not loaded.
    /// </summary>
    public Task<bool> UnloadAdapterAsync(string adapterId)
    {
        ArgumentException.ThrowIfNullOrEmpty(adapterId);
        lock (_gate)
        {
            if (!_adapters.TryGetValue(adapterId, out var adapter))
            {
                return Task.FromResult(false);
            }
            if (adapter.Unloading is null)
            {
                if (adapter.Pins == 0)
                {
                    adapter.Drained.TrySetResult();
                }
                adapter.Unloading = UnloadCoreAsync(adapter);
            }
            return adapter.Unloading;
        }
    }

    private async Task<bool> UnloadCoreAsync(Adapter adapter)
    {
        // Started under the gate: leave it before doing anything (native calls, waiting for contexts).
        await Task.Yield();
        await adapter.Drained.Task.ConfigureAwait(false);
        List<Slot> slots;
        lock (_gate)
        {
            slots = [.. _slots];
        }
        foreach (var slot in slots)
        {
            // No request uses the adapter any more, so a context without it can never gain it: skip it rather than
            // wait for whatever unrelated request it is serving.
            if (!slot.Set.Contains(adapter))
            {
                continue;
            }
            await slot.Lock.WaitAsync().ConfigureAwait(false);
            try
            {
                if (slot.Context is not null && slot.Set.Contains(adapter))
                {
                    ApplySet(slot, AdapterSet.Empty);
                }
            }
            finally
            {
                slot.Lock.Release();
            }
        }
        FreeAdapter(adapter.Handle);
        lock (_gate)
        {
            _adapters.Remove(adapter.Id);
        }
        _logger.LogInformation("Unloaded adapter {AdapterId}", adapter.Id);
        return true;
    }

    private void FreeAdapter(IntPtr handle)
    {
        if (handle == IntPtr.Zero)
        {
            return;
        }
        lock (_adapterNative)
        {
            LlamaNative.llama_adapter_lora_free(handle);
        }
    }

    /// <summary>Tokenizes text as a text prompt would be (BOS if the model asks for it; special tokens parsed).</summary>
    public IReadOnlyList<int> Tokenize(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        return _weights.NativeHandle.Tokenize(text, addBos: true, special: true, Utf8).Select(t => (int)t).ToArray();
    }

    /// <summary>
    /// Generates a completion as a stream of chunks: echoed prompt tokens (when asked), one chunk per generated token,
    /// then a Finish chunk with the finish reason and usage. Refusals (<see cref="LlamaCppRequestException"/>) are thrown
    /// on the first MoveNextAsync. Cancelling stops between tokens and frees the context for the next request.
    /// </summary>
    public async IAsyncEnumerable<LlamaCppChunk> GenerateAsync(LlamaCppRequest request, [EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(request);
        var prompt = Prepare(request);
        var set = Pin(request.Adapters);
        try
        {
            var slot = await AcquireAsync(set, cancellationToken).ConfigureAwait(false);
            try
            {
                using var run = new GenerationRun(this, slot, set, request, prompt);
                foreach (var chunk in run.Run(cancellationToken))
                {
                    yield return chunk;
                }
            }
            finally
            {
                Release(slot);
            }
        }
        finally
        {
            Unpin(set);
        }
    }

    // ---- request preparation -------------------------------------------------------------------------------------

    private LLamaToken[] Prepare(LlamaCppRequest request)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (request.MaxTokens is < 0)
        {
            throw Invalid($"max_tokens must be 0 or more (got {request.MaxTokens})");
        }
        if (!float.IsFinite(request.Temperature) || request.Temperature < 0)
        {
            throw Invalid($"temperature must be a finite number of 0 or more (got {request.Temperature})");
        }
        if (!float.IsFinite(request.TopP) || request.TopP is <= 0 or > 1)
        {
            throw Invalid($"top_p must be above 0 and at most 1 (got {request.TopP})");
        }
        if (request.Logprobs is { } k && (k < 0 || k > _vocabSize))
        {
            throw Invalid($"logprobs must be between 0 and the vocabulary size {_vocabSize} (got {k})");
        }
        var tokens = request.Prompt switch
        {
            LlamaCppPrompt.Text text => _weights.NativeHandle.Tokenize(text.Value, addBos: true, special: true, Utf8),
            LlamaCppPrompt.Tokens ids => TokenIds(ids.Ids),
            LlamaCppPrompt.Chat chat => TokenizeChat(RenderChat(chat.Messages)),
            null => throw Invalid("the prompt is missing"),
            _ => throw Invalid($"unsupported prompt kind {request.Prompt.GetType().Name}"),
        };
        if (tokens.Length == 0)
        {
            throw Invalid("the prompt is empty");
        }
        if (tokens.Length >= Model.ContextSize)
        {
            throw new LlamaCppRequestException(LlamaCppErrorKind.PromptTooLong,
                $"the prompt is {tokens.Length} tokens but the context holds {Model.ContextSize}, and at least one token must be left for the completion");
        }
        return tokens;
    }

    /// <summary>Templates that write BOS themselves would get a second one from the tokenizer: keep one.</summary>
    private LLamaToken[] TokenizeChat(string rendered)
    {
        var tokens = _weights.NativeHandle.Tokenize(rendered, addBos: true, special: true, Utf8);
        var bos = _weights.Vocab.BOS;
        return tokens.Length > 1 && bos is not null && tokens[0] == bos && tokens[1] == bos ? tokens[1..] : tokens;
    }

    private LLamaToken[] TokenIds(IReadOnlyList<int> ids)
    {
        var tokens = new LLamaToken[ids.Count];
        for (var i = 0; i < ids.Count; i++)
        {
            if (ids[i] < 0 || ids[i] >= _vocabSize)
            {
                throw Invalid($"prompt token {i} is {ids[i]}, outside the vocabulary (0 to {_vocabSize - 1})");
            }
            tokens[i] = ids[i];
        }
        return tokens;
    }

    private string RenderChat(IReadOnlyList<LlamaCppChatMessage> messages)
    {
        if (messages.Count == 0)
        {
            throw Invalid("messages is empty");
        }
        if (Model.ChatTemplate is null)
        {
            throw new LlamaCppRequestException(LlamaCppErrorKind.NoChatTemplate,
                "the base model's GGUF has no chat template (tokenizer.chat_template); send a text prompt instead");
        }
        var template = new LLamaTemplate(Model.ChatTemplate) { AddAssistant = true };
        foreach (var message in messages)
        {
            if (string.IsNullOrEmpty(message.Role))
            {
                throw Invalid("a chat message has no role");
            }
            template.Add(message.Role, message.Content ?? "");
        }
        try
        {
            return Utf8.GetString(template.Apply());
        }
        catch (LLama.Exceptions.RuntimeError e)
        {
            throw new LlamaCppRequestException(LlamaCppErrorKind.NoChatTemplate,
                $"llama.cpp does not recognise the base model's chat template ({e.Message}); send a text prompt instead");
        }
    }

    private static LlamaCppRequestException Invalid(string message) => new(LlamaCppErrorKind.InvalidRequest, message);

    // ---- adapters and slots --------------------------------------------------------------------------------------

    private AdapterSet Pin(IReadOnlyList<LlamaCppAdapterUse>? uses)
    {
        uses ??= [];
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var use in uses)
        {
            if (string.IsNullOrEmpty(use.AdapterId))
            {
                throw Invalid("an adapter in the request has no id");
            }
            if (!float.IsFinite(use.Scale))
            {
                throw Invalid($"adapter '{use.AdapterId}' has scale {use.Scale}; a scale must be a finite number");
            }
            if (!seen.Add(use.AdapterId))
            {
                throw Invalid($"adapter '{use.AdapterId}' is listed twice; give it once with the summed scale");
            }
        }
        lock (_gate)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            var entries = new List<(Adapter Adapter, float Scale)>();
            foreach (var use in uses)
            {
                if (!_adapters.TryGetValue(use.AdapterId, out var adapter) || adapter.Unloading is not null)
                {
                    throw new LlamaCppRequestException(LlamaCppErrorKind.UnknownAdapter, $"adapter '{use.AdapterId}' is not loaded on this engine");
                }
                entries.Add((adapter, use.Scale));
            }
            foreach (var (adapter, _) in entries)
            {
                adapter.Pins++;
            }
            return new AdapterSet(entries);
        }
    }

    private void Unpin(AdapterSet set)
    {
        lock (_gate)
        {
            foreach (var adapter in set.Pinned)
            {
                if (--adapter.Pins == 0 && adapter.Unloading is not null)
                {
                    adapter.Drained.TrySetResult();
                }
            }
        }
    }

    /// <summary>A context already holding this set, else a new one while under the slot limit, else the idle one used longest ago, else wait.</summary>
    private async Task<Slot> AcquireAsync(AdapterSet set, CancellationToken cancellationToken)
    {
        await _capacity.WaitAsync(cancellationToken).ConfigureAwait(false);
        Slot slot;
        lock (_gate)
        {
            if (_disposed)
            {
                _capacity.Release();
                throw new ObjectDisposedException(nameof(LlamaCppEngine));
            }
            var idle = _slots.Where(s => !s.Busy).ToList();
            slot = idle.FirstOrDefault(s => s.Set.Key == set.Key && s.Context is not null)
                ?? (_slots.Count < _options.Slots ? new Slot() : idle.MinBy(s => s.LastUsed)!);
            if (!_slots.Contains(slot))
            {
                _slots.Add(slot);
            }
            slot.Busy = true;
        }
        try
        {
            await slot.Lock.WaitAsync(cancellationToken).ConfigureAwait(false);
        }
        catch
        {
            Release(slot, locked: false);
            throw;
        }
        // Contexts are created on first use (each holds a KV cache of ContextSize tokens).
        if (slot.Context is null)
        {
            try
            {
                using var log = LlamaNativeLog.Begin(_logger);
                slot.Context = _weights.CreateContext(_contextParams);
            }
            catch (Exception e)
            {
                Release(slot);
                throw new LlamaCppEngineException($"llama.cpp could not create a context of {_options.ContextSize} tokens: {e.Message}", e);
            }
        }
        return slot;
    }

    private void Release(Slot slot, bool locked = true)
    {
        if (locked)
        {
            slot.Lock.Release();
        }
        lock (_gate)
        {
            slot.Busy = false;
            slot.LastUsed = ++_clock;
        }
        _capacity.Release();
    }

    /// <summary>Sets the context's adapter set natively (checking llama.cpp's result) and clears its KV cache.</summary>
    private void ApplySet(Slot slot, AdapterSet set)
    {
        var context = slot.Context!.NativeHandle;
        var applied = set.Entries.Where(e => e.Scale != 0).ToArray();
        var handles = applied.Select(e => e.Adapter.Handle).ToArray();
        var scales = applied.Select(e => e.Scale).ToArray();
        int result;
        unsafe
        {
            fixed (IntPtr* h = handles)
            fixed (float* s = scales)
            {
                result = LlamaNative.llama_set_adapters_lora(context, h, (nuint)applied.Length, s);
            }
        }
        // Whatever happened, the cached prompt no longer matches the adapters: forget it.
        context.MemoryClear();
        slot.KvTokens.Clear();
        if (result != 0)
        {
            unsafe
            {
                _ = LlamaNative.llama_set_adapters_lora(context, null, 0, null);
            }
            slot.Set = AdapterSet.Empty;
            throw new LlamaCppEngineException($"llama.cpp refused to apply the adapter set [{set.Key}] (error {result})");
        }
        slot.Set = set;
    }

    /// <summary>For tests: the adapter set each context has applied (ids, load serials and scales; "" = none).</summary>
    internal IReadOnlyList<string> AppliedAdapterSets()
    {
        lock (_gate)
        {
            return _slots.Where(s => s.Context is not null).Select(s => s.Set.Key).ToList();
        }
    }

    public async ValueTask DisposeAsync()
    {
        lock (_gate)
        {
            if (_disposed)
            {
                return;
            }
            _disposed = true;
        }
        // Wait for running requests: every slot's capacity comes back when its request ends.
        for (var i = 0; i < _options.Slots; i++)
        {
            await _capacity.WaitAsync().ConfigureAwait(false);
        }
        foreach (var slot in _slots)
        {
            slot.Context?.Dispose();
            slot.Lock.Dispose();
        }
        foreach (var adapter in _adapters.Values)
        {
            FreeAdapter(adapter.Handle);
        }
        _adapters.Clear();
        _weights.Dispose();
        // Wake requests still waiting for a context: they see the engine disposed and give their turn back.
        _capacity.Release(_options.Slots);
    }

    // ---- state ---------------------------------------------------------------------------------------------------

    private sealed class Adapter(string id, string path, IntPtr handle, long serial)
    {
        public string Id { get; } = id;
        /// <summary>Tells apart two loads under one id, so a set never matches one applied before an unload.</summary>
        public long Serial { get; } = serial;
        public string Path { get; } = path;
        public IntPtr Handle { get; } = handle;
        /// <summary>Requests admitted with this adapter and not yet finished (guarded by the engine's gate).</summary>
        public int Pins { get; set; }
        public Task<bool>? Unloading { get; set; }
        public TaskCompletionSource Drained { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
    }

    /// <summary>The adapters and scales of a request, in a canonical order; equal keys = the same weights.</summary>
    private sealed class AdapterSet
    {
        public static readonly AdapterSet Empty = new([]);

        public AdapterSet(IReadOnlyList<(Adapter Adapter, float Scale)> entries)
        {
            Pinned = entries.Select(e => e.Adapter).ToList();
            // Scale 0 contributes nothing (llama.cpp drops it too), so {X: 0} shares the base model's cache.
            Entries = entries.Where(e => e.Scale != 0).OrderBy(e => e.Adapter.Id, StringComparer.Ordinal).ToList();
            Key = string.Join(",", Entries.Select(e => $"{e.Adapter.Id}#{e.Adapter.Serial}={e.Scale.ToString("R", System.Globalization.CultureInfo.InvariantCulture)}"));
        }

        public IReadOnlyList<Adapter> Pinned { get; }
        public IReadOnlyList<(Adapter Adapter, float Scale)> Entries { get; }
        public string Key { get; }

        public bool Contains(Adapter adapter) => Entries.Any(e => ReferenceEquals(e.Adapter, adapter));
    }

    private sealed class Slot
    {
        public LLamaContext? Context { get; set; }
        /// <summary>Held while a request (or an unload) works on this context.</summary>
        public SemaphoreSlim Lock { get; } = new(1, 1);
        public AdapterSet Set { get; set; } = AdapterSet.Empty;
        /// <summary>The tokens whose keys/values are in the context's KV cache, position by position.</summary>
        public List<LLamaToken> KvTokens { get; } = [];
        public bool Busy { get; set; }
        public long LastUsed { get; set; }
    }

    // ---- one generation ------------------------------------------------------------------------------------------

    private sealed class GenerationRun(LlamaCppEngine engine, Slot slot, AdapterSet set, LlamaCppRequest request, LLamaToken[] prompt) : IDisposable
    {
        private readonly LLamaContext _context = slot.Context!;
        private readonly LLamaBatch _batch = new();
        private readonly byte[] _pieceBuffer = new byte[256];
        private LLama.Sampling.ISamplingPipeline? _sampler;

        public IEnumerable<LlamaCppChunk> Run(CancellationToken cancellationToken)
        {
            cancellationToken.ThrowIfCancellationRequested();
            // Another set (or another load of an adapter id) on this context: switch and clear its KV cache.
            if (slot.Set.Key != set.Key)
            {
                engine.ApplySet(slot, set);
            }

            var wantLogprobs = request.Logprobs is not null;
            var topK = request.Logprobs ?? 0;
            var promptLogprobs = request.Echo && wantLogprobs ? new LlamaCppToken?[prompt.Length] : null;
            DecodePrompt(promptLogprobs, topK, cancellationToken);

            if (request.Echo)
            {
                var echoDecoder = new StreamingTokenDecoder(Utf8, engine._weights.NativeHandle);
                for (var i = 0; i < prompt.Length; i++)
                {
                    echoDecoder.Add(prompt[i]);
                    yield return new LlamaCppChunk
                    {
                        Kind = LlamaCppChunkKind.Prompt,
                        Text = echoDecoder.Read(),
                        Token = promptLogprobs?[i] ?? Token(prompt[i], null, null),
                    };
                }
            }

            var room = engine.Model.ContextSize - prompt.Length;
            var maxTokens = Math.Min(request.MaxTokens ?? room, room);
            var decoder = new StreamingTokenDecoder(Utf8, engine._weights.NativeHandle);
            var stops = new StopStringMatcher(request.Stop ?? []);
            _sampler = request.Temperature == 0
                ? new LLama.Sampling.GreedySamplingPipeline()
                : new LLama.Sampling.DefaultSamplingPipeline
                {
                    Temperature = request.Temperature,
                    TopP = request.TopP,
                    // Only temperature and top_p are asked for: switch off the pipeline's other filters.
                    TopK = 0,
                    MinP = 0,
                    TypicalP = 1,
                    RepeatPenalty = 1,
                    Seed = request.Seed ?? (uint)Random.Shared.NextInt64(0, uint.MaxValue + 1L),
                };

            var finish = "length";
            var generated = 0;
            var logitsIndex = _batch.TokenCount - 1;
            while (generated < maxTokens)
            {
                cancellationToken.ThrowIfCancellationRequested();
                LlamaCppToken? info = null;
                var next = _sampler.Sample(_context.NativeHandle, logitsIndex);
                if (wantLogprobs)
                {
                    info = Scored(next, _context.NativeHandle.GetLogitsIth(logitsIndex), topK);
                }
                if (next.IsEndOfGeneration(engine._weights.Vocab))
                {
                    finish = "stop";
                    break;
                }
                generated++;
                decoder.Add(next);
                var (text, stopped) = stops.Push(decoder.Read());
                yield return new LlamaCppChunk { Kind = LlamaCppChunkKind.Completion, Text = text, Token = info ?? Token(next, null, null) };
                if (stopped)
                {
                    finish = "stop";
                    break;
                }
                if (generated < maxTokens)
                {
                    _batch.Clear();
                    _batch.Add(next, slot.KvTokens.Count, LLamaSeqId.Zero, true);
                    Decode();
                    slot.KvTokens.Add(next);
                    logitsIndex = 0;
                }
            }
            // After a stop string nothing is held; after an end-of-generation token a partial stop prefix is plain text.
            var rest = stops.Flush();
            yield return new LlamaCppChunk
            {
                Kind = LlamaCppChunkKind.Finish,
                Text = rest,
                FinishReason = finish,
                Usage = new LlamaCppUsage(prompt.Length, generated),
            };
        }

        /// <summary>
        /// Brings the KV cache to the prompt: keeps the longest prefix already cached, removes the rest of the sequence,
        /// decodes the new tokens (at least the last one, whose logits start the completion). Echo with log-probabilities
        /// needs logits at every prompt position, so it decodes the whole prompt.
        /// </summary>
        private void DecodePrompt(LlamaCppToken?[]? promptLogprobs, int topK, CancellationToken cancellationToken)
        {
            var cached = slot.KvTokens;
            var keep = 0;
            if (promptLogprobs is null)
            {
                while (keep < cached.Count && keep < prompt.Length && cached[keep] == prompt[keep])
                {
                    keep++;
                }
                keep = Math.Min(keep, prompt.Length - 1);
            }
            if (keep < cached.Count)
            {
                var memory = LlamaNative.llama_get_memory(_context.NativeHandle);
                if (!LlamaNative.llama_memory_seq_rm(memory, 0, keep, -1))
                {
                    _context.NativeHandle.MemoryClear();
                    keep = 0;
                }
                cached.RemoveRange(keep, cached.Count - keep);
            }
            if (promptLogprobs is not null)
            {
                promptLogprobs[0] = Token(prompt[0], null, null);
            }

            // The last prompt token is decoded on its own, as a cache hit decodes it: llama.cpp's CPU matmul sums in
            // another order for a one-token batch than for a larger one, so otherwise a repeated request (served from
            // the cache) could get logits a few 1e-7 away from its first run and greedy could break a near-tie
            // differently.
            var batchSize = (int)engine._options.BatchSize;
            for (var start = keep; start < prompt.Length;)
            {
                cancellationToken.ThrowIfCancellationRequested();
                var end = start < prompt.Length - 1 ? Math.Min(start + batchSize, prompt.Length - 1) : prompt.Length;
                _batch.Clear();
                for (var i = start; i < end; i++)
                {
                    _batch.Add(prompt[i], i, LLamaSeqId.Zero, promptLogprobs is not null || i == prompt.Length - 1);
                }
                Decode();
                cached.AddRange(prompt.AsSpan(start, end - start));
                if (promptLogprobs is not null)
                {
                    // Logits at position i score the token at i + 1.
                    for (var i = start; i < end && i + 1 < prompt.Length; i++)
                    {
                        promptLogprobs[i + 1] = Scored(prompt[i + 1], _context.NativeHandle.GetLogitsIth(i - start), topK);
                    }
                }
                start = end;
            }
        }

        private void Decode()
        {
            DecodeResult result;
            using (LlamaNativeLog.Begin(engine._logger))
            {
                result = _context.NativeHandle.Decode(_batch);
            }
            if (result != DecodeResult.Ok)
            {
                // The cache may hold part of the batch: start the next request from nothing.
                _context.NativeHandle.MemoryClear();
                slot.KvTokens.Clear();
                throw new LlamaCppEngineException($"llama.cpp could not decode a batch of {_batch.TokenCount} tokens ({result})");
            }
        }

        /// <summary>The token's log-probability and the top-k alternatives from a log-softmax over the raw logits.</summary>
        private LlamaCppToken Scored(LLamaToken token, ReadOnlySpan<float> logits, int topK)
        {
            var max = float.NegativeInfinity;
            foreach (var l in logits)
            {
                max = Math.Max(max, l);
            }
            double sum = 0;
            foreach (var l in logits)
            {
                sum += Math.Exp(l - max);
            }
            var logZ = max + Math.Log(sum);
            List<LlamaCppTopToken>? top = null;
            if (topK > 0)
            {
                // Min-heap of the k largest logits; ties go to the lower id.
                var heap = new PriorityQueue<int, (float Logit, int NegId)>();
                for (var i = 0; i < logits.Length; i++)
                {
                    var priority = (logits[i], -i);
                    if (heap.Count < topK)
                    {
                        heap.Enqueue(i, priority);
                    }
                    else if (heap.TryPeek(out _, out var least) && priority.CompareTo(least) > 0)
                    {
                        heap.EnqueueDequeue(i, priority);
                    }
                }
                var ids = new List<int>(heap.Count);
                while (heap.TryDequeue(out var id, out _))
                {
                    ids.Add(id);
                }
                ids.Reverse();
                top = new List<LlamaCppTopToken>(ids.Count);
                foreach (var id in ids)
                {
                    var bytes = PieceBytes(id);
                    top.Add(new LlamaCppTopToken(id, Utf8.GetString(bytes), bytes, (float)(logits[id] - logZ)));
                }
            }
            return Token(token, (float)(logits[(int)token] - logZ), top);
        }

        private LlamaCppToken Token(LLamaToken token, float? logprob, IReadOnlyList<LlamaCppTopToken>? top)
        {
            var bytes = PieceBytes(token);
            return new LlamaCppToken((int)token, Utf8.GetString(bytes), bytes, logprob, top);
        }

        /// <summary>The token's own bytes, special tokens rendered (so logprobs show "&lt;|im_end|&gt;").</summary>
        private byte[] PieceBytes(LLamaToken token)
        {
            var length = (int)engine._weights.NativeHandle.TokenToSpan(token, _pieceBuffer, 0, special: true);
            if (length <= _pieceBuffer.Length)
            {
                return _pieceBuffer.AsSpan(0, length).ToArray();
            }
            var large = new byte[length];
            engine._weights.NativeHandle.TokenToSpan(token, large, 0, special: true);
            return large;
        }

        public void Dispose() => _sampler?.Dispose();
    }
}

/// <summary>What the engine serves: its context size and vocabulary, the model's trained context, BOS handling and chat template.</summary>
public sealed record LlamaCppModelInfo(int ContextSize, int VocabSize, int TrainedContextSize, bool AddsBos, string? ChatTemplate);
