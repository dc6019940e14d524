using System.Net;
using System.Net.Http.Headers;
using System.Security.Cryptography;
using System.Text.Json;
using LoraDeploy.Data;
using LoraDeploy.Lora.Merge;
using LoraDeploy.Lora.Safetensors;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Exports;

/// <summary>
/// Export jobs end to end over HTTP against the real host: a LoRA imported through the CivitAI simulator is merged
/// into synthetic SDXL base weights on the host. Runs on SQLite and on PostgreSQL (see the two subclasses).
/// </summary>
public abstract class ExportJobTests(ExportFixture fixture)
{
    private LoraDeployServer Server => fixture.Server;

    private static async Task<JsonElement> PostExportAsync(TestUser user, string loraName, object? body = null)
    {
        var response = body is null
            ? await user.Client.PostAsync($"/v1/lora/{loraName}/export", content: null)
            : await user.Client.PostJsonAsync($"/v1/lora/{loraName}/export", body);
        var export = await response.ExpectAsync(HttpStatusCode.Accepted);
        Assert.Equal($"/v1/lora/{loraName}/export/{export.GetProperty("export_id").GetString()}", response.Headers.Location?.ToString());
        return export;
    }

    private async Task<(TestUser User, JsonElement Export, byte[] File)> DoneExportAsync(string loraName, object? body = null)
    {
        var user = await fixture.UserWithLoraAsync(loraName);
        var id = (await PostExportAsync(user, loraName, body)).GetProperty("export_id").GetString()!;
        var (export, _) = await ExportTestFiles.WaitAsync(user.Client, loraName, id);
        Assert.True(export.GetProperty("status").GetString() == "done", export.ToString());
        var file = await (await user.Client.GetAsync(export.GetProperty("download_url").GetString())).Content.ReadAsByteArrayAsync();
        return (user, export, file);
    }

    [Fact]
    public async Task An_export_merges_the_adapter_into_the_base_and_downloads_exactly_what_the_merge_library_writes()
    {
        var user = await fixture.UserWithLoraAsync("ink");
        var queued = await PostExportAsync(user, "ink", new { dtype = "bf16", strength = 0.75 });
        Assert.Equal("queued", queued.GetProperty("status").GetString());
        Assert.Equal("bf16", queued.GetProperty("dtype").GetString());
        Assert.Equal(0.75, queued.GetProperty("strength").GetDouble());
        Assert.Equal(JsonValueKind.Null, queued.GetProperty("download_url").ValueKind);
        var id = queued.GetProperty("export_id").GetString()!;

        var (export, seen) = await ExportTestFiles.WaitAsync(user.Client, "ink", id);
        Assert.True(export.GetProperty("status").GetString() == "done", export.ToString());
        Assert.Equal("", export.GetProperty("fail_reason").GetString());
        Assert.Equal(100, export.GetProperty("progress_percent").GetDouble());
        var size = export.GetProperty("size_bytes").GetInt64();
        Assert.Equal(size, export.GetProperty("bytes_done").GetInt64());
        Assert.Equal(size, export.GetProperty("bytes_total").GetInt64());
        Assert.True(export.GetProperty("tensors_total").GetInt32() == 16 && export.GetProperty("tensors_done").GetInt32() == 16, export.ToString());
        Assert.Equal(seen.Select(s => s.Done).Order(), seen.Select(s => s.Done)); // progress never goes back

        var response = await user.Client.GetAsync(export.GetProperty("download_url").GetString());
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        Assert.Equal("bytes", response.Headers.AcceptRanges.Single());
        Assert.Equal($"\"{export.GetProperty("sha256").GetString()}\"", response.Headers.ETag?.Tag);
        Assert.Equal("application/octet-stream", response.Content.Headers.ContentType?.MediaType);
        var downloaded = await response.Content.ReadAsByteArrayAsync();
        Assert.Equal(size, downloaded.LongLength);
        Assert.Equal(export.GetProperty("sha256").GetString(), Convert.ToHexStringLower(SHA256.HashData(downloaded)));

        // The same merge run directly: the adapter under its CivitAI file name (the merge record names it), same options.
        var scratch = Directory.CreateTempSubdirectory("export-direct-").FullName;
        try
        {
            var adapterPath = Path.Combine(scratch, "ink-style.safetensors");
            await File.WriteAllBytesAsync(adapterPath, fixture.Adapter);
            var expectedPath = Path.Combine(scratch, "expected.safetensors");
            LoraMerger.Merge(fixture.BasePath, [new MergeAdapter(adapterPath, 0.75)], expectedPath, new MergeOptions { OutputDtype = MergeDtype.BF16 });
            Assert.True((await File.ReadAllBytesAsync(expectedPath)).AsSpan().SequenceEqual(downloaded), "the download differs from a direct merge");

            var downloadedPath = Path.Combine(scratch, "downloaded.safetensors");
            await File.WriteAllBytesAsync(downloadedPath, downloaded);
            using var header = SafetensorsReader.ReadFile(downloadedPath);
            Assert.Equal("synthetic sdxl base", header.Metadata["modelspec.title"]);
            var record = JsonDocument.Parse(header.Metadata[LoraMerger.MergeRecordKey]).RootElement.EnumerateArray().Single();
            Assert.Equal(Convert.ToHexStringLower(SHA256.HashData(fixture.Adapter)), record.GetProperty("sha256").GetString());
            Assert.Equal(0.75, record.GetProperty("strength").GetDouble());
            Assert.All(header.Tensors, t => Assert.Equal("BF16", t.Dtype));
        }
        finally
        {
            Directory.Delete(scratch, recursive: true);
        }
        // Nothing but the finished file is left in the exports folder (no .part, no adapter copy).
        Assert.Equal([$"{id}.1.safetensors"], Directory.GetFileSystemEntries(fixture.ExportsFolder, $"{id}*").Select(Path.GetFileName));
    }

