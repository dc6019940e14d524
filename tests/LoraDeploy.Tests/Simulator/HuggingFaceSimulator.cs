using System.Collections.Concurrent;
using System.Globalization;
using System.Net;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.Logging;

namespace LoraDeploy.Tests.Simulator;

/// <summary>Who may read a simulated repo.</summary>
public enum HfVisibility
{
    Public,
    /// <summary>Only <see cref="HuggingFaceSimulator.ValidToken"/> sees it: 401 anonymous, 404 to other tokens.</summary>
    Private,
    /// <summary>Listing public; files need a token in <see cref="HfSimRepo.GrantedTokens"/> (401 GatedRepo anonymous, 403 GatedRepo ungranted).</summary>
    Gated,
}

/// <summary>One request the Hugging Face simulator saw, with every request header (so tests can look for a token).</summary>
public sealed record HfSimRequest(string Host, string Method, string PathAndQuery, int Status, IReadOnlyDictionary<string, string> Headers)
{
    public bool HadAuthorization => Headers.ContainsKey("Authorization");
}

/// <summary>One file of a simulated repo at one commit.</summary>
public sealed class HfSimFile(string path, byte[] content, bool lfs)
{
    public string Path { get; } = path;
    public byte[] Content { get; } = content;
    /// <summary>Kept in LFS (weights): listed with lfs.sha256/size, and its resolve answers 302 to the storage host.</summary>
    public bool Lfs { get; } = lfs;
    public string Sha256 { get; } = Convert.ToHexStringLower(SHA256.HashData(content));
    /// <summary>git's blob id: of the content for a git file, of the LFS pointer for an LFS file.</summary>
    public string BlobId => HuggingFaceSimulator.GitBlobId(Lfs ? Encoding.ASCII.GetBytes(Pointer) : Content);
    public string Pointer => $"version https://git-lfs.github.com/spec/v1\noid sha256:{Sha256}\nsize {Content.Length}\n";
    /// <summary>Faults of this file; shared by every commit holding the same file object.</summary>
    public HfSimFileFaults Faults { get; } = new();
}

public sealed class HfSimFileFaults
{
    /// <summary>Storage closes the connection after this many body bytes, <see cref="DropTimes"/> times.</summary>
    public long? DropAfterBytes { get; set; }
    public int DropTimes { get; set; } = 1;
    /// <summary>A signed link stops working (403 "Request has expired") after this many uses; 0 = never.</summary>
    public int SignedLinkUses { get; set; }
    /// <summary>The Hub's resolve answers 429 (with <see cref="RetryAfterSeconds"/>) this many times first.</summary>
    public int Resolve429Times { get; set; }
    public int? RetryAfterSeconds { get; set; }
    /// <summary>Storage (or the Hub, for a git file) serves these bytes instead of the listed content.</summary>
    public byte[]? ServeInstead { get; set; }
    /// <summary>The Hub's resolve answers 404 EntryNotFound although the listing has the file.</summary>
    public bool EntryNotFound { get; set; }
}

/// <summary>A simulated model repo: commits of files, branches and tags.</summary>
public sealed class HfSimRepo
{
    private readonly Dictionary<string, Dictionary<string, HfSimFile>> _commits = [];
    private readonly Dictionary<string, string> _refs = new(StringComparer.Ordinal);
    private readonly HuggingFaceSimulator _sim;

    internal HfSimRepo(HuggingFaceSimulator sim, string id, HfVisibility visibility)
    {
        _sim = sim;
        Id = id;
        Visibility = visibility;
    }

    public string Id { get; }
    public HfVisibility Visibility { get; set; }
    /// <summary>For gated repos: tokens granted access (the simulator's valid token by default).</summary>
    public HashSet<string> GrantedTokens { get; } = [];
    public string? LibraryName { get; set; } = "peft";
    public string? PipelineTag { get; set; } = "text-generation";
    public string? CardBaseModel { get; set; } = "sim/tiny-llama";

    /// <summary>The commit <c>main</c> points at.</summary>
    public string Head => Resolve("main")!;

