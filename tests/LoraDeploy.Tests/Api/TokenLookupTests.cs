using System.Diagnostics;
using System.Net;
using LoraDeploy.Auth;
using Microsoft.EntityFrameworkCore.Diagnostics;

namespace LoraDeploy.Tests.Api;

/// <summary>
/// Token ids cannot be probed: an unknown id costs one database query, not one per try, and takes the same
/// comparison as a wrong secret (issue 16, finding 21).
/// </summary>
public sealed class TokenLookupTests(SqliteServerFixture fixture) : IClassFixture<SqliteServerFixture>
{
    private LoraDeployServer Server => fixture.Server;

    [Fact]
    public async Task An_unknown_token_id_is_looked_up_once_and_refused_like_a_wrong_secret()
    {
        var alice = await Server.CreateUserAsync("alice");
        var unknownId = ApiTokens.RandomId(12);
        var unknown = $"ld_{unknownId}_{TokenParts.Secret(alice.Token)}";
        using var queries = new CommandsWithParameter(unknownId);

        using var first = Server.CreateClient(unknown);
        var firstBody = await (await first.GetAsync("/deploy/list")).ExpectErrorAsync(HttpStatusCode.Unauthorized);
        Assert.Equal(1, queries.Count);
        using var second = Server.CreateClient(unknown);
        await (await second.GetAsync("/deploy/list")).ExpectErrorAsync(HttpStatusCode.Unauthorized);
        Assert.Equal(1, queries.Count); // remembered: the second try asked the database nothing

        var lastChar = alice.Token[^1] == 'A' ? 'B' : 'A';
        using var wrongSecret = Server.CreateClient(alice.Token[..^1] + lastChar);
        Assert.Equal(firstBody, await (await wrongSecret.GetAsync("/deploy/list")).ExpectErrorAsync(HttpStatusCode.Unauthorized));
        (await alice.Client.GetAsync("/deploy/list")).EnsureSuccessStatusCode();
    }

    [Fact]
    public void An_unknown_id_is_compared_against_a_hash_no_secret_has()
    {
        Assert.True(ApiTokens.TryParse($"ld_{ApiTokens.RandomId(12)}_{new string('s', 43)}", out var presented));

        Assert.True(ApiTokens.Verify(presented, presented.SecretHash));
        Assert.False(ApiTokens.Verify(presented, null)); // the unknown-id path: compared, and refused
        Assert.False(ApiTokens.Verify(presented, new byte[32]));
    }

    /// <summary>Counts the EF commands, of any server in this process, that carry <paramref name="value"/> as a parameter.</summary>
    private sealed class CommandsWithParameter : IObserver<DiagnosticListener>, IObserver<KeyValuePair<string, object?>>, IDisposable
    {
        private readonly string _value;
        private readonly IDisposable _all;
        private readonly List<IDisposable> _listeners = [];
        private int _count;

        public CommandsWithParameter(string value)
        {
            _value = value;
            _all = DiagnosticListener.AllListeners.Subscribe(this);
        }

        public int Count => Volatile.Read(ref _count);

        public void OnNext(DiagnosticListener listener)
        {
            if (listener.Name == Microsoft.EntityFrameworkCore.DbLoggerCategory.Name)
            {
                lock (_listeners)
                {
                    _listeners.Add(listener.Subscribe(this));
                }
            }
        }

        public void OnNext(KeyValuePair<string, object?> value)
        {
            if (value.Key == RelationalEventId.CommandExecuting.Name && value.Value is CommandEventData data
                && data.Command.Parameters.Cast<System.Data.Common.DbParameter>().Any(p => Equals(p.Value, _value)))
            {
                Interlocked.Increment(ref _count);
            }
        }

        public void OnCompleted()
        {
        }

        public void OnError(Exception error)
        {
        }

        public void Dispose()
        {
            _all.Dispose();
            lock (_listeners)
            {
                _listeners.ForEach(l => l.Dispose());
            }
        }
    }
}
