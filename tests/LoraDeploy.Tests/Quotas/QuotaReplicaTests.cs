using System.Net;
using LoraDeploy.Auth;
using LoraDeploy.Data;
using LoraDeploy.Tests.Pipeline;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Quotas;

/// <summary>
/// Two <c>loradeploy serve</c> processes on one PostgreSQL database: parallel creates split over both cannot together
/// overshoot a user's quota, because the count and the insert are serialised on the user's row, not in a process.
/// </summary>
public sealed class QuotaReplicaTests
{
    [Fact]
    public async Task Twenty_parallel_creates_over_two_replicas_with_max_deploys_5_accept_exactly_5()
    {
        await using var replicas = await Replicas.StartAsync(new Dictionary<string, string?> { ["Quotas:MaxDeploys"] = "5" });
        var token = await replicas.CreateTokenAsync("alice");
        using var onA = replicas.A.CreateClient(token);
        using var onB = replicas.B.CreateClient(token);

        var responses = await Task.WhenAll(Enumerable.Range(0, 20).Select(i =>
            (i % 2 == 0 ? onA : onB).PostJsonAsync("/v1/lora/create",
                PipelineHarness.CreateBody($"parallel-{i}", $"https://civitai.com/models/1?modelVersionId={i + 1}"))));

        var statuses = responses.Select(r => r.StatusCode).ToList();
        Assert.True(statuses.Count(s => s == HttpStatusCode.OK) == 5, string.Join(", ", statuses));
        Assert.Equal(15, statuses.Count(s => s == HttpStatusCode.Forbidden));
        await using var db = replicas.OpenDatabase();
        Assert.Equal(5, await db.Deploys.CountAsync(TestContext.Current.CancellationToken));
        var quota = await (await onB.GetAsync("/v1/me/quota")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal(5, quota.GetProperty("deploys").GetInt32());
    }

    /// <summary>A throwaway PostgreSQL database with two replicas on it (pipeline off: only the create path is under test).</summary>
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

        public static async Task<Replicas> StartAsync(IDictionary<string, string?> extra)
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
            foreach (var (key, value) in extra)
            {
                settings[key] = value;
            }
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

        public PostgresLoraDeployContext OpenDatabase()
        {
            var options = new DbContextOptionsBuilder<PostgresLoraDeployContext>();
            DatabaseExtensions.ConfigurePostgres(options, ConnectionString);
            return new PostgresLoraDeployContext(options.Options);
        }

        public async Task<string> CreateTokenAsync(string user)
        {
            await using var db = OpenDatabase();
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
