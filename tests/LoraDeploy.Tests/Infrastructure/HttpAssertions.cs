using System.Net;
using System.Net.Http.Json;
using System.Text;
using System.Text.Json;

namespace LoraDeploy.Tests;

public static class HttpAssertions
{
    public static StringContent Json(string json) => new(json, Encoding.UTF8, "application/json");

    public static StringContent Json(object value) => Json(JsonSerializer.Serialize(value));

    /// <summary>Asserts the status and returns the body as JSON.</summary>
    public static async Task<JsonElement> ExpectAsync(this HttpResponseMessage response, HttpStatusCode status)
    {
        var body = await response.Content.ReadAsStringAsync();
        Assert.True(response.StatusCode == status, $"Expected {(int)status} {status}, got {(int)response.StatusCode}: {body}");
        Assert.StartsWith("application/json", response.Content.Headers.ContentType?.MediaType ?? "");
        return JsonDocument.Parse(body).RootElement.Clone();
    }

    /// <summary>Asserts a DeepInfra <c>{"error": …}</c> body with the given status; returns the message.</summary>
    public static async Task<string> ExpectErrorAsync(this HttpResponseMessage response, HttpStatusCode status)
    {
        var json = await response.ExpectAsync(status);
        ContractSchema.AssertMatches("DeepError", json);
        return json.GetProperty("error").GetString()!;
    }

    /// <summary>Asserts a FastAPI 422 that names <paramref name="loc"/>; returns that detail item.</summary>
    public static async Task<JsonElement> ExpectValidationErrorAsync(this HttpResponseMessage response, params object[] loc)
    {
        var json = await response.ExpectAsync(HttpStatusCode.UnprocessableEntity);
        ContractSchema.AssertMatches("HTTPValidationError", json);
        var wanted = JsonSerializer.Serialize(loc);
        var match = json.GetProperty("detail").EnumerateArray()
            .FirstOrDefault(d => d.GetProperty("loc").GetRawText().Replace(" ", "") == wanted);
        Assert.True(match.ValueKind == JsonValueKind.Object, $"No validation error at {wanted} in {json}");
        Assert.False(string.IsNullOrWhiteSpace(match.GetProperty("msg").GetString()));
        return match;
    }

    public static Task<HttpResponseMessage> PostJsonAsync(this HttpClient client, string url, object body) =>
        client.PostAsync(url, Json(body));
}
