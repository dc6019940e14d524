using System.Net.Sockets;
using Microsoft.AspNetCore.Diagnostics;
using Microsoft.Data.Sqlite;
using Npgsql;

namespace LoraDeploy;

/// <summary>Every error the framework itself produces is DeepInfra-shaped: <c>{"error": …}</c>, never a stack trace.</summary>
public static class ErrorHandling
{
    public static WebApplication UseDeepErrors(this WebApplication app)
    {
        app.UseExceptionHandler(error => error.Run(async context =>
        {
            var exception = context.Features.Get<IExceptionHandlerFeature>()?.Error;
            if (exception is not null && DatabaseUnavailable(exception) is { } reason)
            {
                context.Response.StatusCode = StatusCodes.Status503ServiceUnavailable;
                context.Response.Headers.RetryAfter = RetryAfterSeconds.ToString(System.Globalization.CultureInfo.InvariantCulture);
                await context.Response.WriteAsJsonAsync(new DeepError($"database unavailable ({reason}); try again shortly"), ApiJson.Context.DeepError);
                return;
            }
            var (status, message) = exception switch
            {
                BadHttpRequestException bad => (bad.StatusCode, bad.StatusCode == StatusCodes.Status413PayloadTooLarge
                    ? "Request body too large." : "Bad request."),
                OperationCanceledException => (499, "Request cancelled."),
                _ => (StatusCodes.Status500InternalServerError, "Internal server error."),
            };
            context.Response.StatusCode = status;
            await context.Response.WriteAsJsonAsync(new DeepError(message), ApiJson.Context.DeepError);
        }));
        app.UseStatusCodePages(async context =>
        {
            var response = context.HttpContext.Response;
            if (response.HasStarted || response.ContentLength > 0 || response.ContentType is not null)
            {
                return;
            }
            var message = response.StatusCode switch
            {
                StatusCodes.Status404NotFound => "Not found",
                StatusCodes.Status405MethodNotAllowed => "Method not allowed",
                StatusCodes.Status415UnsupportedMediaType => "Unsupported media type",
                _ => $"HTTP {response.StatusCode}",
            };
            await response.WriteAsJsonAsync(new DeepError(message), ApiJson.Context.DeepError);
        });
        return app;
    }

    /// <summary>What a client should wait before asking again while the database is out.</summary>
    public const int RetryAfterSeconds = 5;

    /// <summary>
    /// Why the database cannot serve the request, when that is the failure: a server that is unreachable or a file that
    /// cannot be written (read-only, full, I/O error) is an outage to retry later (503), not a bug (500). EF wraps the
    /// provider's exception (DbUpdateException, the retry strategy's InvalidOperationException), so the chain is walked.
    /// </summary>
    internal static string? DatabaseUnavailable(Exception exception)
    {
        for (var e = exception; e is not null; e = e.InnerException)
        {
            switch (e)
            {
                case SqliteException sqlite when sqlite.SqliteErrorCode is SqliteBusy or SqliteReadOnly or SqliteIoError
                    or SqliteFull or SqliteCantOpen:
                    return sqlite.SqliteErrorCode switch
                    {
                        SqliteBusy => "the database file is locked",
                        SqliteReadOnly => "the database file cannot be written",
                        SqliteFull => "the disk holding the database is full",
                        SqliteCantOpen => "the database file cannot be opened",
                        _ => "the database file cannot be read or written",
                    };
                // Transient: connection refused or lost, server shutting down or out of connections.
                case NpgsqlException { IsTransient: true }:
                case SocketException:
                    return "the database server cannot be reached";
            }
        }
        return null;
    }

    // SQLite's primary result codes (sqlite3.h).
    private const int SqliteBusy = 5;
    private const int SqliteReadOnly = 8;
    private const int SqliteIoError = 10;
    private const int SqliteFull = 13;
    private const int SqliteCantOpen = 14;
}
