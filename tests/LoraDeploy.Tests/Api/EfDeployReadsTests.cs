using System.Net;
using LoraDeploy.Data;
using LoraDeploy.Deploys;
using Microsoft.AspNetCore.Http;

namespace LoraDeploy.Tests.Api;

/// <summary>
/// <c>Deploy:Reads=ef</c> (plain EF, kept to measure the special read path against) answers exactly what the SQL
/// path answers: the same bytes for a deploy, for the list and for a filtered list, and 404 for someone else's.
/// </summary>
public sealed class EfDeployReadsTests
{
    [Fact]
    public async Task The_EF_reads_answer_the_same_bytes_as_the_SQL_reads()
    {
        await using var server = await LoraDeployServer.StartAsync(TestDatabase.Sqlite, new Dictionary<string, string?>(ServerFixture.ControlPlaneOnly)
        {
            ["Deploy:Reads"] = "ef",
        });
        Assert.IsType<EfDeployReads>(server.Services.GetRequiredService<DeployReads>());
        var alice = await server.CreateUserAsync("alice");
        var bob = await server.CreateUserAsync("bob");
        var ids = new List<string>();
        foreach (var name in new[] { "first", "second", "third \"quoted\" é" })
        {
            var created = await (await alice.Client.PostJsonAsync("/v1/lora/create", new
            {
                lora_name = name.Split(' ')[0],
                base_model = "black-forest-labs/FLUX-1-dev",
                source = new { type = "civitai", civit_url = "https://civitai.com/models/5?modelVersionId=6" },
                @private = true,
            })).ExpectAsync(HttpStatusCode.OK);
            ids.Add(created.GetProperty("deploy_id").GetString()!);
        }
        (await alice.Client.PostAsync($"/deploy/{ids[1]}/stop", null)).Dispose();

        using var sql = new SqliteDeployReads(DatabaseExtensions.SqliteConnectionString(server.Services.GetRequiredService<IConfiguration>()));
        var aliceId = await server.QueryAsync(db => Microsoft.EntityFrameworkCore.EntityFrameworkQueryableExtensions
            .SingleAsync(db.Users.Where(u => u.Name == alice.Name).Select(u => u.Id)));
        foreach (var id in ids)
        {
            var expected = (await sql.ByIdAsync(id, aliceId, CancellationToken.None))!.Utf8.ToArray();
            Assert.Equal(System.Text.Encoding.UTF8.GetString(expected), await alice.Client.GetStringAsync($"/deploy/{id}"));
            await (await bob.Client.GetAsync($"/deploy/{id}")).ExpectErrorAsync(HttpStatusCode.NotFound);
        }
        Assert.Equal(await ListAsync(sql, aliceId, null), await alice.Client.GetStringAsync("/deploy/list"));
        Assert.Equal(await ListAsync(sql, aliceId, ["stopped", "deploying"]), await alice.Client.GetStringAsync("/deploy/list?status=stopped,deploying"));
        Assert.Equal("[]", await bob.Client.GetStringAsync("/deploy/list"));
    }

    private static async Task<string> ListAsync(DeployReads reads, long userId, IReadOnlyCollection<string>? statuses)
    {
        var http = new DefaultHttpContext();
        using var body = new MemoryStream();
        http.Response.Body = body;
        await new DeployListJson(reads, userId, statuses).ExecuteAsync(http);
        await http.Response.BodyWriter.FlushAsync();
        return System.Text.Encoding.UTF8.GetString(body.ToArray());
    }
}
