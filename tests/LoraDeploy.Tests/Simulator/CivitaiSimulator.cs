using System.Collections.Concurrent;
using System.Globalization;
using System.Net;
using System.Text;
using System.Text.Json;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.Logging;

namespace LoraDeploy.Tests.Simulator;

public sealed class CivitaiSimulatorOptions
{
    /// <summary>Loopback address the API host listens on (its URL uses the address literally).</summary>
    public IPAddress ApiAddress { get; init; } = IPAddress.Loopback;
    /// <summary>Clock for signed-link expiry (use a FakeTimeProvider to expire links on demand).</summary>
    public TimeProvider TimeProvider { get; init; } = TimeProvider.System;
    /// <summary>The API key the simulator accepts.</summary>
    public string ValidToken { get; init; } = "sim-civitai-token";
    public TimeSpan SignedLinkLifetime { get; init; } = TimeSpan.FromHours(24);
}

/// <summary>One request the simulator saw.</summary>
public sealed record SimRequest(string Host, string Method, string PathAndQuery, int Status, bool HadAuthorization, string? Range, string? UserAgent);

public sealed record SimRangeRequest(int FileId, long Offset);

/// <summary>
/// A loopback imitation of CivitAI (API host) plus its signed storage (a second host named <c>localhost</c>),
/// built from the shapes in shared/reference/civitai-api.md. Real Kestrel, real sockets.
/// <code>
/// await using var sim = await CivitaiSimulator.StartAsync();
/// var v = sim.AddLora(SimContent.Safetensors(), baseModel: "SDXL 1.0");
/// // point Civitai:BaseUrl at sim.ApiBaseUrl and allow 127.0.0.1/32 in Network:AllowedPrivateRanges
/// </code>
/// </summary>
public sealed partial class CivitaiSimulator : IAsyncDisposable
{
    private static readonly JsonSerializerOptions Json = new() { PropertyNamingPolicy = null };

    private readonly WebApplication _app;
    private readonly CivitaiSimulatorOptions _options;
    private readonly List<SimModel> _models = [];
    private readonly ConcurrentDictionary<string, SignedLink> _links = new();
    private readonly ConcurrentDictionary<int, int> _downloadsStarted = new();
    private readonly ConcurrentDictionary<int, int> _downloadEndpointHits = new();
    private readonly ConcurrentQueue<SimRangeRequest> _ranges = new();
    private readonly ConcurrentQueue<SimRequest> _requests = new();
    private int _apiConnections, _storageConnections;
    private int _nextModel = 1000, _nextVersion = 20000, _nextFile = 300000;
    private int _apiPort, _storagePort;

    internal object Gate { get; } = new();

    private sealed record SignedLink(int FileId, DateTimeOffset Expires)
    {
        public int Uses;
    }

    private CivitaiSimulator(WebApplication app, CivitaiSimulatorOptions options)
    {
        _app = app;
        _options = options;
    }

    /// <summary>e.g. <c>http://127.0.0.1:41234</c> — set Civitai:BaseUrl to this.</summary>
    public string ApiBaseUrl => $"http://{FormatHost(_options.ApiAddress)}:{_apiPort}";
    /// <summary>e.g. <c>http://localhost:41235</c> — a different host name, so the token rule is observable.</summary>
    public string StorageBaseUrl => $"http://localhost:{_storagePort}";
    public string ValidToken => _options.ValidToken;

    /// <summary>Range a test should allow in Network:AllowedPrivateRanges to reach both hosts.</summary>
    public string AllowedRange => "127.0.0.0/8";

    /// <summary>The JSON endpoints (<c>/api/v1/…</c>) answer 503 this many times first (with <see cref="ApiRetryAfterSeconds"/>).</summary>
    public int Api503Times { get; set; }
    /// <summary>The JSON endpoints answer 429 this many times first.</summary>
    public int Api429Times { get; set; }
    public int? ApiRetryAfterSeconds { get; set; }