    [Fact]
    public async Task The_download_serves_ranges_with_206_and_refuses_an_unsatisfiable_range_with_416()
    {
        var (user, export, file) = await DoneExportAsync("ranged");
        var url = export.GetProperty("download_url").GetString();

        using var partial = new HttpRequestMessage(HttpMethod.Get, url);
        partial.Headers.Range = new RangeHeaderValue(100, 1099);
        var response = await user.Client.SendAsync(partial);
        Assert.Equal(HttpStatusCode.PartialContent, response.StatusCode);
        Assert.Equal("bytes", response.Headers.AcceptRanges.Single());
        Assert.Equal($"bytes 100-1099/{file.Length}", response.Content.Headers.ContentRange?.ToString());
        Assert.Equal(file.AsSpan(100, 1000).ToArray(), await response.Content.ReadAsByteArrayAsync());

        using var tail = new HttpRequestMessage(HttpMethod.Get, url);
        tail.Headers.Range = new RangeHeaderValue(null, 16);
        var tailResponse = await user.Client.SendAsync(tail);
        Assert.Equal(HttpStatusCode.PartialContent, tailResponse.StatusCode);
        Assert.Equal(file.AsSpan(file.Length - 16).ToArray(), await tailResponse.Content.ReadAsByteArrayAsync());

        using var beyond = new HttpRequestMessage(HttpMethod.Get, url);
        beyond.Headers.Range = new RangeHeaderValue(file.Length + 10, file.Length + 20);
        var refused = await user.Client.SendAsync(beyond);
        Assert.Equal(HttpStatusCode.RequestedRangeNotSatisfiable, refused.StatusCode);
        Assert.Equal($"bytes */{file.Length}", refused.Content.Headers.ContentRange?.ToString());
    }

