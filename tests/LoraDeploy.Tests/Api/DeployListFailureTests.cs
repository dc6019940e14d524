using System.Net;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Api;

/// <summary>
/// The deploy reads write JSON while they read rows, so a row that cannot be read must still end in an ordinary error
/// response, not a cut connection. SQLite only: it stores timestamps as text, which a damaged or hand-edited database
/// can hold in a form the reads refuse (PostgreSQL's timestamptz cannot).
/// </summary>
public sealed class DeployListFailureTests
{
    [Fact]
    public async Task A_row_the_reads_cannot_render_answers_500_with_an_error_body()
    {
        await using var server = await LoraDeployServer.StartAsync(TestDatabase.Sqlite, ServerFixture.ControlPlaneOnly);
        var alice = await server.CreateUserAsync("alice");
        var ids = new List<string>();
        foreach (var name in new[] { "fine", "damaged" })
        {
            var created = await (await alice.Client.PostJsonAsync("/v1/lora/create", new
            {
                lora_name = name,
                base_model = "black-forest-labs/FLUX-1-dev",
                source = new { type = "civitai", civit_url = "https://civitai.com/models/5?modelVersionId=6" },
                @private = true,
            })).ExpectAsync(HttpStatusCode.OK);
            ids.Add(created.GetProperty("deploy_id").GetString()!);
        }

        var whole = await alice.Client.GetAsync("/deploy/list");
        await whole.ExpectAsync(HttpStatusCode.OK);
        Assert.NotEqual(true, whole.Headers.TransferEncodingChunked); // one chunk: sent whole, with its length

        await server.QueryAsync(db => db.Database.ExecuteSqlAsync($"UPDATE deploys SET \"CreatedAt\" = 'yesterday' WHERE \"Id\" = {ids[1]}"));

        var list = await alice.Client.GetAsync("/deploy/list");
        var error = await list.ExpectAsync(HttpStatusCode.InternalServerError);
        Assert.Equal("Internal server error.", error.GetProperty("error").GetString());
        var one = await alice.Client.GetAsync($"/deploy/{ids[1]}");
        Assert.Equal("Internal server error.", (await one.ExpectAsync(HttpStatusCode.InternalServerError)).GetProperty("error").GetString());
        await (await alice.Client.GetAsync($"/deploy/{ids[0]}")).ExpectAsync(HttpStatusCode.OK);
    }
}