    /// <summary>
    /// Settings that point LoraDeploy at this simulator (Civitai:BaseUrl, the token if wanted, and loopback allowed),
    /// ready for <c>AddInMemoryCollection</c> or <c>--Section:Key=value</c> arguments.
    /// </summary>
    public Dictionary<string, string?> Configuration(bool withToken = false) => new()
    {
        ["Civitai:BaseUrl"] = ApiBaseUrl,
        ["Civitai:Token"] = withToken ? ValidToken : null,
        ["Network:AllowedPrivateRanges:0"] = AllowedRange,
    };

    public static async Task<CivitaiSimulator> StartAsync(CivitaiSimulatorOptions? options = null, CancellationToken cancellationToken = default)
    {
        options ??= new CivitaiSimulatorOptions();
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        CivitaiSimulator? sim = null;
        ListenOptions? api = null, storage = null;
        builder.WebHost.ConfigureKestrel(k =>
        {
            k.Listen(options.ApiAddress, 0, lo =>
            {
                api = lo;
                lo.Use(next => ctx =>
                {
                    Interlocked.Increment(ref sim!._apiConnections);
                    ctx.Transport = sim.CountApiBytes(ctx.Transport);
                    return next(ctx);
                });
            });
            k.Listen(IPAddress.Loopback, 0, lo =>
            {
                storage = lo;
                lo.Use(next => ctx => { Interlocked.Increment(ref sim!._storageConnections); return next(ctx); });
            });
        });
        var app = builder.Build();
        sim = new CivitaiSimulator(app, options);
        app.Run(sim.HandleAsync);
        await app.StartAsync(cancellationToken);
        sim._apiPort = api!.IPEndPoint!.Port;
        sim._storagePort = storage!.IPEndPoint!.Port;
        return sim;
    }

    public async ValueTask DisposeAsync()
    {
        await _app.StopAsync();
        await _app.DisposeAsync();
    }

    // ---- registration ----------------------------------------------------------------------

    internal int NextVersionId() => Interlocked.Increment(ref _nextVersion);
    internal int NextFileId() => Interlocked.Increment(ref _nextFile);

    /// <param name="id">A fixed model id (e.g. to match a documented URL); by default the next free one.</param>
    public SimModel AddModel(string name = "Test LoRA", string type = "LORA", int? id = null)
    {
        var m = new SimModel(this, id ?? Interlocked.Increment(ref _nextModel), name, type);
        lock (Gate)
        {
            _models.Add(m);
        }
        return m;
    }

    /// <summary>A model with one version whose primary file holds <paramref name="content"/>.</summary>
    public SimVersion AddLora(byte[] content, string baseModel = "SDXL 1.0", string? fileName = null,
        IEnumerable<string>? trainedWords = null, string modelType = "LORA", string modelName = "Test LoRA")
    {
        var v = AddModel(modelName, modelType).AddVersion(baseModel, trainedWords: trainedWords);
        v.AddFile(content, fileName ?? $"{modelName.Replace(' ', '_').ToLowerInvariant()}.safetensors", primary: true);
        return v;
    }

    // ---- counters ---------------------------------------------------------------------------

    public int ApiConnections => Volatile.Read(ref _apiConnections);
    public int StorageConnections => Volatile.Read(ref _storageConnections);
    public int Connections => ApiConnections + StorageConnections;
    /// <summary>Storage GETs that started sending the file's bytes (or a fault in their place).</summary>
    public int DownloadsStarted(int fileId) => _downloadsStarted.GetValueOrDefault(fileId);
    /// <summary>Hits on <c>/api/download/models/…</c> that selected this file.</summary>
    public int DownloadEndpointHits(int fileId) => _downloadEndpointHits.GetValueOrDefault(fileId);
    public IReadOnlyList<SimRangeRequest> RangeRequests => _ranges.ToArray();
    public IReadOnlyList<SimRequest> Requests => _requests.ToArray();
    public int ApiRequestsWithAuthorization => _requests.Count(r => r.Host == "api" && r.HadAuthorization);
    public int StorageRequestsWithAuthorization => _requests.Count(r => r.Host == "storage" && r.HadAuthorization);