    /// <summary>Adds a commit on <c>main</c> holding exactly <paramref name="files"/>; returns its sha.</summary>
    public string Commit(IEnumerable<HfSimFile> files)
    {
        var sha = Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(20));
        lock (_sim.Gate)
        {
            _commits[sha] = files.ToDictionary(f => f.Path, StringComparer.Ordinal);
            _refs["main"] = sha;
        }
        return sha;
    }

    public void Tag(string name, string sha)
    {
        lock (_sim.Gate)
        {
            _refs[name] = sha;
        }
    }

    /// <summary>A branch, tag, HEAD or full commit sha → the commit; null when none.</summary>
    internal string? Resolve(string revision)
    {
        lock (_sim.Gate)
        {
            if (revision == "HEAD")
            {
                revision = "main";
            }
            if (_refs.TryGetValue(revision, out var sha))
            {
                return sha;
            }
            return _commits.ContainsKey(revision) ? revision : null;
        }
    }

    internal IReadOnlyDictionary<string, HfSimFile> Files(string sha)
    {
        lock (_sim.Gate)
        {
            return _commits[sha];
        }
    }
}

/// <summary>
/// A loopback imitation of the Hugging Face Hub (API and resolve host, addressed as 127.0.0.1) and its LFS storage
/// (a second host, <c>localhost</c>), built from shared/reference/huggingface-hub.md. Real Kestrel, real sockets.
/// <code>
/// await using var sim = await HuggingFaceSimulator.StartAsync();
/// var repo = sim.AddAdapter("owner/adapter", SimContent.Safetensors());
/// // point HuggingFace:BaseUrl at sim.HubBaseUrl and allow 127.0.0.0/8 in Network:AllowedPrivateRanges
/// </code>
/// </summary>
public sealed class HuggingFaceSimulator : IAsyncDisposable
{
    private static readonly JsonSerializerOptions Json = new() { PropertyNamingPolicy = null };

    private readonly WebApplication _app;
    private readonly TimeProvider _time;
    private readonly ConcurrentDictionary<string, HfSimRepo> _repos = new(StringComparer.OrdinalIgnoreCase);
    private readonly ConcurrentDictionary<string, string> _renamed = new(StringComparer.OrdinalIgnoreCase);
    private readonly ConcurrentDictionary<string, SignedLink> _links = new();
    private readonly ConcurrentQueue<HfSimRequest> _requests = new();
    private readonly ConcurrentQueue<long> _ranges = new();
    private int _hubPort, _storagePort;

    internal object Gate { get; } = new();

    private sealed record SignedLink(HfSimFile File, DateTimeOffset Expires)
    {
        public int Uses;
    }

    private HuggingFaceSimulator(WebApplication app, TimeProvider time)
    {
        _app = app;
        _time = time;
    }

    /// <summary>e.g. <c>http://127.0.0.1:41234</c> — set HuggingFace:BaseUrl to this.</summary>
    public string HubBaseUrl => $"http://127.0.0.1:{_hubPort}";
    /// <summary>e.g. <c>http://localhost:41235</c> — another host name, so where the token goes is observable.</summary>
    public string StorageBaseUrl => $"http://localhost:{_storagePort}";
    public string AllowedRange => "127.0.0.0/8";

    /// <summary>A token with access to every private repo and granted for every gated one by default.</summary>
    public string ValidToken => "hf_simValidTokenAbcdefghijklmnop";
    /// <summary>A token the Hub knows, with access to nothing private or gated.</summary>
    public string OtherToken => "hf_simOtherTokenQrstuvwxyz012345";

    public TimeSpan SignedLinkLifetime { get; set; } = TimeSpan.FromHours(1);
    /// <summary>The API (<c>/api/…</c>) answers 429 this many times first, with <see cref="ApiRetryAfterSeconds"/>.</summary>
    public int Api429Times { get; set; }
    public int Api503Times { get; set; }
    public int? ApiRetryAfterSeconds { get; set; }

    public IReadOnlyList<HfSimRequest> Requests => _requests.ToArray();
    /// <summary>Offsets of the Range requests storage saw.</summary>
    public IReadOnlyList<long> RangeRequests => _ranges.ToArray();

