using System.Collections.Concurrent;
using Microsoft.AspNetCore.Http;

namespace LoraDeploy.Tests.Simulator;

/// <summary>Behaviours the import pipeline's tests need: re-listed files, files without hashes, a trickling API.</summary>
public sealed partial class CivitaiSimulator
{
    private readonly ConcurrentDictionary<int, bool> _hashesOmitted = new();
    private readonly ConcurrentDictionary<int, bool> _trickledModels = new();
    private int _trickleAborts;

    /// <summary>CivitAI replaces the file's bytes under the same file id; the listed hash and size follow the new bytes.</summary>
    public void Relist(SimFile file, byte[] content)
    {
        lock (Gate)
        {
            file.Content = content;
            file.ListedSha256 = null;
            file.ListedSizeKB = null;
        }
    }

    /// <summary>The API lists no hashes for this file (CivitAI does so for some older uploads).</summary>
    public void OmitHashes(SimFile file) => _hashesOmitted[file.Id] = true;

    /// <summary>
    /// The JSON of this model and its versions arrives one whitespace byte at a time, forever (a hostile or broken
    /// upstream): only the client's own limits or a cancellation end the request.
    /// </summary>
    public void TrickleJson(SimModel model) => _trickledModels[model.Id] = true;

    /// <summary>How many trickling answers ended because the client went away.</summary>
    public int TrickleAborts => Volatile.Read(ref _trickleAborts);

    private bool HashesOmitted(SimFile file) => _hashesOmitted.ContainsKey(file.Id);

    /// <summary>Hook for the API dispatch: the trickling answer when this request is for a trickled model, else null.</summary>
    private Task? TrickleFor(HttpContext ctx, string[] segments)
    {
        int? modelId = segments switch
        {
            ["api", "v1", "models", var id] when int.TryParse(id, out var m) => m,
            ["api", "v1", "model-versions", var id] when int.TryParse(id, out var v) => FindVersion(v)?.Model.Id,
            _ => null,
        };
        return modelId is { } mid && _trickledModels.ContainsKey(mid) ? TrickleAsync(ctx) : null;
    }

    private async Task TrickleAsync(HttpContext ctx)
    {
        try
        {
            await TrickleJsonAsync(ctx, TimeSpan.FromMilliseconds(200));
            Interlocked.Increment(ref _trickleAborts); // the trickle ends only when the client has gone
        }
        catch (OperationCanceledException) when (ctx.RequestAborted.IsCancellationRequested)
        {
            Interlocked.Increment(ref _trickleAborts);
        }
        catch (IOException)
        {
            Interlocked.Increment(ref _trickleAborts);
        }
    }
}