    // ---- dispatch ---------------------------------------------------------------------------

    private async Task HandleAsync(HttpContext ctx)
    {
        var isStorage = ctx.Connection.LocalPort == _storagePort;
        try
        {
            if (isStorage)
            {
                await HandleStorageAsync(ctx);
            }
            else if (!await HostileApiAsync(ctx))
            {
                await HandleApiAsync(ctx);
            }
        }
        finally
        {
            var query = string.Join('&', ctx.Request.Query.Where(q => q.Key != "token").Select(q => $"{q.Key}={q.Value}"));
            _requests.Enqueue(new SimRequest(
                isStorage ? "storage" : "api",
                ctx.Request.Method,
                ctx.Request.Path + (query.Length > 0 ? "?" + query : ""),
                ctx.Response.StatusCode,
                ctx.Request.Headers.Authorization.Count > 0,
                ctx.Request.Headers.Range.ToString() is { Length: > 0 } r ? r : null,
                ctx.Request.Headers.UserAgent.ToString()));
        }
    }

    private Task HandleApiAsync(HttpContext ctx)
    {
        var segments = ctx.Request.Path.Value!.Split('/', StringSplitOptions.RemoveEmptyEntries);
        if (TrickleFor(ctx, segments) is { } trickle)
        {
            return trickle;
        }
        if (segments is ["api", "v1", ..])
        {
            var fault = TakeApiFault(429) ? 429 : TakeApiFault(503) ? 503 : 0;
            if (fault != 0)
            {
                if (ApiRetryAfterSeconds is { } ra)
                {
                    ctx.Response.Headers.RetryAfter = ra.ToString(CultureInfo.InvariantCulture);
                }
                return JsonAsync(ctx, fault, new Dictionary<string, object?> { ["error"] = fault == 429 ? "Too many requests" : "Service unavailable" });
            }
        }
        return segments switch
        {
            ["api", "v1", "models", var id] => ModelAsync(ctx, id),
            ["api", "v1", "model-versions", "by-hash", var hash] => VersionByHashAsync(ctx, hash),
            ["api", "v1", "model-versions", var id] => VersionAsync(ctx, id),
            ["api", "download", "models", var id] => DownloadAsync(ctx, id),
            _ => JsonAsync(ctx, 404, new Dictionary<string, object?> { ["error"] = "Not found" }),
        };
    }

    private Task ModelAsync(HttpContext ctx, string rawId)
    {
        if (!int.TryParse(rawId, NumberStyles.None, CultureInfo.InvariantCulture, out var id) || id <= 0)
        {
            return JsonAsync(ctx, 400, new Dictionary<string, object?> { ["error"] = $"Invalid id: {rawId}" });
        }
        SimModel? m;
        lock (Gate)
        {
            m = _models.FirstOrDefault(x => x.Id == id);
        }
        if (m is null)
        {
            return JsonAsync(ctx, 404, new Dictionary<string, object?> { ["error"] = $"No model with id {id}" });
        }

        var nsfwLevel = m.NsfwLevel ?? m.Versions.Aggregate(0, (level, v) => level | v.NsfwLevel);
        var versions = new List<object>();
        var index = 0;
        foreach (var v in m.Versions.Where(v => v.Status == "Published" && v.NsfwLevel != 0))
        {
            // /models drops null values, empty arrays and false `primary` (reference §2.3).
            var o = new Dictionary<string, object?>
            {
                ["id"] = v.Id,
                ["index"] = index++,
                ["name"] = v.Name,
                ["baseModel"] = v.BaseModel,
                ["baseModelType"] = "Standard",
                ["createdAt"] = Iso(v.PublishedAt),
                ["publishedAt"] = Iso(v.PublishedAt),
                ["status"] = v.Status,
                ["availability"] = v.Availability,
                ["nsfwLevel"] = v.NsfwLevel,
                ["stats"] = new Dictionary<string, object?> { ["downloadCount"] = 1, ["thumbsUpCount"] = 1, ["thumbsDownCount"] = 0 },
                ["downloadUrl"] = $"https://civitai.com/api/download/models/{v.Id}",
            };
            if (v.TrainedWords.Count > 0)
            {
                o["trainedWords"] = v.TrainedWords;
            }
            if (v.EarlyAccessEndsAt is { } ea)
            {
                o["earlyAccessDeadline"] = Iso(ea);
            }
            if (m.Mode != "Archived" && v.Files.Count > 0)
            {
                o["files"] = v.Files.Select(f => FileJson(f, "https://civitai.com", omitFalsePrimary: true)).ToList();
            }
            versions.Add(o);
        }

        var body = new Dictionary<string, object?>
        {
            ["id"] = m.Id,
            ["name"] = m.Name,
            ["description"] = "<p>simulated</p>",
            ["type"] = m.Type,
            ["nsfw"] = nsfwLevel > 2,
            ["nsfwLevel"] = nsfwLevel,
            ["poi"] = false,
            ["minor"] = false,
            ["availability"] = "Public",
            ["allowNoCredit"] = m.AllowNoCredit,
            ["allowDerivatives"] = m.AllowDerivatives,
            ["allowDifferentLicense"] = m.AllowDifferentLicense,
            ["tags"] = new[] { "style" },
            ["modelVersions"] = versions,
        };
        if (m.AllowCommercialUse is not null)
        {
            body["allowCommercialUse"] = m.AllowCommercialUse;
        }
        if (m.Creator is not null)
        {
            body["creator"] = new Dictionary<string, object?> { ["username"] = m.Creator };
        }
        if (m.Mode is not null)
        {
            body["mode"] = m.Mode;
        }
        return JsonAsync(ctx, 200, body);
    }