    public static async Task<HuggingFaceSimulator> StartAsync(TimeProvider? time = null, CancellationToken cancellationToken = default)
    {
        var builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        ListenOptions? hub = null, storage = null;
        builder.WebHost.ConfigureKestrel(k =>
        {
            k.Listen(IPAddress.Loopback, 0, lo => hub = lo);
            k.Listen(IPAddress.Loopback, 0, lo => storage = lo);
        });
        var app = builder.Build();
        var sim = new HuggingFaceSimulator(app, time ?? TimeProvider.System);
        app.Run(sim.HandleAsync);
        await app.StartAsync(cancellationToken);
        sim._hubPort = hub!.IPEndPoint!.Port;
        sim._storagePort = storage!.IPEndPoint!.Port;
        return sim;
    }

    public async ValueTask DisposeAsync()
    {
        await _app.StopAsync();
        await _app.DisposeAsync();
    }

    // ---- registration ----------------------------------------------------------------------

    /// <summary>An empty repo; add commits with <see cref="HfSimRepo.Commit"/>.</summary>
    public HfSimRepo AddRepo(string id, HfVisibility visibility = HfVisibility.Public)
    {
        var repo = new HfSimRepo(this, id, visibility);
        repo.GrantedTokens.Add(ValidToken);
        _repos[id] = repo;
        return repo;
    }

    /// <summary>A repo with one commit holding a PEFT adapter: adapter_config.json, adapter_model.safetensors, README.md.</summary>
    public HfSimRepo AddAdapter(string id, byte[] weights, HfVisibility visibility = HfVisibility.Public, string? config = null)
    {
        var repo = AddRepo(id, visibility);
        repo.Commit(AdapterFiles(weights, config));
        return repo;
    }

    public static IReadOnlyList<HfSimFile> AdapterFiles(byte[] weights, string? config = null) =>
    [
        new(".gitattributes", Encoding.UTF8.GetBytes("*.safetensors filter=lfs diff=lfs merge=lfs -text\n"), lfs: false),
        new("README.md", Encoding.UTF8.GetBytes("---\nbase_model: sim/tiny-llama\nlibrary_name: peft\n---\n# adapter\n"), lfs: false),
        new("adapter_config.json", Encoding.UTF8.GetBytes(config ?? PeftConfig()), lfs: false),
        new("adapter_model.safetensors", weights, lfs: true),
    ];

    public static string PeftConfig(int r = 8, int alpha = 16) =>
        $$"""{"peft_type": "LORA", "base_model_name_or_path": "sim/tiny-llama", "r": {{r}}, "lora_alpha": {{alpha}}, "target_modules": ["q_proj", "v_proj"], "use_rslora": false, "use_dora": false, "task_type": "CAUSAL_LM"}""";

    /// <summary>Requests for <paramref name="oldId"/> answer 307 with a relative Location to <paramref name="newId"/>, like a renamed repo.</summary>
    public void Rename(string oldId, string newId) => _renamed[oldId] = newId;

    /// <summary>Requests whose headers carry <paramref name="secret"/> anywhere, on the given host ("hub" or "storage").</summary>
    public int RequestsCarrying(string host, string secret) =>
        _requests.Count(r => r.Host == host && (r.Headers.Values.Any(v => v.Contains(secret, StringComparison.Ordinal)) || r.PathAndQuery.Contains(secret, StringComparison.Ordinal)));

    internal static string GitBlobId(byte[] content) =>
#pragma warning disable CA5350 // git names blobs by SHA-1
        Convert.ToHexStringLower(SHA1.HashData([.. Encoding.ASCII.GetBytes($"blob {content.Length}\0"), .. content]));
#pragma warning restore CA5350

    // ---- dispatch ---------------------------------------------------------------------------

    private async Task HandleAsync(HttpContext ctx)
    {
        var isStorage = ctx.Connection.LocalPort == _storagePort;
        try
        {
            if (isStorage)
            {
                await StorageAsync(ctx);
            }
            else
            {
                await HubAsync(ctx);
            }
        }
        finally
        {
            _requests.Enqueue(new HfSimRequest(
                isStorage ? "storage" : "hub",
                ctx.Request.Method,
                ctx.Request.Path + ctx.Request.QueryString,
                ctx.Response.StatusCode,
                ctx.Request.Headers.ToDictionary(h => h.Key, h => h.Value.ToString(), StringComparer.OrdinalIgnoreCase)));
        }
    }

