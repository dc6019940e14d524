using System.Collections.Concurrent;
using System.Security.Cryptography;
using System.Text.Json;
using LoraDeploy.BaseModels;
using LoraDeploy.Data;
using LoraDeploy.Lora.Gguf;
using LoraDeploy.Lora.Peft;
using LoraDeploy.Sources;
using LoraDeploy.Storage;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Pipeline;

/// <summary>
/// Hugging Face tokens of imports in flight, in this process's memory only: a token is used for its own import and
/// never written anywhere. An import a replica adopts after a crash has no token; a private repo then fails with a
/// sentence saying to create the deploy again.
/// </summary>
public sealed class HuggingFaceTokens
{
    private readonly ConcurrentDictionary<string, string> _tokens = new(StringComparer.Ordinal);

    public void Set(string deployId, string token) => _tokens[deployId] = token;

    public string? Get(string deployId) => _tokens.GetValueOrDefault(deployId);

    public void Forget(string deployId) => _tokens.TryRemove(deployId, out _);
}

public sealed partial class ImportPipeline
{
    /// <summary>Bumped with the converter; part of every derived adapter's key.</summary>
    private static string DerivedKey(string weightsSha, string configSha) => $"peft-gguf:v{PeftLoraConverter.ConverterVersion}:{weightsSha}:{configSha}";

    /// <summary>The lease owner name of this replica's pipeline, for jobs it claims at birth (see <see cref="Adopt"/>).</summary>
    public string Owner => _owner;

    /// <summary>
    /// Starts a job this replica claimed when it was created (its row already names this replica as lease owner), so the
    /// import runs where its in-memory token is. If this process dies, the lease lapses and any replica carries on.
    /// </summary>
    public void Adopt(string deployId)
    {
        if (Options.Enabled)
        {
            _resolutions.TryStart(deployId, () => RunResolutionAsync(deployId, _stopping), signal.Wake);
        }
        // else a replica without a pipeline leaves the job to the others once its lease lapses
    }

    /// <summary>
    /// A PEFT adapter from the Hub: resolve the repo at one commit, read adapter_config.json, fetch the weights (verified
    /// against the LFS SHA-256), check both against the base model's GGUF and convert them to a llama.cpp LoRA GGUF,
    /// stored as a blob derived from (weights, config, converter version), so the same adapter converts once.
    /// </summary>
    private async Task ImportHuggingFaceAsync(string deployId, Data.Lora lora, LoraDeployDbContext db, IServiceProvider services, CancellationToken ct)
    {
        var token = hfTokens.Get(deployId);
        try
        {
            var pool = baseModels.Find(lora.BaseModel);
            if (pool?.Engine != Engines.LlamaCpp || string.IsNullOrWhiteSpace(pool.Gguf))
            {
                await FailAsync(deployId, PipelineReasonClass.NotApplicable,
                    $"Base model {lora.BaseModel} is not a llamacpp pool on this server (BaseModels:{lora.BaseModel}:Engine=llamacpp and :Gguf), so a PEFT adapter cannot be served on it.", ct);
                return;
            }
            var hub = services.GetRequiredService<HuggingFaceClient>();
            var hubOptions = services.GetRequiredService<Microsoft.Extensions.Options.IOptions<HuggingFaceOptions>>().Value;
            if (!HuggingFaceRepoRef.TryParse(lora.SourceUrl, hubOptions.GetBaseUri(), out var repo, out var parseError))
            {
                await FailAsync(deployId, ReasonClass.InvalidUrl, $"The Hugging Face repo cannot be read: {parseError}", ct);
                return;
            }
            var resolved = await hub.ResolveAsync(repo, token, ct);
            if (!resolved.Succeeded)
            {
                var failReason = token is null && resolved.ReasonClass == ReasonClass.AuthRequired
                    ? resolved.FailReason + " (Tokens are kept only in the memory of the server that received them; if this deploy was created with hf_token, the server restarted meanwhile: create it again.)"
                    : resolved.FailReason;
                await FailAsync(deployId, resolved.ReasonClass, failReason, ct);
                return;
            }
            var adapter = resolved.Adapter;
            var config = await hub.FetchConfigAsync(adapter, token, ct);
            if (!config.Succeeded)
            {
                await FailAsync(deployId, config.ReasonClass, config.FailReason, ct);
                return;
            }
            PeftAdapterConfig peft;
            try
            {
                peft = PeftAdapterConfig.Parse(config.Bytes);
            }
            catch (PeftAdapterException e)
            {
                await FailAsync(deployId, PipelineReasonClass.NotAdapter, $"{adapter.RepoId}'s adapter_config.json cannot be used: {e.Message}", ct);
                return;
            }
            var configSha = Convert.ToHexStringLower(SHA256.HashData(config.Bytes));
            var now = Now;
            await db.Deploys.Where(d => d.Id == deployId && d.Status == DeployStatus.Downloading).ExecuteUpdateAsync(set => set
                .SetProperty(d => d.Version, adapter.Commit)
                .SetProperty(d => d.UpdatedAt, now), ct);

            var weightsSha = adapter.Weights.Sha256 is { } listed && blobs.Exists(listed) && await db.Blobs.AnyAsync(b => b.Sha256 == listed, ct)
                ? listed
                : await FetchWeightsAsync(deployId, adapter, token, services, ct);
            if (weightsSha is null)
            {
                return; // failed, with its reason
            }

            var key = DerivedKey(weightsSha, configSha);
            var derived = await db.Adapters.Where(a => a.DerivedKey == key).Select(a => a.Sha256).FirstOrDefaultAsync(ct);
            if (derived is null || !blobs.Exists(derived))
            {
                derived = await ConvertAsync(deployId, pool, peft, weightsSha, key, adapter, ct);
                if (derived is null)
                {
                    return;
                }
            }
            else
            {
                metrics.DedupHit("converted");
            }

            // The converted file's size is known only now. It counts against the stored-bytes quota first as an import
            // in flight (expected hash and size), like a CivitAI file, so a refused one leaves the failed LoRA holding
            // no bytes; it becomes the LoRA's adapter once it fits.
            lora.ExpectedSha256 = derived;
            lora.SizeBytes = await db.Blobs.Where(b => b.Sha256 == derived).Select(b => (long?)b.SizeBytes).FirstOrDefaultAsync(ct);
            lora.UpdatedAt = Now;
            if (await SaveWithinStoredBytesQuotaAsync(db, lora, deployId, ct))
            {
                return;
            }
            lora.AdapterSha256 = derived;
            lora.ExpectedSha256 = null;
            lora.WarningsJson = "[]";
            lora.UpdatedAt = Now;
            await db.SaveChangesAsync(ct);
            await AdvanceToDeployingAsync(db, deployId, adapter.Commit, ct);
        }
        finally
        {
            hfTokens.Forget(deployId);
        }
    }