    /// <summary>
    /// By-hash (reference §2.2): any listed hash (AutoV2 or SHA256 here) of any file of a published version, case-insensitive;
    /// duplicates answer the oldest version (publishedAt, then id); the body is the version body.
    /// </summary>
    private Task VersionByHashAsync(HttpContext ctx, string rawHash)
    {
        var hash = rawHash.ToUpperInvariant();
        SimVersion? found;
        lock (Gate)
        {
            found = _models
                .Where(m => m.Mode != "TakenDown")
                .SelectMany(m => m.Versions)
                .Where(v => v.Status == "Published" && v.NsfwLevel != 0)
                .Where(v => v.Files.Any(f => !HashesOmitted(f) && ((f.ListedSha256 ?? f.Sha256).ToUpperInvariant() is var sha && (sha == hash || sha[..10] == hash))))
                .OrderBy(v => v.PublishedAt).ThenBy(v => v.Id)
                .FirstOrDefault();
        }
        ctx.Response.Headers.CacheControl = "public, s-maxage=3600";
        return found is null
            ? JsonAsync(ctx, 404, new Dictionary<string, object?> { ["error"] = "Model not found" })
            : VersionBodyAsync(ctx, found);
    }

    private Task VersionAsync(HttpContext ctx, string rawId)
    {
        if (!int.TryParse(rawId, NumberStyles.None, CultureInfo.InvariantCulture, out var id) || id <= 0)
        {
            return JsonAsync(ctx, 400, new Dictionary<string, object?> { ["error"] = $"Invalid id: {rawId}" });
        }
        var v = FindVersion(id);
        if (v is null || v.Status != "Published" || v.NsfwLevel == 0)
        {
            return JsonAsync(ctx, 404, new Dictionary<string, object?> { ["error"] = "Model not found" });
        }
        return VersionBodyAsync(ctx, v);
    }

