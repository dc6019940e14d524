using System.Reflection;
using System.Runtime.InteropServices;
using LLama.Native;

namespace LoraDeploy.Serving.LlamaCpp;

/// <summary>
/// Our own bindings for the llama.cpp calls LLamaSharp 0.30 wraps unsafely: its <c>LoadLoraFromFile</c> never checks
/// for a null adapter and its <c>SetLoraAdapters</c> discards the result, so a bad adapter file becomes a SIGSEGV on
/// the next decode (reference/serving.md A1.3). Here a null adapter is a value the caller must handle.
/// </summary>
internal static partial class LlamaNative
{
    private const string Library = "llama";

    static LlamaNative() => LlamaLibraryResolver.EnsureRegistered();

    /// <summary>Returns <see cref="IntPtr.Zero"/> when llama.cpp refuses the file; the reason goes to the log callback.</summary>
    [LibraryImport(Library, StringMarshalling = StringMarshalling.Utf8)]
    internal static partial IntPtr llama_adapter_lora_init(SafeLlamaModelHandle model, string path);

    [LibraryImport(Library)]
    internal static partial void llama_adapter_lora_free(IntPtr adapter);

    /// <summary>Replaces the context's whole adapter set (n = 0 clears it); non-zero means it was not applied.</summary>
    [LibraryImport(Library)]
    internal static unsafe partial int llama_set_adapters_lora(SafeLLamaContextHandle context, IntPtr* adapters, nuint count, float* scales);

    [LibraryImport(Library)]
    internal static partial IntPtr llama_get_memory(SafeLLamaContextHandle context);

    /// <summary>Removes positions [p0, p1) of a sequence (p1 &lt; 0 = to the end); false when the memory cannot do a partial removal.</summary>
    [LibraryImport(Library)]
    [return: MarshalAs(UnmanagedType.U1)]
    internal static partial bool llama_memory_seq_rm(IntPtr memory, int sequence, int p0, int p1);
}

/// <summary>
/// Resolves our "llama" imports to the libllama LLamaSharp already loaded. LLamaSharp picks a CPU-feature variant from
/// its runtimes folder, which is not on the default search path; the library's SONAME is <c>libllama.so</c>, so once
/// LLamaSharp has loaded it, <c>dlopen("libllama.so")</c> can only return that same copy (verified on Linux; the
/// Windows/macOS names follow the same rule but were not run).
/// </summary>
internal static class LlamaLibraryResolver
{
    // An assembly may have only one resolver (a second SetDllImportResolver throws), and this assembly also imports
    // libc (Storage/BlobStore.cs): every other name gets IntPtr.Zero so default probing continues. Registering is a
    // process-wide act by nature, so the once-guard is a static Lazy (thread-safe, runs Register exactly once).
    private static readonly Lazy<bool> Registration = new(Register, LazyThreadSafetyMode.ExecutionAndPublication);

    public static void EnsureRegistered() => _ = Registration.Value;

    private static bool Register()
    {
        // Make LLamaSharp load (and choose) its native library before our first import binds.
        NativeApi.llama_empty_call();
        NativeLibrary.SetDllImportResolver(typeof(LlamaLibraryResolver).Assembly, Resolve);
        return true;
    }

    internal static IntPtr Resolve(string name, Assembly assembly, DllImportSearchPath? searchPath)
    {
        if (name != "llama")
        {
            return IntPtr.Zero;
        }
        var file = OperatingSystem.IsWindows() ? "llama.dll" : OperatingSystem.IsMacOS() ? "libllama.dylib" : "libllama.so";
        return NativeLibrary.TryLoad(file, out var handle)
            ? handle
            : throw new DllNotFoundException($"llama.cpp's library '{file}' is not loaded; LLamaSharp's backend package must load it first");
    }
}
