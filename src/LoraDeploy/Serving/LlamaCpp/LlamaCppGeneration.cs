namespace LoraDeploy.Serving.LlamaCpp;

/// <summary>
/// One generation request, transport-neutral. The fields map 1:1 onto OpenAI's completions / chat completions bodies
/// (and DeepInfra's native text generation): prompt or messages, <c>max_tokens</c>, <c>temperature</c>, <c>top_p</c>,
/// <c>seed</c>, <c>stop</c>, <c>logprobs</c>/<c>top_logprobs</c>, <c>echo</c>; <see cref="Adapters"/> is the
/// adapter set (the deploy's adapter at <c>lora_scale</c>, or several with <c>loras: [{model, scale}]</c>).
/// </summary>
public sealed record LlamaCppRequest
{
    public required LlamaCppPrompt Prompt { get; init; }

    /// <summary>Adapters applied together, each at its scale (negative allowed; 0 = not applied). Empty = the base model.</summary>
    public IReadOnlyList<LlamaCppAdapterUse> Adapters { get; init; } = [];

    /// <summary>Most tokens to generate; null = as many as the context has room for. Clipped to the room left.</summary>
    public int? MaxTokens { get; init; }

    /// <summary>0 = greedy (deterministic); otherwise LLamaSharp's sampling pipeline at this temperature.</summary>
    public float Temperature { get; init; } = 1f;

    /// <summary>Nucleus sampling mass (1 = off). Ignored when greedy.</summary>
    public float TopP { get; init; } = 1f;

    /// <summary>Sampling seed; a fixed seed makes sampling repeatable. Null = random.</summary>
    public uint? Seed { get; init; }

    /// <summary>Stop strings: generation ends when the text contains one; the stop text is not part of the output.</summary>
    public IReadOnlyList<string> Stop { get; init; } = [];

    /// <summary>
    /// Null = no log-probabilities. Otherwise each token carries its log-probability (log-softmax of the raw logits)
    /// and this many most likely alternatives (0 = none; up to the vocabulary size).
    /// </summary>
    public int? Logprobs { get; init; }

    /// <summary>Emit the prompt tokens first (as <see cref="LlamaCppChunkKind.Prompt"/> chunks, with log-probabilities when asked).</summary>
    public bool Echo { get; init; }
}

/// <summary>An adapter of the set and its scale (llama.cpp multiplies by alpha/rank on top).</summary>
public sealed record LlamaCppAdapterUse(string AdapterId, float Scale = 1f);

/// <summary>The prompt: text, exact token ids, or chat messages.</summary>
public abstract record LlamaCppPrompt
{
    private LlamaCppPrompt()
    {
    }

    /// <summary>Text tokenized with the model's tokenizer; BOS is added if the model asks for it.</summary>
    public sealed record Text(string Value) : LlamaCppPrompt;

    /// <summary>Token ids used exactly as given (no BOS added), e.g. OpenAI's token-array prompt.</summary>
    public sealed record Tokens(IReadOnlyList<int> Ids) : LlamaCppPrompt;

    /// <summary>Messages rendered with the GGUF's chat template (llama_chat_apply_template) and an assistant turn opened.</summary>
    public sealed record Chat(IReadOnlyList<LlamaCppChatMessage> Messages) : LlamaCppPrompt;
}

public sealed record LlamaCppChatMessage(string Role, string Content);

public enum LlamaCppChunkKind
{
    /// <summary>An echoed prompt token.</summary>
    Prompt,
    /// <summary>A generated token.</summary>
    Completion,
    /// <summary>The last chunk: finish reason and usage, plus any text held back while checking stop strings.</summary>
    Finish,
}

/// <summary>
/// A piece of the stream. <see cref="Text"/> is the visible text delta (UTF-8 sequences split across byte tokens come
/// out whole, stop text is never included, so text may lag a token behind); <see cref="Token"/> is the token this
/// chunk is for.
/// </summary>
public sealed record LlamaCppChunk
{
    public required LlamaCppChunkKind Kind { get; init; }
    public string Text { get; init; } = "";
    public LlamaCppToken? Token { get; init; }

    /// <summary>On the Finish chunk: "stop" (end-of-generation token or stop string) or "length" (max tokens or context full).</summary>
    public string? FinishReason { get; init; }

    /// <summary>On the Finish chunk.</summary>
    public LlamaCppUsage? Usage { get; init; }
}

/// <summary>
/// A token with its own text (<see cref="Piece"/>, may be part of a UTF-8 sequence: see <see cref="Bytes"/>), and,
/// when asked, its log-probability and the most likely alternatives at its position (null for the first prompt token,
/// which has no context).
/// </summary>
public sealed record LlamaCppToken(int Id, string Piece, byte[] Bytes, float? Logprob, IReadOnlyList<LlamaCppTopToken>? TopLogprobs);

public sealed record LlamaCppTopToken(int Id, string Piece, byte[] Bytes, float Logprob);

public sealed record LlamaCppUsage(int PromptTokens, int CompletionTokens)
{
    public int TotalTokens => PromptTokens + CompletionTokens;
}

/// <summary>What a request cannot do, for the gateway to map (unknown adapter → 404, the rest → 400).</summary>
public enum LlamaCppErrorKind
{
    InvalidRequest,
    UnknownAdapter,
    PromptTooLong,
    NoChatTemplate,
}

/// <summary>A request the engine refuses, with a sentence a caller can act on. The engine keeps serving.</summary>
public sealed class LlamaCppRequestException(LlamaCppErrorKind kind, string message) : Exception(message)
{
    public LlamaCppErrorKind Kind { get; } = kind;
}

/// <summary>The engine itself failed (model load, context creation, a decode error).</summary>
public sealed class LlamaCppEngineException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>Result of loading an adapter.</summary>
public abstract record LoraLoadResult(string AdapterId)
{
    public sealed record Loaded(string AdapterId) : LoraLoadResult(AdapterId);

    /// <summary>llama.cpp (or our checks) refused the file; <see cref="Reason"/> is llama.cpp's message when it gave one.</summary>
    public sealed record Refused(string AdapterId, string Reason) : LoraLoadResult(AdapterId);
}