    /// <summary>What fetching one adapter's weights came to: the stored blob, or why there is none.</summary>
    private sealed record WeightsFetch(string? Sha256, string FailClass, string FailReason);

    /// <summary>Fetches of weights in flight in this process, by LFS SHA-256 (or file at commit): one download however many deploys ask.</summary>
    private readonly ConcurrentDictionary<string, Lazy<Task<WeightsFetch>>> _weightFetches = new(StringComparer.Ordinal);

    /// <summary>
    /// The weights as a stored blob, fetched once per file however many imports of it run here at the same moment (the
    /// first one's token fetches them); null, with this deploy failed, when that fails. The fetch runs on the pipeline's
    /// own lifetime, so one deploy being deleted does not cancel it for the others.
    /// </summary>
    private async Task<string?> FetchWeightsAsync(string deployId, ResolvedHuggingFaceAdapter adapter, string? token, IServiceProvider services, CancellationToken ct)
    {
        var key = adapter.Weights.Sha256 ?? $"{adapter.RepoId}@{adapter.Commit}/{adapter.Weights.Path}";
        var downloader = services.GetRequiredService<HuggingFaceDownloader>();
        var fetch = _weightFetches.GetOrAdd(key, k => new Lazy<Task<WeightsFetch>>(() => Task.Run(async () =>
        {
            try
            {
                return await DownloadWeightsAsync(downloader, adapter, token, k);
            }
            finally
            {
                _weightFetches.TryRemove(k, out _);
            }
        })));
        var result = await fetch.Value.WaitAsync(ct);
        if (result.Sha256 is null)
        {
            await FailAsync(deployId, result.FailClass, result.FailReason, ct);
        }
        return result.Sha256;
    }

    private async Task<WeightsFetch> DownloadWeightsAsync(HuggingFaceDownloader downloader, ResolvedHuggingFaceAdapter adapter, string? token, string key)
    {
        var staging = $"hf-{Convert.ToHexStringLower(SHA256.HashData(System.Text.Encoding.UTF8.GetBytes(key)))[..32]}.part";
        DownloadResult result;
        try
        {
            result = await downloader.DownloadAsync(adapter.Weights, token, blobs, staging, new Progress<long>(metrics.BytesDownloaded), _stopping);
        }
        catch (DownloadFailedException e)
        {
            return new WeightsFetch(null, e.ReasonClass, e.FailReason);
        }
        if (adapter.Weights.Sha256 is { } expected && expected != result.Sha256)
        {
            blobs.DeleteStaging(staging);
            return new WeightsFetch(null, PipelineReasonClass.HashMismatch,
                $"{adapter.RepoId}'s adapter_model.safetensors has SHA-256 {result.Sha256}, but the Hub lists {expected}; nothing was stored.");
        }
        if (await blobs.CommitStagingAsync(staging, result.Sha256, _stopping) == BlobPutResult.HashMismatch)
        {
            return new WeightsFetch(null, PipelineReasonClass.HashMismatch, "The downloaded weights changed on disk before they were stored; create the deploy again.");
        }
        await RecordBlobAsync(result.Sha256, result.Bytes, _stopping);
        return new WeightsFetch(result.Sha256, "", "");
    }

