using System.Text.Json;
using System.Text.Json.Serialization;

namespace LoraDeploy.Workers;

/// <summary>
/// The server ↔ worker protocol (JSON over HTTP, snake_case). Workers call the server with their worker token
/// (<c>Authorization: Bearer ldw_…</c>); the server calls workers with the per-registration call key the worker chose
/// (<c>Authorization: Bearer {call_key}</c>). Registration and heartbeats are rows in the database, so every API
/// replica sees every worker; the server never holds a connection open to a worker between requests.
/// <list type="number">
/// <item>Worker → <c>POST {server}/internal/v1/workers/register</c> (<see cref="WorkerRegistration"/>) →
/// <see cref="WorkerRegistered"/>.</item>
/// <item>Worker → <c>POST {server}/internal/v1/workers/{id}/heartbeat</c> every <see cref="WorkerRegistered.HeartbeatSeconds"/>
/// (<see cref="WorkerHeartbeat"/>) → <see cref="WorkerAssignments"/>: the adapters it must hold (load the missing ones,
/// keep them pinned) and the ones it must drop now. 404 = the server forgot this worker (it missed heartbeats): register again.</item>
/// <item>Worker → <c>GET {server}/internal/v1/workers/blobs/{sha256}</c> (Range supported): an adapter's bytes, to be
/// verified against the SHA-256 before use.</item>
/// <item>Worker → <c>POST {server}/internal/v1/workers/{id}/leave</c> when it stops on purpose: the server forgets it
/// and places its instances elsewhere now (204; 404 if it was not registered).</item>
/// <item>Server → <c>POST {worker url}/internal/v1/infer</c>: one inference request; headers
/// <see cref="OperationHeader"/>, <see cref="AdaptersHeader"/>, <see cref="PoolHeader"/>, <see cref="RequestIdHeader"/>; the
/// body is the client's (validated) JSON; the worker's answer (status, JSON or SSE) goes back to the client as it is
/// streamed. A native text-to-image body with <c>"stream": true</c> is answered in the
/// <see cref="Inference.ImageProgressStream"/> format.</item>
/// <item>Server → <c>GET {worker url}/ready</c>: 200 once the engine has loaded its base models.</item>
/// <item>Server → <c>POST {worker url}/internal/v1/wake</c> (no body; 204, 401 without the call key): placement gave this
/// worker something to load, unpin or drop; it heartbeats now to learn what, instead of at its next period. Best-effort:
/// a missed wake costs one heartbeat period, nothing else.</item>
/// </list>
/// </summary>
public static class WorkerProtocol
{
    public const string RegisterPath = "/internal/v1/workers/register";
    public const string HeartbeatPathFormat = "/internal/v1/workers/{0}/heartbeat";
    public const string BlobPathFormat = "/internal/v1/workers/blobs/{0}";
    /// <summary>A worker that stops on purpose says so: it leaves routing at once instead of after missed heartbeats.</summary>
    public const string LeavePathFormat = "/internal/v1/workers/{0}/leave";
    public const string InferPath = "/internal/v1/infer";
    public const string ReadyPath = "/ready";
    /// <summary>Server → worker: heartbeat now, the assignments changed.</summary>
    public const string WakePath = "/internal/v1/wake";

    /// <summary>What the request asks for: <see cref="Operations"/>.</summary>
    public const string OperationHeader = "X-LoraDeploy-Operation";
    /// <summary>Adapters to apply: comma-separated <c>sha256:scale</c> (scale invariant culture), in request order; empty = base model.</summary>
    public const string AdaptersHeader = "X-LoraDeploy-Adapters";
    /// <summary>The pool (base model name) the request is for.</summary>
    public const string PoolHeader = "X-LoraDeploy-Pool";
    /// <summary>A fresh id per inference call, chosen by the gateway; engines answer it as <c>request_id</c>.</summary>
    public const string RequestIdHeader = "X-LoraDeploy-Request-Id";
    /// <summary>Set by the worker on its answer: the adapters it had to load for this request (cache misses), comma-separated.</summary>
    public const string LoadedHeader = "X-LoraDeploy-Loaded";

