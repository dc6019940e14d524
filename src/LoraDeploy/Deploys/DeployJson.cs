using System.IO.Pipelines;
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
    public ReadOnlyMemory<byte> Utf8 => utf8;

    public int? StatusCode => StatusCodes.Status200OK;

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
/// <c>GET /deploy/list</c>'s body: the rows are written into the response as they are read, so a caller with
/// 10,000 deploys costs neither 10,000 objects nor a 4 MB buffer.
/// </summary>
public sealed class DeployListJson(DeployReads reads, long userId, IReadOnlyCollection<string>? statuses)
    : IResult, IStatusCodeHttpResult, IEndpointMetadataProvider
{
    public int? StatusCode => StatusCodes.Status200OK;

    public async Task ExecuteAsync(HttpContext http)
    {
        http.Response.StatusCode = StatusCodes.Status200OK;
        http.Response.ContentType = "application/json; charset=utf-8";
        await reads.WriteListAsync(userId, statuses, http.Response.BodyWriter, http.RequestAborted);
    }

    public static void PopulateMetadata(MethodInfo method, EndpointBuilder builder) =>
        builder.Metadata.Add(new ProducesResponseTypeMetadata(StatusCodes.Status200OK, typeof(List<DeploymentOut>), ["application/json"]));
}

/// <summary>How much of a list is written before it is handed to the connection (Kestrel's default response buffer).</summary>
internal static class DeployListChunk
{
    public const int Bytes = 64 * 1024;

    /// <summary>Writes what <paramref name="json"/> holds to the pipe; false when the client has gone.</summary>
    public static async ValueTask<bool> FlushAsync(Utf8JsonWriter json, PipeWriter body, CancellationToken ct)
    {
        json.Flush();
        var result = await body.FlushAsync(ct);
        return !result.IsCompleted && !result.IsCanceled;
    }
}