    private Task VersionBodyAsync(HttpContext ctx, SimVersion v)
    {
        var m = v.Model;
        var hostBase = $"http://{ctx.Request.Host}";
        var model = new Dictionary<string, object?> { ["name"] = m.Name, ["type"] = m.Type, ["nsfw"] = false, ["poi"] = false };
        if (m.Mode is not null)
        {
            model["mode"] = m.Mode;
        }
        var archived = m.Mode == "Archived";
        var body = new Dictionary<string, object?>
        {
            ["id"] = v.Id,
            ["modelId"] = m.Id,
            ["name"] = v.Name,
            ["description"] = null,
            ["baseModel"] = v.BaseModel,
            ["baseModelType"] = "Standard",
            ["air"] = v.Air,
            ["status"] = v.Status,
            ["availability"] = v.Availability,
            ["nsfwLevel"] = v.NsfwLevel,
            ["createdAt"] = Iso(v.PublishedAt),
            ["updatedAt"] = Iso(v.PublishedAt),
            ["publishedAt"] = Iso(v.PublishedAt),
            ["uploadType"] = "Created",
            ["usageControl"] = v.DownloadsDisabled ? "Generation" : "Download",
            ["trainedWords"] = v.TrainedWords,
            ["trainingStatus"] = null,
            ["trainingDetails"] = null,
            ["paidAccess"] = v.EarlyAccessEndsAt is { } ea
                ? new Dictionary<string, object?> { ["permanent"] = false, ["endsAt"] = Iso(ea) }
                : null,
            ["licensingFee"] = null,
            ["stats"] = new Dictionary<string, object?> { ["downloadCount"] = 1, ["thumbsUpCount"] = 1 },
            ["model"] = model,
            ["files"] = archived ? new List<object>() : v.Files.Select(f => FileJson(f, hostBase, omitFalsePrimary: false)).ToList(),
            ["images"] = new List<object>(),
        };
        if (!archived)
        {
            body["downloadUrl"] = $"{hostBase}/api/download/models/{v.Id}";
        }
        return JsonAsync(ctx, 200, body);
    }

    private Dictionary<string, object?> FileJson(SimFile f, string baseUrl, bool omitFalsePrimary)
    {
        var metadata = new Dictionary<string, object?>();
        if (f.Format is not null)
        {
            metadata["format"] = f.Format;
        }
        if (f.Size is not null)
        {
            metadata["size"] = f.Size;
        }
        if (f.Fp is not null)
        {
            metadata["fp"] = f.Fp;
        }
        var sha = (f.ListedSha256 ?? f.Sha256).ToUpperInvariant();
        var o = new Dictionary<string, object?>
        {
            ["id"] = f.Id,
            ["sizeKB"] = f.ListedSizeKB ?? f.Content.Length / 1024.0,
            ["name"] = f.Name,
            ["type"] = f.Type,
            ["pickleScanResult"] = f.PickleScanResult,
            ["pickleScanMessage"] = null,
            ["virusScanResult"] = f.VirusScanResult,
            ["virusScanMessage"] = null,
            ["scannedAt"] = "2026-01-01T00:00:00.000Z",
            ["metadata"] = metadata,
            ["hashes"] = new Dictionary<string, object?> { ["AutoV2"] = sha[..10], ["SHA256"] = sha },
            ["downloadUrl"] = f.Primary
                ? $"{baseUrl}/api/download/models/{f.Version.Id}"
                : $"{baseUrl}/api/download/models/{f.Version.Id}?type={Uri.EscapeDataString(f.Type)}" + (f.Format is null ? "" : $"&format={f.Format}"),
        };
        if (f.Primary || !omitFalsePrimary)
        {
            o["primary"] = f.Primary;
        }
        if (HashesOmitted(f))
        {
            o.Remove("hashes");
        }
        return o;
    }