    private Task HubAsync(HttpContext ctx)
    {
        // Split the raw path so an escaped revision (refs%2Fpr%2F1) stays one segment.
        var raw = ctx.Features.Get<Microsoft.AspNetCore.Http.Features.IHttpRequestFeature>()!.RawTarget;
        var path = raw.Split('?', 2)[0];
        var segments = path.Split('/', StringSplitOptions.RemoveEmptyEntries).Select(Uri.UnescapeDataString).ToArray();
        if (segments is ["api", ..])
        {
            var fault = Take(() => Api429Times, v => Api429Times = v) ? 429 : Take(() => Api503Times, v => Api503Times = v) ? 503 : 0;
            if (fault != 0)
            {
                if (ApiRetryAfterSeconds is { } ra)
                {
                    ctx.Response.Headers.RetryAfter = ra.ToString(CultureInfo.InvariantCulture);
                }
                ctx.Response.Headers["RateLimit"] = "\"api\";r=0;t=1";
                ctx.Response.Headers["RateLimit-Policy"] = "\"fixed window\";\"api\";q=1000;w=300";
                return ErrorAsync(ctx, fault, null, fault == 429 ? "Too Many Requests" : "Service Unavailable");
            }
        }
        return segments switch
        {
            ["api", "models", var owner, var name] => ModelInfoAsync(ctx, $"{owner}/{name}", null),
            ["api", "models", var owner, var name, "revision", var rev] => ModelInfoAsync(ctx, $"{owner}/{name}", rev),
            [var owner, var name, "resolve", var rev, .. var file] when file.Length > 0 => ResolveAsync(ctx, $"{owner}/{name}", rev, string.Join('/', file)),
            _ => ErrorAsync(ctx, 404, null, "Not Found"),
        };
    }

    private bool Take(Func<int> get, Action<int> set)
    {
        lock (Gate)
        {
            var n = get();
            if (n <= 0)
            {
                return false;
            }
            set(n - 1);
            return true;
        }
    }

    private string? Bearer(HttpContext ctx)
    {
        var header = ctx.Request.Headers.Authorization.ToString();
        return header.StartsWith("Bearer ", StringComparison.Ordinal) ? header["Bearer ".Length..] : header.Length > 0 ? header : null;
    }

    /// <summary>Answers the access checks every Hub endpoint shares; null when the caller may go on.</summary>
    private Task? Access(HttpContext ctx, string id, bool isFile, out HfSimRepo? repo)
    {
        repo = null;
        var token = Bearer(ctx);
        if (token is not null && token != ValidToken && token != OtherToken)
        {
            return ErrorAsync(ctx, 401, null, "Invalid credentials in Authorization header");
        }
        if (_renamed.TryGetValue(id, out var newId))
        {
            var rawTarget = ctx.Features.Get<Microsoft.AspNetCore.Http.Features.IHttpRequestFeature>()!.RawTarget;
            ctx.Response.StatusCode = 307;
            ctx.Response.Headers.Location = rawTarget.Replace(id, newId, StringComparison.OrdinalIgnoreCase);
            return Task.CompletedTask;
        }
        _repos.TryGetValue(id, out var found);
        if (found is null || (found.Visibility == HfVisibility.Private && token != ValidToken))
        {
            // A missing or private repo: 401 to anonymous callers, 404 to a token without access.
            return token is null
                ? ErrorAsync(ctx, 401, "RepoNotFound", "Repository not found")
                : ErrorAsync(ctx, 404, "RepoNotFound", "Repository not found");
        }
        if (isFile && found.Visibility == HfVisibility.Gated && (token is null || !found.GrantedTokens.Contains(token)))
        {
            return token is null
                ? ErrorAsync(ctx, 401, "GatedRepo", $"Access to model {id} is restricted. You must have access to it and be authenticated to access it. Please log in.")
                : ErrorAsync(ctx, 403, "GatedRepo", $"Access to model {id} is restricted and you are not in the authorized list. Visit {HubBaseUrl}/{id} to ask for access.");
        }
        repo = found;
        return null;
    }

