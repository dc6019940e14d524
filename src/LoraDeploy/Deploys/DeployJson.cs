using System.Buffers;
using System.Reflection;
using System.Text.Encodings.Web;
using System.Text.Json;
using Microsoft.AspNetCore.Http.Metadata;

namespace LoraDeploy.Deploys;

/// <summary>
/// One deploy row's columns as UTF-8 text, timestamps already in DeepInfra's form. A view of the database driver's
/// buffers: the list writes 10,000 of these without creating a string or a <see cref="DeploymentOut"/>.
/// </summary>
public ref struct DeployRow
{
    public ReadOnlySpan<byte> Id;
    public ReadOnlySpan<byte> ModelName;
    public ReadOnlySpan<byte> Version;
    public ReadOnlySpan<byte> Task;
    public ReadOnlySpan<byte> Status;
    public ReadOnlySpan<byte> FailReason;
    public ReadOnlySpan<byte> CreatedAt;
    public ReadOnlySpan<byte> UpdatedAt;
    public ReadOnlySpan<byte> Type;
    public int RunningInstances;
    public int PendingInstances;
    public int MinInstances;
    public int MaxInstances;
}

/// <summary>
/// Writes a deploy row as DeepInfra's <c>DeploymentOut</c>: the same names, order and escaping as
/// <see cref="ApiJson"/>'s serializer gives the <see cref="DeploymentOut"/> record (a test holds the two equal).
/// </summary>
public static class DeployJsonWriter
{
    public static readonly JsonWriterOptions Options = new()
    {
        Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
        SkipValidation = true,
    };

    private static readonly JsonEncodedText DeployId = JsonEncodedText.Encode("deploy_id");
    private static readonly JsonEncodedText ModelName = JsonEncodedText.Encode("model_name");
    private static readonly JsonEncodedText Version = JsonEncodedText.Encode("version");
    private static readonly JsonEncodedText Task = JsonEncodedText.Encode("task");
    private static readonly JsonEncodedText Status = JsonEncodedText.Encode("status");
    private static readonly JsonEncodedText FailReason = JsonEncodedText.Encode("fail_reason");
    private static readonly JsonEncodedText CreatedAt = JsonEncodedText.Encode("created_at");
    private static readonly JsonEncodedText UpdatedAt = JsonEncodedText.Encode("updated_at");
    private static readonly JsonEncodedText Instances = JsonEncodedText.Encode("instances");
    private static readonly JsonEncodedText Running = JsonEncodedText.Encode("running");
    private static readonly JsonEncodedText Pending = JsonEncodedText.Encode("pending");
    private static readonly JsonEncodedText Config = JsonEncodedText.Encode("config");
    private static readonly JsonEncodedText Settings = JsonEncodedText.Encode("settings");
    private static readonly JsonEncodedText MinInstances = JsonEncodedText.Encode("min_instances");
    private static readonly JsonEncodedText MaxInstances = JsonEncodedText.Encode("max_instances");
    private static readonly JsonEncodedText Type = JsonEncodedText.Encode("type");

    public static void Write(Utf8JsonWriter json, scoped in DeployRow row)
    {
        json.WriteStartObject();
        json.WriteString(DeployId, row.Id);
        json.WriteString(ModelName, row.ModelName);
        json.WriteString(Version, row.Version);
        json.WriteString(Task, row.Task);
        json.WriteString(Status, row.Status);
        json.WriteString(FailReason, row.FailReason);
        json.WriteString(CreatedAt, row.CreatedAt);
        json.WriteString(UpdatedAt, row.UpdatedAt);
        json.WriteStartObject(Instances);
        json.WriteNumber(Running, row.RunningInstances);
        json.WriteNumber(Pending, row.PendingInstances);
        json.WriteEndObject();
        json.WriteNull(Config);
        json.WriteStartObject(Settings);
        json.WriteNumber(MinInstances, row.MinInstances);
        json.WriteNumber(MaxInstances, row.MaxInstances);
        json.WriteEndObject();
        json.WriteString(Type, row.Type);
        json.WriteEndObject();
    }
}

/// <summary>A <c>DeploymentOut</c> body rendered from the row (<see cref="DeployReads.ByIdAsync"/>).</summary>
public sealed class DeployJson(ReadOnlyMemory<byte> utf8) : IResult, IStatusCodeHttpResult, IEndpointMetadataProvider
{
    public int? StatusCode => StatusCodes.Status200OK;