    /// <summary>The decision order of CivitAI's download endpoint (reference §4.2), for non-browser and browser UAs.</summary>
    private async Task DownloadAsync(HttpContext ctx, string rawId)
    {
        ctx.Response.Headers.CacheControl = "no-store, max-age=0";
        var browser = IsBrowser(ctx.Request.Headers.UserAgent.ToString());
        var authed = IsAuthenticated(ctx);
        var q = ctx.Request.Query;
        if (!int.TryParse(rawId, NumberStyles.None, CultureInfo.InvariantCulture, out var vid)
            || (q.ContainsKey("fileId") && !int.TryParse(q["fileId"], NumberStyles.None, CultureInfo.InvariantCulture, out _)))
        {
            await JsonAsync(ctx, 400, new Dictionary<string, object?> { ["error"] = "Expected number, received nan" });
            return;
        }
        var v = FindVersion(vid);
        var file = v is null ? null : SelectFile(v, q);
        if (file is not null)
        {
            _downloadEndpointHits.AddOrUpdate(file.Id, 1, (_, n) => n + 1);
            if (TakeOne(file.Faults, static f => f.Download429Times, static (f, n) => f.Download429Times = n))
            {
                if (file.Faults.RetryAfterSeconds is { } ra)
                {
                    ctx.Response.Headers.RetryAfter = ra.ToString(CultureInfo.InvariantCulture);
                }
                await ErrorAsync(ctx, browser, 429, "We've noticed an unusual amount of downloading from your account. Contact support@civitai.com or come back later.");
                return;
            }
        }

        if (v is null || v.Status != "Published")
        {
            await ErrorAsync(ctx, browser, 404, "File not found");
            return;
        }
        if (v.Model.Mode == "Archived")
        {
            await ErrorAsync(ctx, browser, 410, "Model archived, not available for download");
            return;
        }
        if (v.DownloadsDisabled)
        {
            await JsonAsync(ctx, 401, new Dictionary<string, object?> { ["error"] = "Unauthorized", ["message"] = "The creator of this asset has disabled downloads on this file" });
            return;
        }
        if (v.RequireAuth && !authed)
        {
            if (browser)
            {
                await RedirectAsync(ctx, $"/login?returnUrl=%2Fmodel-versions%2F{vid}&reason=download-auth");
                return;
            }
            await JsonAsync(ctx, 401, new Dictionary<string, object?> { ["error"] = "Unauthorized", ["message"] = "The creator of this asset requires you to be logged in to download it" });
            return;
        }
        if (v.EarlyAccessEndsAt is { } ends && ends > _options.TimeProvider.GetUtcNow() && !(authed && v.EarlyAccessBought))
        {
            if (browser)
            {
                await RedirectAsync(ctx, $"/model-versions/{vid}");
                return;
            }
            await JsonAsync(ctx, 403, new Dictionary<string, object?>
            {
                ["error"] = "Early Access",
                ["deadline"] = Iso(ends),
                ["message"] = "This asset is in Early Access. You can use Buzz access it now!",
            });
            return;
        }
        if (file is null)
        {
            await ErrorAsync(ctx, browser, 404, "File not found");
            return;
        }
        if (file.Faults.RedirectTo is { } elsewhere)
        {
            await RedirectAsync(ctx, elsewhere.ToString());
            return;
        }

        var sig = Guid.NewGuid().ToString("N");
        var expires = _options.TimeProvider.GetUtcNow() + _options.SignedLinkLifetime;
        _links[sig] = new SignedLink(file.Id, expires);
        var disposition = Uri.EscapeDataString($"attachment; filename=\"{file.Name}\"");
        await RedirectAsync(ctx, $"{StorageBaseUrl}/file/{file.Id}/{Uri.EscapeDataString(file.Name)}?X-Amz-Expires={expires.ToUnixTimeSeconds()}&X-Amz-Signature={sig}&response-content-disposition={disposition}");
    }

    private bool TakeApiFault(int status)
    {
        lock (Gate)
        {
            if (status == 429 ? Api429Times <= 0 : Api503Times <= 0)
            {
                return false;
            }
            if (status == 429)
            {
                Api429Times--;
            }
            else
            {
                Api503Times--;
            }
        }
        return true;
    }

    private static SimFile? SelectFile(SimVersion v, IQueryCollection q)
    {
        if (q.TryGetValue("fileId", out var rawFid))
        {
            var fid = int.Parse(rawFid.ToString(), CultureInfo.InvariantCulture);
            return v.Files.FirstOrDefault(f => f.Id == fid);
        }
        var type = q.TryGetValue("type", out var t) ? t.ToString() : null;
        var candidates = v.Files.Where(f => type is null
            ? f.Type is "Model" or "Pruned Model" or "Diffusion Model" or "UNet"
            : string.Equals(f.Type, type, StringComparison.OrdinalIgnoreCase)).ToList();
        var format = q.TryGetValue("format", out var fm) ? fm.ToString() : "SafeTensor";
        return candidates
            .OrderByDescending(f => (f.Primary ? 1 : 0) + (f.Format == format ? 100 : 0))
            .FirstOrDefault();
    }