    public const int MaxSlots = 256;
    public const int MaxPools = 64;
    /// <summary>A heartbeat body stays under the server's 64 KiB request limit.</summary>
    public const int MaxReportedAdapters = 400;
}

/// <summary>Values of <see cref="WorkerProtocol.OperationHeader"/>.</summary>
public static class Operations
{
    public const string ChatCompletions = "chat.completions";
    public const string Completions = "completions";
    public const string ImagesGenerations = "images.generations";
    /// <summary>DeepInfra's native <c>/v1/inference/…</c> body (text-to-image or text generation, by the pool's engine).</summary>
    public const string Native = "native";
}

/// <param name="Id">Chosen by the worker, stable across its restarts if it can keep it (1–64 of [A-Za-z0-9._-]).</param>
/// <param name="Engine"><c>llamacpp</c> or <c>comfyui</c>.</param>
/// <param name="Pools">Base model names it serves (each must be a pool of that engine on the server).</param>
/// <param name="Slots">Requests it runs at once.</param>
/// <param name="Url">Where the server reaches it (absolute http(s) URL).</param>
/// <param name="Version">The worker's LoraDeploy version.</param>
/// <param name="CallKey">A random secret (≥ 32 characters) the server presents on every call to this worker.</param>
public sealed record WorkerRegistration(string Id, string Engine, IReadOnlyList<string> Pools, int Slots, string Url, string Version, string CallKey);

public sealed record WorkerRegistered(string Id, int HeartbeatSeconds);

/// <param name="QueueDepth">Requests waiting for a slot.</param>
/// <param name="BusySlots">Slots running a request.</param>
/// <param name="Adapters">Every adapter resident on the worker or being loaded, with its state.</param>
public sealed record WorkerHeartbeat(int QueueDepth, int BusySlots, IReadOnlyList<ResidentAdapter> Adapters);

/// <param name="Sha256">The adapter blob's SHA-256 (what the server assigned).</param>
/// <param name="Pool">The pool (base model) it is loaded on.</param>
/// <param name="State"><c>loading</c>, <c>ready</c> or <c>failed</c>.</param>
/// <param name="Reason">The engine's reason when failed.</param>
public sealed record ResidentAdapter(string Sha256, string Pool, string State, string? Reason = null);

/// <param name="Hold">Adapters the worker must load (if missing) and keep: never evicted by its LRU while listed.</param>
/// <param name="Drop">Adapters it must unload now (their deploys were stopped or deleted).</param>
public sealed record WorkerAssignments(IReadOnlyList<AdapterAssignment> Hold, IReadOnlyList<string> Drop);

/// <param name="Sha256">The adapter blob's SHA-256.</param>
/// <param name="Pool">The pool (base model) to load it on.</param>
/// <param name="SizeBytes">The blob's size, so the worker can check its cache budget before fetching.</param>
public sealed record AdapterAssignment(string Sha256, string Pool, long SizeBytes);

/// <summary>A worker as <c>GET /v1/workers</c> (admins) and <c>loradeploy workers</c> show it.</summary>
public sealed record WorkerOut(string Id, string Name, string Engine, IReadOnlyList<string> Pools, int Slots, int BusySlots, int QueueDepth,
    IReadOnlyList<string> Resident, int Instances, string Url, string Version, string LastHeartbeatAt, string RegisteredAt);

[JsonSourceGenerationOptions(JsonSerializerDefaults.Web, PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower)]
[JsonSerializable(typeof(WorkerRegistration))]
[JsonSerializable(typeof(WorkerRegistered))]
[JsonSerializable(typeof(WorkerHeartbeat))]
[JsonSerializable(typeof(WorkerAssignments))]
[JsonSerializable(typeof(JsonElement))]
[JsonSerializable(typeof(List<WorkerOut>))]
public sealed partial class WorkerJsonContext : JsonSerializerContext;