    [Fact]
    public async Task Another_user_gets_404_on_every_export_route_and_lists_only_their_own()
    {
        var (owner, export, _) = await DoneExportAsync("private-merge");
        var id = export.GetProperty("export_id").GetString()!;
        var other = await fixture.UserWithLoraAsync("other-lora");
        var otherExport = (await PostExportAsync(other, "other-lora")).GetProperty("export_id").GetString()!;

        // Exactly what GET /v1/lora/{name} answers for someone else's LoRA.
        var loraAnswer = await (await other.Client.GetAsync("/v1/lora/private-merge")).ExpectErrorAsync(HttpStatusCode.NotFound);
        Assert.Equal(loraAnswer, await (await other.Client.PostAsync("/v1/lora/private-merge/export", null)).ExpectErrorAsync(HttpStatusCode.NotFound));
        Assert.Equal(loraAnswer, await (await other.Client.GetAsync("/v1/lora/private-merge/exports")).ExpectErrorAsync(HttpStatusCode.NotFound));
        foreach (var loraName in new[] { "private-merge", "other-lora" })
        {
            await (await other.Client.GetAsync($"/v1/lora/{loraName}/export/{id}")).ExpectErrorAsync(HttpStatusCode.NotFound);
            await (await other.Client.GetAsync($"/v1/lora/{loraName}/export/{id}/download")).ExpectErrorAsync(HttpStatusCode.NotFound);
            await (await other.Client.DeleteAsync($"/v1/lora/{loraName}/export/{id}")).ExpectErrorAsync(HttpStatusCode.NotFound);
        }
        await (await owner.Client.GetAsync($"/v1/lora/private-merge/export/{id}")).ExpectAsync(HttpStatusCode.OK); // still there

        var own = await (await other.Client.GetAsync("/v1/lora/other-lora/exports")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal([otherExport], own.EnumerateArray().Select(e => e.GetProperty("export_id").GetString()));
        var owners = await (await owner.Client.GetAsync("/v1/lora/private-merge/exports")).ExpectAsync(HttpStatusCode.OK);
        Assert.Equal([id], owners.EnumerateArray().Select(e => e.GetProperty("export_id").GetString()));
        await ExportTestFiles.WaitAsync(other.Client, "other-lora", otherExport);
    }

    [Fact]
    public async Task A_deleted_export_loses_its_file_and_row()
    {
        var (user, export, _) = await DoneExportAsync("short-lived");
        var id = export.GetProperty("export_id").GetString()!;
        Assert.True(File.Exists(Path.Combine(fixture.ExportsFolder, $"{id}.1.safetensors")));

        var deleted = await (await user.Client.DeleteAsync($"/v1/lora/short-lived/export/{id}")).ExpectAsync(HttpStatusCode.OK);
        Assert.True(deleted.GetProperty("deleted").GetBoolean());
        Assert.Empty(Directory.GetFileSystemEntries(fixture.ExportsFolder, $"{id}*"));
        await (await user.Client.GetAsync($"/v1/lora/short-lived/export/{id}")).ExpectErrorAsync(HttpStatusCode.NotFound);
        Assert.Empty((await (await user.Client.GetAsync("/v1/lora/short-lived/exports")).ExpectAsync(HttpStatusCode.OK)).EnumerateArray());
    }

    [Fact]
    public async Task Without_base_weights_on_the_host_the_export_is_refused_with_422_naming_the_setting()
    {
        var user = await fixture.UserWithLoraAsync("weightless", ExportFixture.WithoutWeights);
        var error = await (await user.Client.PostAsync("/v1/lora/weightless/export", null)).ExpectErrorAsync(HttpStatusCode.UnprocessableEntity);
        Assert.Contains($"BaseModels:{ExportFixture.WithoutWeights}:Weights", error);
        Assert.Empty((await (await user.Client.GetAsync("/v1/lora/weightless/exports")).ExpectAsync(HttpStatusCode.OK)).EnumerateArray());
    }

    [Fact]
    public async Task A_bad_dtype_or_strength_is_a_422_naming_the_field()
    {
        var user = await fixture.UserWithLoraAsync("picky");
        await (await user.Client.PostJsonAsync("/v1/lora/picky/export", new { dtype = "fp8" })).ExpectValidationErrorAsync("body", "dtype");
        await (await user.Client.PostJsonAsync("/v1/lora/picky/export", new { dtype = 16 })).ExpectValidationErrorAsync("body", "dtype");
        await (await user.Client.PostJsonAsync("/v1/lora/picky/export", new { strength = "strong" })).ExpectValidationErrorAsync("body", "strength");
        await (await user.Client.PostJsonAsync("/v1/lora/picky/export", new { strength = 1e9 })).ExpectValidationErrorAsync("body", "strength");
        await (await user.Client.PostAsync("/v1/lora/picky/export", HttpAssertions.Json("[1]"))).ExpectValidationErrorAsync("body");
        Assert.Empty((await (await user.Client.GetAsync("/v1/lora/picky/exports")).ExpectAsync(HttpStatusCode.OK)).EnumerateArray());
    }

    [Fact]
    public async Task An_export_of_a_lora_still_importing_is_a_409_naming_its_status()
    {
        var user = await Server.CreateUserAsync("impatient"); // first: without PostgreSQL this skips the test
        var slow = fixture.Simulator.AddLora(ExportTestFiles.SdxlAdapter(seed: 99), baseModel: "SDXL 1.0");
        slow.File.Faults.ChunkDelay = TimeSpan.FromSeconds(1);
        await (await user.Client.PostJsonAsync("/v1/lora/create", Pipeline.PipelineHarness.CreateBody("not-yet", Pipeline.PipelineHarness.ModelUrl(slow), ExportFixture.WithWeights)))
            .ExpectAsync(HttpStatusCode.OK);
        var error = await (await user.Client.PostAsync("/v1/lora/not-yet/export", null)).ExpectErrorAsync(HttpStatusCode.Conflict);
        Assert.Matches("is (initializing|downloading)", error);
        await user.Client.DeleteAsync("/v1/lora/not-yet");

        // Stored but refused at the gate (a FLUX.1 adapter on an SDXL base): its bytes are there, its import is not done.
        var flux = fixture.Simulator.AddLora(AdapterFiles.Flux1(seed: 98), baseModel: "Flux.1 D");
        var created = await (await user.Client.PostJsonAsync("/v1/lora/create", Pipeline.PipelineHarness.CreateBody("wrong-base", Pipeline.PipelineHarness.ModelUrl(flux), ExportFixture.WithWeights)))
            .ExpectAsync(HttpStatusCode.OK);
        var deployId = created.GetProperty("deploy_id").GetString()!;
        var deadline = DateTime.UtcNow.AddSeconds(60);
        while ((await (await user.Client.GetAsync($"/deploy/{deployId}")).ExpectAsync(HttpStatusCode.OK)).GetProperty("status").GetString() != "failed")
        {
            Assert.True(DateTime.UtcNow < deadline, "the FLUX.1 adapter was not refused on the SDXL base");
            await Task.Delay(50);
        }
        Assert.NotNull(await Server.QueryAsync(db => db.Loras.Where(l => l.Id == db.Deploys.Single(d => d.Id == deployId).LoraId).Select(l => l.AdapterSha256).SingleAsync()));
        Assert.Contains("is failed", await (await user.Client.PostAsync("/v1/lora/wrong-base/export", null)).ExpectErrorAsync(HttpStatusCode.Conflict));
    }

    [Fact]
    public async Task An_adapter_that_does_not_fit_the_base_fails_the_job_with_the_merge_library_reason()
    {
        var user = await fixture.UserWithLoraAsync("misfit", ExportFixture.OtherShapes);
        var id = (await PostExportAsync(user, "misfit")).GetProperty("export_id").GetString()!;
        var (export, _) = await ExportTestFiles.WaitAsync(user.Client, "misfit", id);
        Assert.True(export.GetProperty("status").GetString() == "failed", export.ToString());

        var scratch = Directory.CreateTempSubdirectory("export-misfit-").FullName;
        try
        {
            var adapterPath = Path.Combine(scratch, "ink-style.safetensors");
            await File.WriteAllBytesAsync(adapterPath, fixture.Adapter);
            var refused = Assert.Throws<LoraMergeException>(() => LoraMerger.Merge(fixture.OtherShapesPath, [new MergeAdapter(adapterPath)], Path.Combine(scratch, "out.safetensors")));
            // The library names the adapter by its file name, the same in both runs: the reason carries its sentence whole.
            var reason = export.GetProperty("fail_reason").GetString()!;
            Assert.Contains("do not fit the base tensor", refused.Message);
            Assert.Contains(refused.Message, reason);
        }
        finally
        {
            Directory.Delete(scratch, recursive: true);
        }
        Assert.Equal(JsonValueKind.Null, export.GetProperty("download_url").ValueKind);
        var error = await (await user.Client.GetAsync($"/v1/lora/misfit/export/{id}/download")).ExpectErrorAsync(HttpStatusCode.Conflict);
        Assert.Contains("failed", error);
        Assert.Empty(Directory.GetFileSystemEntries(fixture.ExportsFolder, $"{id}*"));
    }

    /// <summary>A running job whose runner died: its lease lapsed, <paramref name="attempts"/> starts so far.</summary>
    private async Task<string> InsertCrashedJobAsync(TestUser user, string loraName, int attempts)
    {
        var lora = await Server.QueryAsync(db => db.Loras.Where(l => l.Name == loraName && l.User!.Name == user.Name)
            .Select(l => new { l.Id, l.UserId, l.AdapterSha256, DeployId = db.Deploys.Where(d => d.LoraId == l.Id).Select(d => d.Id).First() }).FirstAsync());
        var now = DateTime.UtcNow;
        var id = "crashed" + Guid.NewGuid().ToString("N")[..5];
        await Server.QueryAsync(async db =>
        {
            db.ExportJobs.Add(new ExportJob
            {
                Id = id,
                UserId = lora.UserId,
                LoraId = lora.Id,
                DeployId = lora.DeployId,
                AdapterSha256 = lora.AdapterSha256!,
                BaseModel = ExportFixture.WithWeights,
                Format = "safetensors",
                Dtype = "base",
                Status = ExportJobStatus.Running,
                LeaseOwner = "dead-host:1:abcdef",
                LeaseExpiresAt = now.AddSeconds(-5),
                Attempts = attempts,
                TensorsDone = 3,
                TensorsTotal = 16,
                BytesDone = 1000,
                BytesTotal = 2000,
                CreatedAt = now.AddMinutes(-1),
                StartedAt = now.AddMinutes(-1),
            });
            return await db.SaveChangesAsync();
        });
        return id;
    }

    [Fact]
    public async Task A_job_whose_runner_died_at_every_start_fails_instead_of_looping()
    {
        var user = await fixture.UserWithLoraAsync("doomed");
        var id = await InsertCrashedJobAsync(user, "doomed", attempts: 3);
        var (export, _) = await ExportTestFiles.WaitAsync(user.Client, "doomed", id);
        Assert.True(export.GetProperty("status").GetString() == "failed", export.ToString());
        Assert.Contains("started 3 times", export.GetProperty("fail_reason").GetString());
    }

    [Fact]
    public async Task A_running_export_whose_runner_died_is_taken_up_again_once_its_lease_expires_and_finishes()
    {
        var user = await fixture.UserWithLoraAsync("phoenix");
        var id = await InsertCrashedJobAsync(user, "phoenix", attempts: 1);
        // What a runner that died mid-merge leaves besides its row: its adapter copy and a half-written .part.
        Directory.CreateDirectory(Path.Combine(fixture.ExportsFolder, $"{id}.1.adapter"));
        await File.WriteAllBytesAsync(Path.Combine(fixture.ExportsFolder, $"{id}.1.safetensors.part"), new byte[1000]);

        var (export, _) = await ExportTestFiles.WaitAsync(user.Client, "phoenix", id);
        Assert.True(export.GetProperty("status").GetString() == "done", export.ToString());
        var row = await Server.QueryAsync(db => db.ExportJobs.SingleAsync(j => j.Id == id));
        Assert.Equal(2, row.Attempts);
        Assert.Null(row.LeaseOwner);

        var downloaded = await (await user.Client.GetAsync(export.GetProperty("download_url").GetString())).Content.ReadAsByteArrayAsync();
        Assert.Equal(export.GetProperty("sha256").GetString(), Convert.ToHexStringLower(SHA256.HashData(downloaded)));
        // The dead start's leftovers are gone; only the new start's file is there.
        Assert.Equal([$"{id}.2.safetensors"], Directory.GetFileSystemEntries(fixture.ExportsFolder, $"{id}*").Select(Path.GetFileName));
        var (_, _, fresh) = await DoneExportAsync("phoenix-fresh");
        Assert.Equal(fresh, downloaded); // the same merge as an export that never crashed
    }
}

public sealed class SqliteExportJobTests(SqliteExportFixture fixture) : ExportJobTests(fixture), IClassFixture<SqliteExportFixture>;

public sealed class PostgresExportJobTests(PostgresExportFixture fixture) : ExportJobTests(fixture), IClassFixture<PostgresExportFixture>;