    private Task ModelInfoAsync(HttpContext ctx, string id, string? revision)
    {
        if (Access(ctx, id, isFile: false, out var repo) is { } refused)
        {
            return refused;
        }
        var sha = repo!.Resolve(revision ?? "main");
        if (sha is null)
        {
            return ErrorAsync(ctx, 404, "RevisionNotFound", $"Invalid rev id: {revision}");
        }
        var blobs = ctx.Request.Query["blobs"] == "true";
        var siblings = repo.Files(sha).Values.Select(f =>
        {
            var o = new Dictionary<string, object?> { ["rfilename"] = f.Path };
            if (blobs)
            {
                o["blobId"] = f.BlobId;
                o["size"] = f.Content.Length;
                if (f.Lfs)
                {
                    o["lfs"] = new Dictionary<string, object?> { ["sha256"] = f.Sha256, ["size"] = f.Content.Length, ["pointerSize"] = Encoding.ASCII.GetByteCount(f.Pointer) };
                }
            }
            return o;
        }).ToList();
        var body = new Dictionary<string, object?>
        {
            ["_id"] = "6543210fedcba9876543210f",
            ["id"] = repo.Id,
            ["modelId"] = repo.Id,
            ["author"] = repo.Id.Split('/')[0],
            ["sha"] = sha,
            ["lastModified"] = "2026-01-01T00:00:00.000Z",
            ["private"] = repo.Visibility == HfVisibility.Private,
            ["gated"] = repo.Visibility == HfVisibility.Gated ? "manual" : false,
            ["disabled"] = false,
            ["downloads"] = 1,
            ["likes"] = 0,
            ["tags"] = new[] { "peft", "safetensors", $"base_model:adapter:{repo.CardBaseModel}" },
            ["library_name"] = repo.LibraryName,
            ["pipeline_tag"] = repo.PipelineTag,
            ["cardData"] = new Dictionary<string, object?> { ["base_model"] = repo.CardBaseModel, ["library_name"] = repo.LibraryName },
            ["siblings"] = siblings,
            ["createdAt"] = "2026-01-01T00:00:00.000Z",
            ["usedStorage"] = repo.Files(sha).Values.Sum(f => (long)f.Content.Length),
        };
        return JsonAsync(ctx, 200, body);
    }

