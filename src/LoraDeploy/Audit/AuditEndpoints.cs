using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization;
using LoraDeploy.Data;
using LoraDeploy.Validation;
using Microsoft.AspNetCore.Http.HttpResults;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Audit;

/// <summary>
/// <c>GET /v1/admin/audit</c> (admins): the audit log newest first, keyset-paged by id, with filters. There is no route
/// that changes or deletes a line. Also the endpoint filter that audits a route acting on an object named in its path.
/// </summary>
public static class AuditEndpoints
{
    public const int DefaultLimit = 100;
    public const int MaxLimit = 1000;

    public static IServiceCollection AddAuditLog(this IServiceCollection services) => services.AddSingleton<AuditLog>();

    public static IEndpointRouteBuilder MapAudit(this IEndpointRouteBuilder app)
    {
        app.MapGet("/v1/admin/audit", ListAsync).WithTags("Audit")
            .RequireAuthorization(policy => policy.RequireRole("admin"))
            .WithSummary("The audit log, newest first (admins); page with before_id")
            .Produces<List<AuditEntryOut>>()
            .Produces<HTTPValidationError>(StatusCodes.Status422UnprocessableEntity);
        return app;
    }

    /// <summary>The <see cref="HttpContext.Items"/> key under which a handler that reads its own body names the object.</summary>
    public const string ObjectIdItem = "audit.object_id";

    /// <summary>
    /// Records <paramref name="action"/> when the handler answers 2xx, on the object named by route value
    /// <paramref name="routeKey"/> or else by the body's string field <paramref name="bodyKey"/>. The actor is read
    /// before the handler runs: revoking one's own token must still name it. With <paramref name="bodyFields"/>, the
    /// detail lists the body's field names (never their values).
    /// </summary>
    public static RouteHandlerBuilder Audited(
        this RouteHandlerBuilder route, string action, string objectType, string? routeKey = null, string? bodyKey = null,
        bool bodyFields = false) =>
        route.AddEndpointFilter(async (context, next) =>
        {
            var http = context.HttpContext;
            var audit = http.RequestServices.GetRequiredService<AuditLog>();
            var actor = await audit.ActorAsync(http, http.RequestAborted);
            // A multipart upload is never buffered to be read twice: its handler names the object in ObjectIdItem.
            var readsBody = (bodyKey is not null || bodyFields) && !http.Request.HasFormContentType;
            if (readsBody)
            {
                http.Request.EnableBuffering();
            }
            var result = await next(context);
            if (!Succeeded(result))
            {
                return result;
            }
            var body = "";
            if (readsBody)
            {
                http.Request.Body.Position = 0;
                using var reader = new StreamReader(http.Request.Body, leaveOpen: true);
                body = await reader.ReadToEndAsync(CancellationToken.None);
            }
            var objectId = routeKey is not null ? http.Request.RouteValues[routeKey]?.ToString()
                : http.Items[ObjectIdItem] as string ?? AuditLog.StringField(body, bodyKey!);
            var detail = bodyFields ? AuditLog.FieldNames(body) : "";
            await audit.RecordAsync(actor, action, objectType, objectId, detail, CancellationToken.None);
            return result;
        });

    private static bool Succeeded(object? result)
    {
        while (result is INestedHttpResult nested)
        {
            result = nested.Result;
        }
        return result is IStatusCodeHttpResult { StatusCode: >= 200 and < 300 };
    }

    internal static async Task<IResult> ListAsync(
        string? user, string? action, string? @object, string? since, string? until, string? limit, string? before_id,
        LoraDeployDbContext db, CancellationToken ct)
    {
        var errors = new ValidationErrors();
        var sinceAt = ReadTime(since, "since", errors);
        var untilAt = ReadTime(until, "until", errors);
        var take = DefaultLimit;
        if (limit is not null && (!int.TryParse(limit, NumberStyles.None, CultureInfo.InvariantCulture, out take) || take is < 1 or > MaxLimit))
        {
            errors.Add(["query", "limit"], $"Input should be an integer between 1 and {MaxLimit}", "less_than_equal");
        }
        long? beforeId = null;
        if (before_id is not null)
        {
            if (long.TryParse(before_id, NumberStyles.None, CultureInfo.InvariantCulture, out var parsed) && parsed > 0)
            {
                beforeId = parsed;
            }
            else
            {
                errors.Add(["query", "before_id"], "Input should be a positive integer (an audit entry id)", "int_parsing");
            }
        }
        if (errors.Any)
        {
            return errors.ToResult();
        }

        var query = db.AuditEntries.AsNoTracking();
        if (!string.IsNullOrEmpty(user))
        {
            query = query.Where(e => e.UserName == user);
        }
        if (!string.IsNullOrEmpty(action))
        {
            query = query.Where(e => e.Action == action);
        }
        if (!string.IsNullOrEmpty(@object))
        {
            // An object's id or name, or its type (deploy, lora, token, user, export).
            query = query.Where(e => e.ObjectId == @object || e.ObjectType == @object);
        }
        if (sinceAt is { } from)
        {
            query = query.Where(e => e.At >= from);
        }
        if (untilAt is { } to)
        {
            query = query.Where(e => e.At < to);
        }
        if (beforeId is { } before)
        {
            query = query.Where(e => e.Id < before);
        }
        var rows = await query.OrderByDescending(e => e.Id).Take(take).ToListAsync(ct);
        var entries = rows.Select(e => new AuditEntryOut(
            e.Id, Timestamps.Format(e.At), e.UserName, e.TokenId, e.TokenLabel, e.Ip, e.Action, e.ObjectType, e.ObjectId, e.Detail)).ToList();
        return TypedResults.Json(entries, AuditJson.Context.ListAuditEntryOut);
    }

    private static DateTime? ReadTime(string? text, string name, ValidationErrors errors)
    {
        if (string.IsNullOrEmpty(text))
        {
            return null;
        }
        if (!DateTimeOffset.TryParse(text, CultureInfo.InvariantCulture, DateTimeStyles.AssumeUniversal, out var at))
        {
            errors.Add(["query", name], "Input should be an ISO-8601 time, like 2027-01-31T12:00:00+00:00", "datetime_parsing");
            return null;
        }
        return at.UtcDateTime;
    }
}

public sealed record AuditEntryOut(
    long Id, string At, string? User, string? TokenId, string? TokenLabel, string? Ip, string Action, string ObjectType,
    string? ObjectId, string Detail);

[JsonSourceGenerationOptions(
    JsonSerializerDefaults.Web,
    PropertyNamingPolicy = JsonKnownNamingPolicy.SnakeCaseLower,
    DefaultIgnoreCondition = JsonIgnoreCondition.Never)]
[JsonSerializable(typeof(List<AuditEntryOut>))]
public sealed partial class AuditJsonContext : JsonSerializerContext;

/// <summary>The audit route's serializer, configured like <see cref="ApiJson"/> (snake_case, readable).</summary>
internal static class AuditJson
{
    public static readonly AuditJsonContext Context = new(new JsonSerializerOptions(JsonSerializerDefaults.Web)
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping,
    });
}