    private async Task HandleStorageAsync(HttpContext ctx)
    {
        var segments = ctx.Request.Path.Value!.Split('/', StringSplitOptions.RemoveEmptyEntries);
        if (ctx.Request.Headers.Authorization.Count > 0)
        {
            // What R2 says when a presigned URL also carries a credential.
            await XmlAsync(ctx, 400, "InvalidRequest", "Missing x-amz-content-sha256");
            return;
        }
        var sig = ctx.Request.Query["X-Amz-Signature"].ToString();
        if (segments is not ["file", var rawFid, ..] || !int.TryParse(rawFid, CultureInfo.InvariantCulture, out var fid)
            || !_links.TryGetValue(sig, out var link) || link.FileId != fid)
        {
            await XmlAsync(ctx, 403, "AccessDenied", "Invalid signature");
            return;
        }
        var file = FindFile(fid)!;
        var uses = Interlocked.Increment(ref link.Uses);
        if (link.Expires <= _options.TimeProvider.GetUtcNow() || (file.Faults.SignedLinkUses > 0 && uses > file.Faults.SignedLinkUses))
        {
            await XmlAsync(ctx, 403, "AccessDenied", "Request has expired", "ExpiredRequest");
            return;
        }

        _downloadsStarted.AddOrUpdate(fid, 1, (_, n) => n + 1);
        if (await HostileStorageAsync(ctx, file))
        {
            return;
        }
        var faults = file.Faults;
        if (TakeOne(faults, static f => f.Storage503Times, static (f, n) => f.Storage503Times = n))
        {
            if (faults.RetryAfterSeconds is { } ra)
            {
                ctx.Response.Headers.RetryAfter = ra.ToString(CultureInfo.InvariantCulture);
            }
            await XmlAsync(ctx, 503, "SlowDown", "Please reduce your request rate.");
            return;
        }
        if (faults.ServeHtml)
        {
            ctx.Response.StatusCode = 200;
            ctx.Response.ContentType = faults.DisguiseHtml ? "application/octet-stream" : "text/html; charset=utf-8";
            await ctx.Response.WriteAsync("<!DOCTYPE html><html><head><title>Sign in | Civitai</title></head><body>Please log in</body></html>");
            return;
        }

        var content = file.Content;
        long start = 0;
        var rangeHeader = ctx.Request.Headers.Range.ToString();
        if (!faults.IgnoreRange && rangeHeader.StartsWith("bytes=", StringComparison.Ordinal))
        {
            var spec = rangeHeader["bytes=".Length..].Split('-');
            start = long.Parse(spec[0], CultureInfo.InvariantCulture);
            _ranges.Enqueue(new SimRangeRequest(fid, start));
            if (start >= content.Length)
            {
                ctx.Response.StatusCode = 416;
                ctx.Response.Headers.ContentRange = $"bytes */{content.Length}";
                return;
            }
            ctx.Response.StatusCode = 206;
            ctx.Response.Headers.ContentRange = $"bytes {start}-{content.Length - 1}/{content.Length}";
        }
        else
        {
            ctx.Response.StatusCode = 200;
        }
        ctx.Response.ContentType = "application/octet-stream";
        ctx.Response.Headers.AcceptRanges = "bytes";
        ctx.Response.Headers.ContentDisposition = $"attachment; filename=\"{file.Name}\"";
        if (!faults.OmitContentLength)
        {
            ctx.Response.ContentLength = content.Length - start;
        }

        var limit = content.Length - start;
        var drop = faults.DropAfterBytes is { } d && TakeOne(faults, static f => f.DropTimes, static (f, n) => f.DropTimes = n);
        if (drop)
        {
            limit = Math.Min(limit, faults.DropAfterBytes!.Value);
        }
        for (var offset = 0L; offset < limit;)
        {
            var n = (int)Math.Min(64 * 1024, limit - offset);
            if (faults.ChunkDelay > TimeSpan.Zero)
            {
                await ctx.Response.Body.FlushAsync(ctx.RequestAborted);
                await Task.Delay(faults.ChunkDelay, ctx.RequestAborted);
            }
            await ctx.Response.Body.WriteAsync(content.AsMemory((int)(start + offset), n), ctx.RequestAborted);
            offset += n;
        }
        if (drop)
        {
            await ctx.Response.Body.FlushAsync(ctx.RequestAborted);
            ctx.Abort();
        }
    }