    /// <summary>Checks the PEFT adapter against the pool's base GGUF and writes the llama.cpp LoRA GGUF as a blob.</summary>
    private async Task<string?> ConvertAsync(string deployId, BaseModelEntry pool, PeftAdapterConfig peft, string weightsSha, string key,
        ResolvedHuggingFaceAdapter adapter, CancellationToken ct)
    {
        LlamaCppBaseModel baseModel;
        try
        {
            baseModel = LlamaCppBaseModel.ReadFile(pool.Gguf!);
        }
        catch (Exception e) when (e is GgufFormatException or IOException or UnauthorizedAccessException)
        {
            await FailAsync(deployId, PipelineReasonClass.Internal,
                $"The base model file of {pool.Name} (BaseModels:{pool.Name}:Gguf = {pool.Gguf}) cannot be read on this server ({e.Message}); the adapter is checked against it before serving.", ct);
            return null;
        }
        var staging = $"convert-{deployId}.part";
        blobs.DeleteStaging(staging);
        PeftConversionReport report;
        string sha;
        long size;
        try
        {
            await using var weights = await blobs.OpenReadAsync(weightsSha, ct: ct) ?? throw new IOException("the stored weights vanished");
            await using (var output = blobs.OpenStaging(staging))
            {
                report = PeftLoraConverter.Convert(peft, weights, baseModel, output);
                await output.FlushAsync(ct);
                size = output.Length;
                output.Position = 0;
                sha = Convert.ToHexStringLower(await SHA256.HashDataAsync(output, ct));
            }
        }
        catch (PeftAdapterException e)
        {
            blobs.DeleteStaging(staging);
            var reason = $"{adapter.RepoId} does not fit {pool.Name}: {e.Message}";
            await FailAsync(deployId, PipelineReasonClass.ArchitectureMismatch, reason.Length <= 2000 ? reason : reason[..2000], ct);
            return null;
        }
        if (await blobs.CommitStagingAsync(staging, sha, ct) == BlobPutResult.HashMismatch)
        {
            await FailAsync(deployId, PipelineReasonClass.Internal, "The converted adapter changed on disk before it was stored; create the deploy again.", ct);
            return null;
        }
        await RecordBlobAsync(sha, size, ct);
        await using var db = await contexts.CreateDbContextAsync(ct);
        db.Adapters.Add(new Adapter
        {
            Sha256 = sha,
            SizeBytes = size,
            Format = "llamacpp-gguf",
            Network = "lora",
            Architecture = report.Architecture,
            RankMin = report.Ranks.Count > 0 ? report.Ranks.Min() : null,
            RankMax = report.Ranks.Count > 0 ? report.Ranks.Max() : null,
            ProbeJson = JsonSerializer.Serialize(report, PeftReportJsonContext.Default.PeftConversionReport),
            SourceType = "huggingface",
            SourceRef = $"huggingface:{adapter.RepoId}@{adapter.Commit}",
            DerivedKey = key,
            CreatedAt = Now,
        });
        try
        {
            await db.SaveChangesAsync(ct);
        }
        catch (DbUpdateException e) when (db.IsUniqueViolation(e))
        {
            // The same conversion recorded by a concurrent import: same bytes, same row.
        }
        LogConverted(deployId, adapter.RepoId, report.TensorCount, sha);
        return sha;
    }

    private async Task RecordBlobAsync(string sha, long size, CancellationToken ct)
    {
        await using var db = await contexts.CreateDbContextAsync(ct);
        db.Blobs.Add(new Blob { Sha256 = sha, SizeBytes = size, CreatedAt = Now });
        try
        {
            await db.SaveChangesAsync(ct);
        }
        catch (DbUpdateException e) when (db.IsUniqueViolation(e))
        {
        }
    }

    [LoggerMessage(Level = LogLevel.Information, Message = "Deploy {DeployId}: converted {RepoId} to a llama.cpp LoRA ({Tensors} tensors, blob {Sha256})")]
    private partial void LogConverted(string deployId, string repoId, int tensors, string sha256);
}

[System.Text.Json.Serialization.JsonSourceGenerationOptions(PropertyNamingPolicy = System.Text.Json.Serialization.JsonKnownNamingPolicy.SnakeCaseLower)]
[System.Text.Json.Serialization.JsonSerializable(typeof(PeftConversionReport))]
internal sealed partial class PeftReportJsonContext : System.Text.Json.Serialization.JsonSerializerContext;
