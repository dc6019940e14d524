using System.Net;
using System.Text.Json;
using LoraDeploy.Data;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Api;

/// <summary><c>limit</c>/<c>after</c> on the lists: an extension DeepInfra clients never notice (issue 16, finding 12).</summary>
public abstract partial class ControlPlaneTests
{
    /// <summary>Follows <c>Link: rel="next"</c> from <paramref name="first"/>; returns every item's id, page by page.</summary>
    private static async Task<List<List<string>>> WalkPagesAsync(HttpClient client, string first, string idField)
    {
        var pages = new List<List<string>>();
        for (string? url = first; url is not null;)
        {
            var response = await client.GetAsync(url);
            var page = await response.ExpectAsync(HttpStatusCode.OK);
            pages.Add(page.EnumerateArray().Select(item => item.GetProperty(idField).GetString()!).ToList());
            url = response.Headers.TryGetValues("Link", out var links) ? NextOf(links.Single()) : null;
            Assert.True(pages.Count < 100, "the pages never end");
        }
        return pages;
    }

    private static string NextOf(string link)
    {
        Assert.EndsWith("; rel=\"next\"", link);
        return link[(link.IndexOf('<') + 1)..link.IndexOf('>')];
    }

    private static List<string> Ids(JsonElement list, string idField) =>
        list.EnumerateArray().Select(item => item.GetProperty(idField).GetString()!).ToList();

    [Fact]
    public async Task Deploy_list_pages_follow_the_Link_header_through_every_deploy_once()
    {
        var alice = await Server.CreateUserAsync("alice");
        var ids = new List<string>();
        for (var i = 0; i < 7; i++)
        {
            ids.Add((await CreateAsync(alice, $"paged-{i}")).GetProperty("deploy_id").GetString()!);
        }
        // Three share one created time: the id breaks the tie, so no deploy is skipped or shown twice at a page edge.
        var stamp = new DateTime(2026, 5, 1, 8, 0, 0, DateTimeKind.Utc).AddTicks(1234560);
        for (var i = 0; i < ids.Count; i++)
        {
            var id = ids[i];
            var createdAt = i < 3 ? stamp : stamp.AddSeconds(i);
            await Server.QueryAsync(db => db.Deploys.Where(d => d.Id == id).ExecuteUpdateAsync(set => set.SetProperty(d => d.CreatedAt, createdAt)));
        }
        await SetStatusAsync(ids[6], DeployStatus.Deleted);

        var whole = await alice.Client.GetAsync("/deploy/list");
        Assert.False(whole.Headers.Contains("Link")); // a DeepInfra client sees what it always saw
        var expected = Ids(await whole.ExpectAsync(HttpStatusCode.OK), "deploy_id");
        Assert.Equal(6, expected.Count);

        var pages = await WalkPagesAsync(alice.Client, "/deploy/list?limit=2", "deploy_id");
        Assert.Equal([2, 2, 2], pages.Select(p => p.Count));
        Assert.Equal(expected, pages.SelectMany(p => p));

        // The filter travels in the next link.
        var filtered = await WalkPagesAsync(alice.Client, "/deploy/list?status=initializing,deleted&limit=4", "deploy_id");
        Assert.Equal([4, 3], filtered.Select(p => p.Count));
        Assert.Contains(ids[6], filtered.SelectMany(p => p));

        // Pages have the contract's shape: a plain array of DeploymentOut, equal to the unpaged items.
        var page = await (await alice.Client.GetAsync("/deploy/list?limit=6")).ExpectAsync(HttpStatusCode.OK);
        ContractSchema.AssertArrayOf("DeploymentOut", page);
        Assert.Equal((await (await alice.Client.GetAsync("/deploy/list")).ExpectAsync(HttpStatusCode.OK)).GetRawText(), page.GetRawText());
    }

    [Fact]
    public async Task Lora_lists_page_with_limit_and_after()
    {
        var alice = await Server.CreateUserAsync("alice");
        for (var i = 0; i < 5; i++)
        {
            await CreateAsync(alice, $"lora-page-{i}", isPrivate: false);
        }
        var stamp = new DateTime(2026, 6, 1, 8, 0, 0, DateTimeKind.Utc);
        await Server.QueryAsync(db => db.Loras.Where(l => l.Name == "lora-page-1" || l.Name == "lora-page-2")
            .ExecuteUpdateAsync(set => set.SetProperty(l => l.CreatedAt, stamp)));

        foreach (var (route, idField) in new[]
                 {
                     ("/v1/user/loras", "deploy_id"), ($"/v1/model/{Flux}/loras", "deploy_id"), ("/models/lora/list", "model_name"),
                 })
        {
            var whole = await alice.Client.GetAsync(route);
            Assert.False(whole.Headers.Contains("Link"));
            var expected = Ids(await whole.ExpectAsync(HttpStatusCode.OK), idField);
            var pages = await WalkPagesAsync(alice.Client, $"{route}?limit=2", idField);
            Assert.All(pages.SkipLast(1), p => Assert.Equal(2, p.Count));
            Assert.Equal(expected, pages.SelectMany(p => p));
        }
    }

    [Theory]
    [InlineData("/deploy/list", "limit=0", "limit")]
    [InlineData("/deploy/list", "limit=1001", "limit")]
    [InlineData("/deploy/list", "limit=two", "limit")]
    [InlineData("/deploy/list", "after=not-a-cursor", "after")]
    [InlineData("/deploy/list", "after=MTIzLmFiYwA", "after")] // "123.abc\0": a NUL would reach the database
    [InlineData("/v1/user/loras", "limit=-1", "limit")]
    [InlineData("/v1/user/loras", "after=MTIzLmFiYw", "after")] // "123.abc": a deploy's cursor, not a LoRA's
    [InlineData("/models/lora/list", "after=%%%", "after")]
    public async Task Bad_paging_parameters_are_a_422_naming_the_field(string route, string query, string field)
    {
        var alice = await Server.CreateUserAsync("alice");
        var response = await alice.Client.GetAsync($"{route}?{query}");
        await response.ExpectValidationErrorAsync("query", field);
    }

    [Fact]
    public async Task The_openapi_document_describes_the_paging_parameters()
    {
        using var anonymous = Server.CreateClient();
        var document = await (await anonymous.GetAsync("/openapi/v1.json")).ExpectAsync(HttpStatusCode.OK);
        foreach (var (path, method) in new[] { ("/deploy/list", "get"), ("/v1/user/loras", "get"), ("/models/lora/list", "get") })
        {
            var parameters = document.GetProperty("paths").GetProperty(path).GetProperty(method).GetProperty("parameters");
            foreach (var name in new[] { "limit", "after" })
            {
                var parameter = parameters.EnumerateArray().Single(p => p.GetProperty("name").GetString() == name);
                Assert.Equal("query", parameter.GetProperty("in").GetString());
                Assert.Contains("Extension", parameter.GetProperty("description").GetString());
            }
        }
    }
}
