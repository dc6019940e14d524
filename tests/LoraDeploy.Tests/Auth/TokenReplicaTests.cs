using System.Globalization;
using System.Net;
using LoraDeploy.Auth;
using LoraDeploy.Data;
using Microsoft.EntityFrameworkCore;

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
        await using var replicas = await Replicas.StartAsync();
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
        await using var replicas = await Replicas.StartAsync();
        using var aliceOnA = replicas.A.CreateClient(await replicas.CreateTokenAsync("alice"));

        var at = DateTime.UtcNow.AddSeconds(3).ToString("yyyy-MM-ddTHH:mm:ssZ", CultureInfo.InvariantCulture);
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

    /// <summary>A throwaway PostgreSQL database with two replicas on it (pipeline off: only the API is under test).</summary>
    private sealed class Replicas : IAsyncDisposable
    {
        private readonly string _root;

        private Replicas(string connectionString, string root, ServerProcess a, ServerProcess b)
        {
            ConnectionString = connectionString;
            _root = root;
            A = a;
            B = b;
        }

        public string ConnectionString { get; }
        public ServerProcess A { get; }
        public ServerProcess B { get; }

        public static async Task<Replicas> StartAsync()
        {
            var connectionString = await TestBackend.CreatePostgresDatabaseAsync();
            var root = Path.Combine(Path.GetTempPath(), "loradeploy-tests", Guid.NewGuid().ToString("N"));
            var settings = new Dictionary<string, string?>
            {
                ["Database:Provider"] = "postgres",
                ["ConnectionStrings:Postgres"] = connectionString,
                ["Pipeline:Enabled"] = "false",
                ["Storage:Path"] = Path.Combine(root, "blobs"),
                ["Logging:LogLevel:Default"] = "Warning",
            };
            var dirs = new[] { Path.Combine(root, "a"), Path.Combine(root, "b") };
            foreach (var dir in dirs)
            {
                Directory.CreateDirectory(dir);
            }
            var starts = dirs.Select(dir => ServerProcess.StartAsync(dir, settings)).ToArray();
            try
            {
                await Task.WhenAll(starts);
            }
            catch
            {
                foreach (var start in starts.Where(s => s.IsCompletedSuccessfully))
                {
                    await start.Result.DisposeAsync();
                }
                await TestBackend.DropPostgresDatabaseAsync(connectionString);
                throw;
            }
            return new Replicas(connectionString, root, starts[0].Result, starts[1].Result);
        }

        public async Task<string> CreateTokenAsync(string user)
        {
            var options = new DbContextOptionsBuilder<PostgresLoraDeployContext>();
            DatabaseExtensions.ConfigurePostgres(options, ConnectionString);
            await using var db = new PostgresLoraDeployContext(options.Options);
            return await ApiTokens.CreateForUserAsync(db, user, isAdmin: false, "test", DateTime.UtcNow, CancellationToken.None);
        }

        public async ValueTask DisposeAsync()
        {
            await A.DisposeAsync();
            await B.DisposeAsync();
            await TestBackend.DropPostgresDatabaseAsync(ConnectionString);
            try
            {
                Directory.Delete(_root, recursive: true);
            }
            catch (IOException)
            {
            }
        }
    }
}