    // ---- helpers ----------------------------------------------------------------------------

    private SimVersion? FindVersion(int id)
    {
        lock (Gate)
        {
            return _models.SelectMany(m => m.Versions).FirstOrDefault(v => v.Id == id);
        }
    }

    private SimFile? FindFile(int id)
    {
        lock (Gate)
        {
            return _models.SelectMany(m => m.Versions).SelectMany(v => v.Files).FirstOrDefault(f => f.Id == id);
        }
    }

    private bool TakeOne(SimFileFaults faults, Func<SimFileFaults, int> get, Action<SimFileFaults, int> set)
    {
        lock (Gate)
        {
            var n = get(faults);
            if (n <= 0)
            {
                return false;
            }
            set(faults, n - 1);
            return true;
        }
    }

    /// <summary>CivitAI reads the Bearer header first (a header without "Bearer " authenticates nobody), else ?token=.</summary>
    private bool IsAuthenticated(HttpContext ctx)
    {
        var header = ctx.Request.Headers.Authorization.ToString();
        if (header.Length > 0)
        {
            var space = header.IndexOf(' ', StringComparison.Ordinal);
            return space > 0 && header[(space + 1)..] == _options.ValidToken;
        }
        return ctx.Request.Query["token"].ToString() == _options.ValidToken;
    }

    private static bool IsBrowser(string ua) =>
        new[] { "mozilla", "chrome", "safari", "firefox", "opera", "edge" }.Any(b => ua.Contains(b, StringComparison.OrdinalIgnoreCase));

    private static Task ErrorAsync(HttpContext ctx, bool browser, int status, string message)
    {
        if (!browser)
        {
            return JsonAsync(ctx, status, new Dictionary<string, object?> { ["error"] = message });
        }
        ctx.Response.StatusCode = status;
        ctx.Response.ContentType = "text/plain; charset=utf-8";
        return ctx.Response.WriteAsync(message);
    }

    private static Task RedirectAsync(HttpContext ctx, string location)
    {
        ctx.Response.StatusCode = 307;
        ctx.Response.Headers.Location = location;
        ctx.Response.ContentType = "text/plain; charset=utf-8";
        // Next.js writes the target URL as the body.
        return ctx.Response.WriteAsync(location);
    }

    private static Task JsonAsync(HttpContext ctx, int status, object body)
    {
        ctx.Response.StatusCode = status;
        ctx.Response.ContentType = "application/json; charset=utf-8";
        return ctx.Response.WriteAsync(JsonSerializer.Serialize(body, Json));
    }

    private static Task XmlAsync(HttpContext ctx, int status, string code, string message, string? detail = null)
    {
        ctx.Response.StatusCode = status;
        ctx.Response.ContentType = "application/xml";
        var sb = new StringBuilder("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>").Append(code).Append("</Code><Message>").Append(message).Append("</Message>");
        if (detail is not null)
        {
            sb.Append("<Detail>").Append(detail).Append("</Detail>");
        }
        return ctx.Response.WriteAsync(sb.Append("</Error>").ToString());
    }

    private static string Iso(DateTimeOffset t) => t.UtcDateTime.ToString("yyyy-MM-dd'T'HH:mm:ss.fff'Z'", CultureInfo.InvariantCulture);

    private static string FormatHost(IPAddress a) => a.AddressFamily == System.Net.Sockets.AddressFamily.InterNetworkV6 ? $"[{a}]" : a.ToString();
}
