using System.Globalization;
using System.Text;
using Microsoft.AspNetCore.WebUtilities;

namespace LoraDeploy.Validation;

/// <summary>
/// <c>limit</c> and <c>after</c> on list routes: our extension, which DeepInfra's clients (sending neither) never see.
/// With either, a list is ordered by (created time, id), newest first, and holds at most <c>limit</c> items; when more
/// follow, the response carries <c>Link: &lt;…&amp;after=CURSOR&gt;; rel="next"</c>, so the body keeps the contract's
/// plain array. The cursor is opaque to clients: the last item's created time and id.
/// </summary>
public static class Paging
{
    public const int DefaultLimit = 100;
    public const int MaxLimit = 1000;

    public const string LimitDescription = "Extension: at most this many items (1-1000; 100 when only `after` is given). " +
        "With `limit` or `after` the list is paged; the next page's URL is in the `Link` header (rel=\"next\").";
    public const string AfterDescription = "Extension: the opaque cursor from the previous page's `Link` header.";

    /// <summary>Where a page starts: after the item with this created time and id (exclusive), or at the newest.</summary>
    public sealed record Page(int Limit, DateTime? AfterCreatedAt, string? AfterId);

    /// <summary>
    /// The page asked for; null when the request asks for the whole list. Bad values are recorded in
    /// <paramref name="errors"/>; with <paramref name="numericIds"/> (LoRA lists) a cursor whose id is no number is one.
    /// </summary>
    public static Page? Read(string? limit, string? after, ValidationErrors errors, bool numericIds = false)
    {
        if (limit is null && after is null)
        {
            return null;
        }
        var size = DefaultLimit;
        if (limit is not null && (!int.TryParse(limit, NumberStyles.None, CultureInfo.InvariantCulture, out size) || size is < 1 or > MaxLimit))
        {
            errors.Add(["query", "limit"], $"Input should be an integer from 1 to {MaxLimit}", "int_parsing");
        }
        DateTime? createdAt = null;
        string? id = null;
        if (after is not null && (!TryDecode(after, out createdAt, out id) || (numericIds && !long.TryParse(id, NumberStyles.None, CultureInfo.InvariantCulture, out _))))
        {
            errors.Add(["query", "after"], "Value error, after must be the cursor from a previous page's Link header", "value_error");
        }
        return errors.Any ? null : new Page(size, createdAt, id);
    }

    public static string Cursor(DateTime createdAt, string id) =>
        WebEncoders.Base64UrlEncode(Encoding.UTF8.GetBytes($"{createdAt.Ticks.ToString(CultureInfo.InvariantCulture)}.{id}"));

    public static string Cursor(DateTime createdAt, long id) => Cursor(createdAt, id.ToString(CultureInfo.InvariantCulture));

    private static bool TryDecode(string cursor, out DateTime? createdAt, out string? id)
    {
        createdAt = null;
        id = null;
        string text;
        try
        {
            text = Encoding.UTF8.GetString(WebEncoders.Base64UrlDecode(cursor));
        }
        catch (FormatException)
        {
            return false;
        }
        var dot = text.IndexOf('.', StringComparison.Ordinal);
        if (dot <= 0 || dot == text.Length - 1
            || !long.TryParse(text.AsSpan(0, dot), NumberStyles.None, CultureInfo.InvariantCulture, out var ticks)
            || ticks > DateTime.MaxValue.Ticks)
        {
            return false;
        }
        id = text[(dot + 1)..];
        if (!id.All(char.IsAsciiLetterOrDigit))
        {
            id = null;
            return false; // ids are letters and digits; anything else was not made here
        }
        createdAt = new DateTime(ticks, DateTimeKind.Utc);
        return true;
    }

    /// <summary>
    /// Sets <c>Link: &lt;this URL with after=CURSOR&gt;; rel="next"</c> when the page is full and more follow:
    /// <paramref name="fetched"/> is what the query returned for <c>limit + 1</c> rows.
    /// </summary>
    public static void LinkNext(HttpContext http, Page page, int fetched, Func<string> lastCursor)
    {
        if (fetched <= page.Limit)
        {
            return;
        }
        var query = QueryHelpers.ParseQuery(http.Request.QueryString.Value);
        query["limit"] = page.Limit.ToString(CultureInfo.InvariantCulture);
        query["after"] = lastCursor();
        var next = QueryHelpers.AddQueryString((http.Request.PathBase + http.Request.Path).ToString(), query);
        http.Response.Headers.Link = $"<{next}>; rel=\"next\"";
    }
}
