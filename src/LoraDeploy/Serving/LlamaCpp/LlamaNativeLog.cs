using System.Text;
using LLama.Native;

namespace LoraDeploy.Serving.LlamaCpp;

/// <summary>
/// llama.cpp reports why it refused a model or an adapter only through its log callback, which is process-wide. The
/// callback is installed once; a <see cref="Scope"/> collects what llama.cpp logs on the current thread while it is
/// open. llama.cpp calls the callback synchronously on the thread that made the call, so a thread-static buffer
/// attributes each message to the call that caused it without a global lock, even with several engines loading
/// adapters at once. Messages outside a scope are dropped (every native call of the engine runs inside one).
/// </summary>
internal static class LlamaNativeLog
{
    [ThreadStatic] private static Scope? t_current;

    private static readonly Lazy<NativeLogConfig.LLamaLogCallback> Installed = new(Install, LazyThreadSafetyMode.ExecutionAndPublication);

    public static Scope Begin(ILogger logger)
    {
        _ = Installed.Value;
        var scope = new Scope(logger, t_current);
        t_current = scope;
        return scope;
    }

    private static NativeLogConfig.LLamaLogCallback Install()
    {
        LlamaLibraryResolver.EnsureRegistered();
        NativeLogConfig.LLamaLogCallback callback = OnLog;
        // LLamaSharp keeps the delegate alive (GCHandle) once the library is loaded, which EnsureRegistered made sure of.
        NativeLogConfig.llama_log_set(callback);
        return callback;
    }

    private static void OnLog(LLamaLogLevel level, string message)
    {
        // An exception escaping into native code aborts the process (a throwing logger included): never let one out.
        try
        {
            t_current?.Append(level, message);
        }
        catch (Exception)
        {
        }
    }

    /// <summary>What llama.cpp logged on this thread; disposing logs it to the engine's logger and ends the scope.</summary>
    public sealed class Scope : IDisposable
    {
        private readonly ILogger _logger;
        private readonly Scope? _outer;
        private readonly StringBuilder _pending = new();
        private LLamaLogLevel _pendingLevel = LLamaLogLevel.Info;
        private readonly List<(LLamaLogLevel Level, string Line)> _lines = [];

        internal Scope(ILogger logger, Scope? outer) => (_logger, _outer) = (logger, outer);

        /// <summary>The error lines, or warnings when there are none (llama.cpp logs some refusals as warnings).</summary>
        public IReadOnlyList<string> Problems()
        {
            Flush();
            var errors = _lines.Where(l => l.Level == LLamaLogLevel.Error).Select(l => l.Line).ToList();
            return errors.Count > 0 ? errors : _lines.Where(l => l.Level == LLamaLogLevel.Warning).Select(l => l.Line).ToList();
        }

        internal void Append(LLamaLogLevel level, string message)
        {
            // Fragments without a newline continue the current line (GGML_LOG_LEVEL_CONT or a split printf).
            if (level != LLamaLogLevel.Continue && _pending.Length == 0)
            {
                _pendingLevel = level;
            }
            _pending.Append(message);
            if (message.EndsWith('\n'))
            {
                Flush();
            }
        }

        private void Flush()
        {
            if (_pending.Length == 0)
            {
                return;
            }
            var line = _pending.ToString().TrimEnd();
            _pending.Clear();
            if (line.Length == 0)
            {
                return;
            }
            _lines.Add((_pendingLevel, line));
            var logLevel = _pendingLevel switch
            {
                LLamaLogLevel.Error => LogLevel.Error,
                LLamaLogLevel.Warning => LogLevel.Warning,
                LLamaLogLevel.Info => LogLevel.Debug,
                _ => LogLevel.Trace,
            };
            _logger.Log(logLevel, "llama.cpp: {Line}", line);
        }

        public void Dispose()
        {
            Flush();
            if (ReferenceEquals(t_current, this))
            {
                t_current = _outer;
            }
        }
    }
}