    public ReadOnlyMemory<byte> Utf8 => utf8;

    public async Task ExecuteAsync(HttpContext http)
    {
        http.Response.StatusCode = StatusCodes.Status200OK;
        http.Response.ContentType = "application/json; charset=utf-8";
        http.Response.ContentLength = utf8.Length;
        await http.Response.BodyWriter.WriteAsync(utf8, http.RequestAborted);
    }

    public static void PopulateMetadata(MethodInfo method, EndpointBuilder builder) =>
        builder.Metadata.Add(new ProducesResponseTypeMetadata(StatusCodes.Status200OK, typeof(DeploymentOut), ["application/json"]));
}

/// <summary>
/// <c>GET /deploy/list</c>'s body: the rows are written into the response as they are read
/// (<see cref="DeployListOutput"/>), so a caller with 10,000 deploys costs neither 10,000 objects nor a 4 MB buffer.
/// </summary>
public sealed class DeployListJson(DeployReads reads, long userId, IReadOnlyCollection<string>? statuses)
    : IResult, IStatusCodeHttpResult, IEndpointMetadataProvider
{
    public int? StatusCode => StatusCodes.Status200OK;

    public async Task ExecuteAsync(HttpContext http)
    {
        http.Response.StatusCode = StatusCodes.Status200OK;
        http.Response.ContentType = "application/json; charset=utf-8";
        await reads.WriteListAsync(userId, statuses, new DeployListOutput(http.Response), http.RequestAborted);
    }

    public static void PopulateMetadata(MethodInfo method, EndpointBuilder builder) =>
        builder.Metadata.Add(new ProducesResponseTypeMetadata(StatusCodes.Status200OK, typeof(List<DeploymentOut>), ["application/json"]));
}

/// <summary>
/// Where a list is written. The first chunk is held in memory and the response starts only when it is full or the list
/// is done: a query or row that fails early still becomes an ordinary error response, and a list that fits one chunk
/// goes out with a <c>Content-Length</c>. Longer lists are handed to the connection a chunk at a time.
/// </summary>
public sealed class DeployListOutput(HttpResponse response) : IBufferWriter<byte>
{
    /// <summary>Below the large-object heap, so the first chunk's buffer is an ordinary allocation.</summary>
    public const int ChunkBytes = 32 * 1024;

    private ArrayBufferWriter<byte>? _first = new(4096);

    public void Advance(int count)
    {
        if (_first is { } first)
        {
            first.Advance(count);
        }
        else
        {
            response.BodyWriter.Advance(count);
        }
    }

    public Memory<byte> GetMemory(int sizeHint = 0) =>
        _first is { } first ? first.GetMemory(sizeHint) : response.BodyWriter.GetMemory(sizeHint);

    public Span<byte> GetSpan(int sizeHint = 0) =>
        _first is { } first ? first.GetSpan(sizeHint) : response.BodyWriter.GetSpan(sizeHint);

    /// <summary>Hands what <paramref name="json"/> has written to the connection; false when the client has gone.</summary>
    public async ValueTask<bool> FlushAsync(Utf8JsonWriter json, CancellationToken ct)
    {
        json.Flush();
        if (_first is { } first)
        {
            _first = null;
            response.BodyWriter.Write(first.WrittenSpan);
        }
        var result = await response.BodyWriter.FlushAsync(ct);
        return !result.IsCompleted && !result.IsCanceled;
    }

    /// <summary>Ends the list; one still held in memory goes out whole, with its length.</summary>
    public ValueTask CompleteAsync(Utf8JsonWriter json, CancellationToken ct)
    {
        json.Flush();
        return CompleteAsync(ct);
    }

    /// <summary>Ends a list written straight into this writer.</summary>
    public async ValueTask CompleteAsync(CancellationToken ct)
    {
        if (_first is { } first)
        {
            _first = null;
            SentWhole = first.WrittenMemory;
            await WriteWholeAsync(first.WrittenMemory, ct);
        }
    }

    /// <summary>The list's bytes when it went out in one piece, with its length; null when it was sent in chunks.</summary>
    public ReadOnlyMemory<byte>? SentWhole { get; private set; }

    /// <summary>Sends a whole list, already written, as the response.</summary>
    public async ValueTask WriteWholeAsync(ReadOnlyMemory<byte> list, CancellationToken ct)
    {
        _first = null;
        response.ContentLength = list.Length;
        await response.BodyWriter.WriteAsync(list, ct);
    }
}
