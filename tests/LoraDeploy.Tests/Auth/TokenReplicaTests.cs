using System.Globalization;
using System.Net;

namespace LoraDeploy.Tests.Auth;

/// <summary>
/// Two <c>loradeploy serve</c> processes on one PostgreSQL database: a token revoked through one replica is refused by
/// the other on its very next request, and an expiry is enforced by a replica that has just accepted the token.
/// </summary>
public sealed class TokenReplicaTests
{
    [Fact]
    public async Task A_token_revoked_on_replica_A_is_refused_by_replica_B_on_the_very_next_request()
    {
        await using var replicas = await PostgresReplicas.StartAsync();
        var alice = await replicas.CreateTokenAsync("alice");
        using var aliceOnA = replicas.A.CreateClient(alice);

        var created = await (await aliceOnA.PostJsonAsync("/v1/me/tokens", new { label = "on A" })).ExpectAsync(HttpStatusCode.OK);
        var token = created.GetProperty("token").GetString()!;
        using var onB = replicas.B.CreateClient(token);
        // Accepted by B, several times, so whatever B keeps about it is warm.
        for (var i = 0; i < 5; i++)
        {
            (await onB.GetAsync("/deploy/list")).EnsureSuccessStatusCode();
        }
        var listedOnB = await (await onB.GetAsync("/v1/me/tokens")).ExpectAsync(HttpStatusCode.OK);
        Assert.Contains(listedOnB.EnumerateArray(), t => t.GetProperty("label").GetString() == "on A" && t.GetProperty("current").GetBoolean());

        var revoked = await aliceOnA.DeleteAsync($"/v1/me/tokens/{created.GetProperty("id").GetString()}");
        Assert.Equal(HttpStatusCode.NoContent, revoked.StatusCode);
        await (await onB.GetAsync("/deploy/list")).ExpectErrorAsync(HttpStatusCode.Unauthorized);
        using var onA = replicas.A.CreateClient(token);
        await (await onA.GetAsync("/deploy/list")).ExpectErrorAsync(HttpStatusCode.Unauthorized);

        // The token that did the revoke still works on both.
        using var aliceOnB = replicas.B.CreateClient(alice);
        (await aliceOnB.GetAsync("/v1/me/tokens")).EnsureSuccessStatusCode();
    }

    [Fact]
    public async Task A_token_that_expires_is_refused_by_the_replica_that_just_accepted_it()
    {
        await using var replicas = await PostgresReplicas.StartAsync();
        var alice = await replicas.CreateTokenAsync("alice");
        using var aliceOnA = replicas.A.CreateClient(alice);
        // Both replicas answer once first, so B's first request (JIT, connection pool) is not what runs into the expiry.
        using (var aliceOnB = replicas.B.CreateClient(alice))
        {
            (await aliceOnB.GetAsync("/deploy/list")).EnsureSuccessStatusCode();
            (await aliceOnA.GetAsync("/deploy/list")).EnsureSuccessStatusCode();
        }

        var at = DateTime.UtcNow.AddSeconds(5).ToString("yyyy-MM-ddTHH:mm:ssZ", CultureInfo.InvariantCulture);
        var created = await (await aliceOnA.PostJsonAsync("/v1/me/tokens", new { expires_at = at })).ExpectAsync(HttpStatusCode.OK);
        var expiresAt = DateTime.Parse(created.GetProperty("expires_at").GetString()!, CultureInfo.InvariantCulture,
            DateTimeStyles.AdjustToUniversal | DateTimeStyles.AssumeUniversal);
        using var onB = replicas.B.CreateClient(created.GetProperty("token").GetString()!);
        (await onB.GetAsync("/deploy/list")).EnsureSuccessStatusCode();

        while (DateTime.UtcNow < expiresAt.AddMilliseconds(200))
        {
            await Task.Delay(200);
        }
        Assert.Equal("Token expired", await (await onB.GetAsync("/deploy/list")).ExpectErrorAsync(HttpStatusCode.Unauthorized));
    }
}