    private async Task ResolveAsync(HttpContext ctx, string id, string revision, string path)
    {
        if (Access(ctx, id, isFile: true, out var repo) is { } refused)
        {
            await refused;
            return;
        }
        var sha = repo!.Resolve(revision);
        if (sha is null)
        {
            await ErrorAsync(ctx, 404, "RevisionNotFound", $"Invalid rev id: {revision}");
            return;
        }
        ctx.Response.Headers["X-Repo-Commit"] = sha;
        if (!repo.Files(sha).TryGetValue(path, out var file) || file.Faults.EntryNotFound)
        {
            await ErrorAsync(ctx, 404, "EntryNotFound", $"{path} does not exist on \"{revision}\"");
            return;
        }
        var faults = file.Faults;
        if (faults.Resolve429Times > 0 && Take(() => faults.Resolve429Times, v => faults.Resolve429Times = v))
        {
            if (faults.RetryAfterSeconds is { } ra)
            {
                ctx.Response.Headers.RetryAfter = ra.ToString(CultureInfo.InvariantCulture);
            }
            await ErrorAsync(ctx, 429, null, "Too Many Requests");
            return;
        }
        if (!file.Lfs)
        {
            ctx.Response.Headers.ETag = $"\"{file.BlobId}\"";
            await ServeAsync(ctx, faults.ServeInstead ?? file.Content, null);
            return;
        }
        var sig = Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(16));
        var expires = _time.GetUtcNow() + SignedLinkLifetime;
        _links[sig] = new SignedLink(file, expires);
        ctx.Response.StatusCode = 302;
        ctx.Response.Headers["X-Linked-Size"] = file.Content.Length.ToString(CultureInfo.InvariantCulture);
        ctx.Response.Headers["X-Linked-Etag"] = $"\"{file.Sha256}\"";
        ctx.Response.Headers.Location =
            $"{StorageBaseUrl}/repos/{file.Sha256[..2]}/{file.Sha256}?response-content-disposition=inline%3B+filename%3D%22{Uri.EscapeDataString(path)}%22&Expires={expires.ToUnixTimeSeconds()}&Policy=eyJTdGF0ZW1lbnQiOltdfQ__&Signature={sig}&Key-Pair-Id=K3RPWS32NSSJCE";
        ctx.Response.ContentType = "text/plain; charset=utf-8";
        await ctx.Response.WriteAsync($"Found. Redirecting to {ctx.Response.Headers.Location}");
    }

    private async Task StorageAsync(HttpContext ctx)
    {
        if (ctx.Request.Headers.Authorization.Count > 0)
        {
            // What S3-backed signed links answer when a credential comes along.
            await XmlAsync(ctx, 400, "InvalidArgument", "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, Signature query string parameter or the Authorization header should be specified");
            return;
        }
        var sig = ctx.Request.Query["Signature"].ToString();
        if (!_links.TryGetValue(sig, out var link) || !ctx.Request.Path.Value!.EndsWith(link.File.Sha256, StringComparison.Ordinal))
        {
            await XmlAsync(ctx, 403, "AccessDenied", "Access Denied");
            return;
        }
        var uses = Interlocked.Increment(ref link.Uses);
        var faults = link.File.Faults;
        if (link.Expires <= _time.GetUtcNow() || (faults.SignedLinkUses > 0 && uses > faults.SignedLinkUses))
        {
            await XmlAsync(ctx, 403, "AccessDenied", "Request has expired");
            return;
        }
        var drop = faults.DropAfterBytes is not null && Take(() => faults.DropTimes, v => faults.DropTimes = v) ? faults.DropAfterBytes : null;
        await ServeAsync(ctx, faults.ServeInstead ?? link.File.Content, drop);
    }

    /// <summary>200 or 206 (Range) with the bytes; closes the connection after <paramref name="dropAfter"/> body bytes.</summary>
    private async Task ServeAsync(HttpContext ctx, byte[] content, long? dropAfter)
    {
        long start = 0;
        var range = ctx.Request.Headers.Range.ToString();
        if (range.StartsWith("bytes=", StringComparison.Ordinal))
        {
            start = long.Parse(range["bytes=".Length..].Split('-')[0], CultureInfo.InvariantCulture);
            _ranges.Enqueue(start);
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
        ctx.Response.ContentLength = content.Length - start;
        var limit = Math.Min(content.Length - start, dropAfter ?? long.MaxValue);
        for (var offset = 0L; offset < limit;)
        {
            var n = (int)Math.Min(64 * 1024, limit - offset);
            await ctx.Response.Body.WriteAsync(content.AsMemory((int)(start + offset), n), ctx.RequestAborted);
            offset += n;
        }
        if (dropAfter is not null)
        {
            await ctx.Response.Body.FlushAsync(ctx.RequestAborted);
            ctx.Abort();
        }
    }

    // ---- helpers ----------------------------------------------------------------------------

    private static Task ErrorAsync(HttpContext ctx, int status, string? code, string message)
    {
        if (code is not null)
        {
            ctx.Response.Headers["X-Error-Code"] = code;
        }
        ctx.Response.Headers["X-Error-Message"] = message;
        return JsonAsync(ctx, status, new Dictionary<string, object?> { ["error"] = message });
    }

    private static Task JsonAsync(HttpContext ctx, int status, object body)
    {
        ctx.Response.StatusCode = status;
        ctx.Response.ContentType = "application/json; charset=utf-8";
        return ctx.Response.WriteAsync(JsonSerializer.Serialize(body, Json));
    }

    private static Task XmlAsync(HttpContext ctx, int status, string code, string message)
    {
        ctx.Response.StatusCode = status;
        ctx.Response.ContentType = "application/xml";
        return ctx.Response.WriteAsync($"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{message}</Message></Error>");
    }
}
