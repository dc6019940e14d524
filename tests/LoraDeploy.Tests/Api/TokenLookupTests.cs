using System.Collections.Concurrent;
using System.Data.Common;
using System.Net;
using LoraDeploy.Auth;
using LoraDeploy.Data;
using Microsoft.EntityFrameworkCore;
using Microsoft.EntityFrameworkCore.Diagnostics;

namespace LoraDeploy.Tests.Api;

/// <summary>
/// Token ids cannot be probed: an unknown id costs one database query, not one per try, and takes the same
/// comparison as a wrong secret (issue 16, finding 21).
/// </summary>
public sealed class TokenLookupTests
{
    private static readonly Dictionary<string, string?> PipelineOff = new() { ["Pipeline:Enabled"] = "false" };

    [Fact]
    public async Task An_unknown_token_id_is_looked_up_once_and_refused_like_a_wrong_secret()
    {
        var commands = new CommandParameters();
        await using var server = await LoraDeployServer.StartAsync(settings: PipelineOff, configure: builder =>
            builder.Services.ConfigureDbContext<SqliteLoraDeployContext>(db => db.AddInterceptors(commands)));
        var token = await server.CreateTokenAsync("alice");
        var unknownId = ApiTokens.RandomId(12);
        var unknown = $"ld_{unknownId}_{TokenParts.Secret(token)}";

        using var first = server.CreateClient(unknown);
        var firstBody = await (await first.GetAsync("/deploy/list")).ExpectErrorAsync(HttpStatusCode.Unauthorized);
        Assert.Equal(1, commands.Count(unknownId));
        using var second = server.CreateClient(unknown);
        await (await second.GetAsync("/deploy/list")).ExpectErrorAsync(HttpStatusCode.Unauthorized);
        Assert.Equal(1, commands.Count(unknownId)); // remembered: the second try asked the database nothing

        var lastChar = token[^1] == 'A' ? 'B' : 'A';
        using var wrongSecret = server.CreateClient(token[..^1] + lastChar);
        Assert.Equal(firstBody, await (await wrongSecret.GetAsync("/deploy/list")).ExpectErrorAsync(HttpStatusCode.Unauthorized));
        using var alice = server.CreateClient(token);
        (await alice.GetAsync("/deploy/list")).EnsureSuccessStatusCode();
    }

    [Fact]
    public void An_unknown_id_is_compared_against_a_hash_no_secret_has()
    {
        Assert.True(ApiTokens.TryParse($"ld_{ApiTokens.RandomId(12)}_{new string('s', 43)}", out var presented));

        Assert.True(ApiTokens.Verify(presented, presented.SecretHash));
        Assert.False(ApiTokens.Verify(presented, null)); // the unknown-id path: compared, and refused
        Assert.False(ApiTokens.Verify(presented, new byte[32]));
    }

    /// <summary>Counts, per string parameter value, the queries EF sends.</summary>
    private sealed class CommandParameters : DbCommandInterceptor
    {
        private readonly ConcurrentDictionary<string, int> _seen = new();

        public int Count(string value) => _seen.GetValueOrDefault(value);

        public override InterceptionResult<DbDataReader> ReaderExecuting(DbCommand command, CommandEventData eventData, InterceptionResult<DbDataReader> result)
        {
            Record(command);
            return result;
        }

        public override ValueTask<InterceptionResult<DbDataReader>> ReaderExecutingAsync(
            DbCommand command, CommandEventData eventData, InterceptionResult<DbDataReader> result, CancellationToken cancellationToken = default)
        {
            Record(command);
            return ValueTask.FromResult(result);
        }

        private void Record(DbCommand command)
        {
            foreach (var parameter in command.Parameters.Cast<DbParameter>())
            {
                if (parameter.Value is string text)
                {
                    _seen.AddOrUpdate(text, 1, (_, count) => count + 1);
                }
            }
        }
    }
}
