using System.Net;
using System.Net.Http.Headers;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using LoraDeploy.Lora.Tests.Support;
using LoraDeploy.Storage;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Tests.Pipeline;

/// <summary><c>source.type: "upload"</c>: multipart creates against the real host, real files, the CivitAI simulator for comparison.</summary>
public sealed class UploadTests
{
    private const string Flux = PipelineHarness.Flux;

    public static string CreateJson(string name, string baseModel = Flux, string type = "upload") =>
        JsonSerializer.Serialize(new { lora_name = name, base_model = baseModel, source = new { type }, @private = true });

    public static MultipartFormDataContent Form(string? json, byte[]? file, string fileName = "my-lora.safetensors", bool fileFirst = false)
    {
        var form = new MultipartFormDataContent();
        var jsonPart = json is null ? null : new StringContent(json, Encoding.UTF8, "application/json");
        var filePart = file is null ? null : new ByteArrayContent(file);
        if (fileFirst && filePart is not null)
        {
            form.Add(filePart, "file", fileName);
        }
        if (jsonPart is not null)
        {
            form.Add(jsonPart, "json");
        }
        if (!fileFirst && filePart is not null)
        {
            form.Add(filePart, "file", fileName);
        }
        return form;
    }

    public static async Task<JsonElement> UploadAsync(PipelineHarness h, string name, byte[] file, string baseModel = Flux)
    {
        var response = await h.User.Client.PostAsync("/v1/lora/create", Form(CreateJson(name, baseModel), file), TestContext.Current.CancellationToken);
        return await response.ExpectAsync(HttpStatusCode.OK);
    }

    private static string Sha(byte[] bytes) => Convert.ToHexStringLower(SHA256.HashData(bytes));

    private static string[] StagingFiles(PipelineHarness h) => Directory.GetFiles(Path.Combine(h.Server.DataDir, "blobs", "staging"));

    [Fact]
    public async Task An_upload_reaches_the_state_a_civitai_import_of_the_same_file_reaches_and_shares_its_blob()
    {
        await using var h = await PipelineHarness.StartAsync();
        var content = AdapterFiles.Flux1(seed: 31);
        var version = h.Simulator.AddLora(content, baseModel: "Flux.1 D");

        var uploaded = await UploadAsync(h, "uploaded", content);
        Assert.Equal("uploaded", uploaded.GetProperty("model_name").GetString()!.Split('/')[1]);
        var fromUpload = await h.WaitAsync(uploaded.GetProperty("deploy_id").GetString()!);
        var fromCivitai = await h.CreateAndWaitAsync("imported", PipelineHarness.ModelUrl(version));

        fromUpload.AssertDeploying();
        fromCivitai.AssertDeploying();
        Assert.Equal(Sha(content), fromUpload.GetProperty("version").GetString());
        Assert.Equal(fromCivitai.GetProperty("version").GetString(), fromUpload.GetProperty("version").GetString());
        var lora = await h.LoraAsync("uploaded");
        var civitaiLora = await h.LoraAsync("imported");
        Assert.Equal(civitaiLora.GetProperty("probe").GetRawText(), lora.GetProperty("probe").GetRawText());
        Assert.Equal(content.Length, lora.GetProperty("size_bytes").GetInt64());
        // The CivitAI import found the uploaded bytes stored: one blob, under its SHA-256, never downloaded.
        Assert.Equal(0, h.Simulator.DownloadsStarted(version.File.Id));
        Assert.Equal([Sha(content)], await h.Server.QueryAsync(db => db.Blobs.Select(b => b.Sha256).ToListAsync()));
        var stored = Path.Combine(h.Server.DataDir, "blobs", "sha256", Sha(content)[..2], Sha(content));
        Assert.Equal(content, await File.ReadAllBytesAsync(stored, TestContext.Current.CancellationToken));
        var row = await h.Server.QueryAsync(db => db.Loras.FirstAsync(l => l.Name == "uploaded"));
        Assert.Equal(("upload", $"upload:{Sha(content)}", "my-lora.safetensors"), (row.SourceType, row.SourceUrl, row.FileName));
        Assert.Empty(StagingFiles(h));
    }

    [Fact]
    public async Task The_same_file_uploaded_twice_is_one_blob_and_two_loras()
    {
        await using var h = await PipelineHarness.StartAsync();
        var content = AdapterFiles.Flux1(seed: 32);

        var first = await UploadAsync(h, "once", content);
        var second = await UploadAsync(h, "twice", content);

        (await h.WaitAsync(first.GetProperty("deploy_id").GetString()!)).AssertDeploying();
        (await h.WaitAsync(second.GetProperty("deploy_id").GetString()!)).AssertDeploying();
        Assert.Equal(1, await h.Server.QueryAsync(db => db.Blobs.CountAsync()));
        Assert.Equal(2, await h.Server.QueryAsync(db => db.Loras.CountAsync(l => l.AdapterSha256 == Sha(content))));
        Assert.Single(Directory.GetFiles(Path.Combine(h.Server.DataDir, "blobs", "sha256"), "*", SearchOption.AllDirectories));
        // Audited like a JSON create, without the form being buffered to be read again.
        Assert.Equal(["once", "twice"], await h.Server.QueryAsync(db => db.AuditEntries.Where(e => e.Action == "create").OrderBy(e => e.Id).Select(e => e.ObjectId!).ToListAsync()));
    }

    [Fact]
    public async Task An_announced_length_over_the_cap_is_413_without_reading_the_body()
    {
        const int cap = 1024 * 1024;
        await using var h = await PipelineHarness.StartAsync(settings: new Dictionary<string, string?> { ["Import:MaxFileBytes"] = cap.ToString() });
        var file = new byte[3 * cap];
        AdapterFiles.Flux1(seed: 42).CopyTo(file, 0);

        var response = await h.User.Client.PostAsync("/v1/lora/create", Form(CreateJson("announced"), file), TestContext.Current.CancellationToken);

        Assert.Contains($"Import:MaxFileBytes ({cap} bytes)", await response.ExpectErrorAsync(HttpStatusCode.RequestEntityTooLarge));
        Assert.Empty(StagingFiles(h));
        Assert.Equal(0, await h.Server.QueryAsync(db => db.Loras.CountAsync()));
    }

    private static string T(string dtype, string shape, long begin, long end) =>
        $$"""{"dtype":"{{dtype}}","shape":{{shape}},"data_offsets":[{{begin}},{{end}}]}""";

    /// <summary>The hostile files of the reader's and the downloader's suites, each with (part of) the reason it must be refused with.</summary>
    public static TheoryData<string, byte[], string, string> HostileFiles()
    {
        var flux = AdapterFiles.Flux1(seed: 33);
        var headerLengthOverflow = new byte[64];
        BitConverter.TryWriteBytes(headerLengthOverflow.AsSpan(0, 8), ulong.MaxValue);
        var giantHeader = new byte[4096];
        BitConverter.TryWriteBytes(giantHeader.AsSpan(0, 8), 200L * 1024 * 1024);
        "{\"a\":"u8.CopyTo(giantHeader.AsSpan(8));
        byte[] pickle = [0x80, 0x02, .. "}q\x00(X\x05\x00\x00\x00state"u8, .. new byte[600]];
        byte[] torchZip = [.. "PK\x03\x04"u8, .. new byte[26], .. "archive/data.pkl"u8, .. new byte[600]];
        var nonLora = new SafetensorsWriter()
            .Tensor("model.diffusion_model.input_blocks.0.0.weight", "F16", [320, 4, 3, 3])
            .Tensor("model.diffusion_model.out.2.weight", "F16", [4, 320, 3, 3])
            .ToBytes();
        return new()
        {
            { "pickle", pickle, "lora.ckpt", "PickleTensor" },
            { "torch-zip", torchZip, "lora.pt", "PyTorch checkpoint" },
            { "empty", [], "empty.safetensors", "empty" },
            { "truncated", flux[..(flux.Length / 2)], "cut.safetensors", "not a valid safetensors file" },
            { "header-length-overflow", headerLengthOverflow, "overflow.safetensors", "not a valid safetensors file" },
            { "giant-header", giantHeader, "giant.safetensors", "not a valid safetensors file" },
            { "overlapping", SafetensorsWriter.RawFile($$"""{"b":{{T("U8", "[2]", 1, 3)}},"a":{{T("U8", "[2]", 0, 2)}}}""", 3), "overlap.safetensors", "overlap" },
            { "not-a-lora", nonLora, "unet.safetensors", "not a LoRA adapter" },
            { "wrong-architecture", AdapterFiles.Sdxl(seed: 33), "sdxl.safetensors", "This LoRA targets" },
        };
    }

    [Theory]
    [MemberData(nameof(HostileFiles))]
    public async Task A_hostile_file_is_refused_with_its_reason_and_nothing_is_stored(string name, byte[] file, string fileName, string reason)
    {
        await using var h = await PipelineHarness.StartAsync();

        var response = await h.User.Client.PostAsync("/v1/lora/create", Form(CreateJson(name), file, fileName), TestContext.Current.CancellationToken);

        var error = await response.ExpectErrorAsync(HttpStatusCode.UnprocessableEntity);
        Assert.Contains(reason, error);
        Assert.Contains(fileName, error);
        Assert.Contains("not stored", error);
        Assert.Equal(0, await h.Server.QueryAsync(db => db.Blobs.CountAsync()));
        Assert.Equal(0, await h.Server.QueryAsync(db => db.Loras.CountAsync()));
        Assert.False(Directory.Exists(Path.Combine(h.Server.DataDir, "blobs", "sha256")));
        Assert.Empty(StagingFiles(h));
    }

    [Fact]
    public async Task Bad_forms_are_422_naming_the_part_or_field()
    {
        await using var h = await PipelineHarness.StartAsync();
        var file = AdapterFiles.Flux1(seed: 34);
        var client = h.User.Client;
        var ct = TestContext.Current.CancellationToken;

        await (await client.PostAsync("/v1/lora/create", Form("{not json", file), ct)).ExpectValidationErrorAsync("body", 1);
        await (await client.PostAsync("/v1/lora/create", Form("""{"lora_name":"x","source":{"type":"upload"},"private":true}""", file), ct))
            .ExpectValidationErrorAsync("body", "base_model");
        await (await client.PostAsync("/v1/lora/create", Form(CreateJson("bad name!"), file), ct)).ExpectValidationErrorAsync("body", "lora_name");
        await (await client.PostAsync("/v1/lora/create", Form(CreateJson("civit", type: "civitai"), file), ct)).ExpectValidationErrorAsync("body", "source", "type");
        await (await client.PostAsync("/v1/lora/create", Form(CreateJson("nofile"), null), ct)).ExpectValidationErrorAsync("body", "file");
        await (await client.PostAsync("/v1/lora/create", Form(null, file), ct)).ExpectValidationErrorAsync("body", "json");
        var misordered = await (await client.PostAsync("/v1/lora/create", Form(CreateJson("order"), file, fileFirst: true), ct)).ExpectValidationErrorAsync("body", "json");
        Assert.Contains("before the file part", misordered.GetProperty("msg").GetString());
        // The JSON create names the multipart form when it is asked for an upload.
        await (await client.PostJsonAsync("/v1/lora/create", new { lora_name = "json", base_model = Flux, source = new { type = "upload" }, @private = true }))
            .ExpectValidationErrorAsync("body", "source", "type");

        Assert.Equal(0, await h.Server.QueryAsync(db => db.Blobs.CountAsync()));
        Assert.Equal(0, await h.Server.QueryAsync(db => db.Loras.CountAsync()));
        Assert.Empty(StagingFiles(h));
    }

    [Fact]
    public async Task A_name_in_use_is_409_and_the_file_is_not_stored()
    {
        await using var h = await PipelineHarness.StartAsync();
        await UploadAsync(h, "taken", AdapterFiles.Flux1(seed: 35));

        var again = await h.User.Client.PostAsync("/v1/lora/create", Form(CreateJson("taken"), AdapterFiles.Flux1(seed: 36)), TestContext.Current.CancellationToken);

        Assert.Contains("taken", await again.ExpectErrorAsync(HttpStatusCode.Conflict));
        Assert.Equal(1, await h.Server.QueryAsync(db => db.Blobs.CountAsync()));
    }

    [Fact]
    public async Task A_policy_rule_that_needs_license_terms_refuses_an_upload_before_its_file_is_read()
    {
        await using var h = await PipelineHarness.StartAsync(settings: new Dictionary<string, string?> { ["Policy:RequireCommercialUse"] = "image" });

        var response = await h.User.Client.PostAsync("/v1/lora/create", Form(CreateJson("licensed"), AdapterFiles.Flux1(seed: 37)), TestContext.Current.CancellationToken);

        var error = await response.ExpectErrorAsync(HttpStatusCode.UnprocessableEntity);
        Assert.Contains("Policy:RequireCommercialUse", error);
        Assert.Contains("uploaded file carries no CivitAI license", error);
        Assert.Equal(0, await h.Server.QueryAsync(db => db.Blobs.CountAsync()));
        Assert.Equal(1, await h.Server.QueryAsync(db => db.AuditEntries.CountAsync(e => e.Action == "policy.refused" && e.ObjectId == "licensed")));
    }

    [Fact]
    public async Task The_same_upload_with_the_same_idempotency_key_is_the_same_deploy()
    {
        await using var h = await PipelineHarness.StartAsync();
        var content = AdapterFiles.Flux1(seed: 38);
        async Task<string> SendAsync()
        {
            using var request = new HttpRequestMessage(HttpMethod.Post, "/v1/lora/create") { Content = Form(CreateJson("again"), content) };
            request.Headers.Add("Idempotency-Key", "upload-38");
            var created = await (await h.User.Client.SendAsync(request, TestContext.Current.CancellationToken)).ExpectAsync(HttpStatusCode.OK);
            return created.GetProperty("deploy_id").GetString()!;
        }

        Assert.Equal(await SendAsync(), await SendAsync());
        Assert.Equal(1, await h.Server.QueryAsync(db => db.Loras.CountAsync()));
        Assert.Equal(1, await h.Server.QueryAsync(db => db.Blobs.CountAsync()));
    }

    [Fact]
    public async Task A_policy_tightened_after_an_upload_refuses_its_start()
    {
        await using var h = await PipelineHarness.StartAsync();
        var deployId = (await UploadAsync(h, "later", AdapterFiles.Flux1(seed: 39))).GetProperty("deploy_id").GetString()!;
        (await h.WaitAsync(deployId)).AssertDeploying();
        await (await h.User.Client.PostAsync($"/deploy/{deployId}/stop", null, TestContext.Current.CancellationToken)).ExpectAsync(HttpStatusCode.OK);

        h.Server.ChangeSetting("Policy:MaxNsfwLevel", "R");
        await h.Server.RestartAsync();
        var client = h.Server.CreateClient(h.User.Token);

        var error = await (await client.PostAsync($"/deploy/{deployId}/start", null, TestContext.Current.CancellationToken)).ExpectErrorAsync(HttpStatusCode.BadRequest);
        Assert.Contains("Policy:MaxNsfwLevel is R, this model has no NSFW rating", error);
    }

    [Fact]
    public async Task Starting_a_failed_upload_whose_blob_is_gone_fails_with_upload_missing()
    {
        await using var h = await PipelineHarness.StartAsync();
        var content = AdapterFiles.Flux1(seed: 40);
        var deployId = (await UploadAsync(h, "gone", content)).GetProperty("deploy_id").GetString()!;
        (await h.WaitAsync(deployId)).AssertDeploying();
        // Failed for some other reason, then its bytes went (removed by hand here; the collector would do the same).
        await h.Server.QueryAsync(db => db.Deploys.Where(d => d.Id == deployId).ExecuteUpdateAsync(set => set.SetProperty(d => d.Status, "failed")));
        Assert.True(h.Server.Services.GetRequiredService<IBlobStore>().Delete(Sha(content)));

        await (await h.User.Client.PostAsync($"/deploy/{deployId}/start", null, TestContext.Current.CancellationToken)).ExpectAsync(HttpStatusCode.OK);

        var reason = (await h.WaitAsync(deployId)).AssertFailed();
        Assert.Contains("my-lora.safetensors", reason);
        Assert.Contains("upload it again", reason);
    }

    [Fact]
    public async Task An_upload_over_the_cap_is_answered_413_before_the_client_has_sent_it_all()
    {
        const int cap = 1024 * 1024;
        await using var h = await PipelineHarness.StartAsync(settings: new Dictionary<string, string?> { ["Import:MaxFileBytes"] = cap.ToString() });

        var (status, body, sent) = await SlowUploadAsync(h, CreateJson("huge"), total: 64L * 1024 * 1024, pauseAfter: cap + 2 * 1024 * 1024);

        Assert.Equal(413, status);
        Assert.Contains($"Import:MaxFileBytes ({cap} bytes)", body);
        Assert.True(sent < 16L * 1024 * 1024, $"The client got {sent} bytes through: the server kept reading past the cap.");
        Assert.Empty(StagingFiles(h));
        Assert.Equal(0, await h.Server.QueryAsync(db => db.Loras.CountAsync()));
    }

    [Fact]
    public async Task A_client_that_hangs_up_mid_file_leaves_no_staging_file_and_no_lora()
    {
        await using var h = await PipelineHarness.StartAsync();

        await SlowUploadAsync(h, CreateJson("abandoned"), total: 64L * 1024 * 1024, pauseAfter: 2 * 1024 * 1024, hangUp: true);

        await ImportPipelineTests.WaitUntilAsync(() => Task.FromResult(StagingFiles(h).Length == 0));
        Assert.Equal(0, await h.Server.QueryAsync(db => db.Loras.CountAsync()));
        Assert.Equal(0, await h.Server.QueryAsync(db => db.Blobs.CountAsync()));
    }

    [Fact]
    public async Task A_bad_json_part_is_answered_before_the_file_is_sent()
    {
        await using var h = await PipelineHarness.StartAsync();

        var (status, body, _) = await SlowUploadAsync(h, CreateJson("bad name!"), total: 64L * 1024 * 1024, pauseAfter: 2 * 1024 * 1024);

        Assert.Equal(422, status);
        Assert.Contains("lora_name", body);
        Assert.Empty(StagingFiles(h));
    }

    /// <summary>
    /// Streams a multipart upload over a raw socket (chunked, so no Content-Length gives the size away): the json part,
    /// then a file part of <paramref name="total"/> bytes that starts like a safetensors file. After
    /// <paramref name="pauseAfter"/> bytes the client stops writing and the answer must already be on its way; then
    /// it tries to send the rest, which a server that stopped reading refuses. Returns the status, the body and how many
    /// file bytes the client managed to write.
    /// </summary>
    private static async Task<(int Status, string Body, long Sent)> SlowUploadAsync(PipelineHarness h, string json, long total, long pauseAfter, bool hangUp = false)
    {
        var ct = TestContext.Current.CancellationToken;
        using var socket = new TcpClient();
        await socket.ConnectAsync(h.Server.BaseUrl.Host, h.Server.BaseUrl.Port, ct);
        var stream = socket.GetStream();
        const string boundary = "upload-boundary-7f3a";
        var head = Encoding.ASCII.GetBytes(
            $"POST /v1/lora/create HTTP/1.1\r\nHost: {h.Server.BaseUrl.Authority}\r\nAuthorization: Bearer {h.User.Token}\r\n" +
            $"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n");
        await stream.WriteAsync(head, ct);
        async Task ChunkAsync(ReadOnlyMemory<byte> data)
        {
            await stream.WriteAsync(Encoding.ASCII.GetBytes($"{data.Length:x}\r\n"), ct);
            await stream.WriteAsync(data, ct);
            await stream.WriteAsync("\r\n"u8.ToArray(), ct);
        }
        await ChunkAsync(Encoding.UTF8.GetBytes(
            $"--{boundary}\r\nContent-Disposition: form-data; name=\"json\"\r\nContent-Type: application/json\r\n\r\n{json}\r\n" +
            $"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"huge.safetensors\"\r\nContent-Type: application/octet-stream\r\n\r\n"));
        var block = new byte[64 * 1024];
        SafetensorsWriter.RawFile("""{"__metadata__":{"format":"pt"}}       """).CopyTo(block, 0);
        long sent = 0;
        while (sent < pauseAfter)
        {
            await ChunkAsync(block);
            sent += block.Length;
        }

        if (hangUp)
        {
            // Only once the server is writing the staging file, so the test sees it go rather than never come.
            await ImportPipelineTests.WaitUntilAsync(() => Task.FromResult(StagingFiles(h).Length > 0));
            socket.Client.Close(0);
            return (0, "", sent);
        }

        // The client pauses: the answer must be there without another byte sent.
        using var answerTimeout = CancellationTokenSource.CreateLinkedTokenSource(ct);
        answerTimeout.CancelAfter(TimeSpan.FromSeconds(20));
        var response = new StringBuilder();
        var buffer = new byte[16 * 1024];
        int status;
        while (true)
        {
            var read = await stream.ReadAsync(buffer, answerTimeout.Token);
            Assert.True(read > 0, $"The server closed the connection without an answer: {response}");
            response.Append(Encoding.UTF8.GetString(buffer, 0, read));
            var text = response.ToString();
            var end = text.IndexOf("\r\n\r\n", StringComparison.Ordinal);
            if (end > 0 && text.Contains('}', StringComparison.Ordinal))
            {
                status = int.Parse(text.Split(' ')[1]);
                break;
            }
        }

        // Then it tries to send the rest: a server that stopped reading closes the connection long before the end.
        try
        {
            while (sent < total)
            {
                await ChunkAsync(block);
                sent += block.Length;
            }
        }
        catch (IOException)
        {
        }
        return (status, response.ToString(), sent);
    }
}

/// <summary>Uploads with <c>Storage:Provider=s3</c> against s3rver: the blob lands in the bucket once, however often it is uploaded.</summary>
public sealed class UploadS3Tests : IAsyncLifetime
{
    private S3TestServer _s3 = null!;
    private PipelineHarness _h = null!;

    public async ValueTask InitializeAsync()
    {
        _s3 = await S3TestServer.StartAsync();
        _h = await PipelineHarness.StartAsync(settings: _s3.Settings(prefix: "up"));
    }

    public async ValueTask DisposeAsync()
    {
        if (_h is not null)
        {
            await _h.DisposeAsync();
        }
        if (_s3 is not null)
        {
            await _s3.DisposeAsync();
        }
    }

    [Fact]
    public async Task Two_uploads_of_the_same_file_are_one_object_in_the_bucket_and_two_deploying_loras()
    {
        var content = AdapterFiles.Flux1(seed: 41, rank: 16);
        var sha = Convert.ToHexStringLower(SHA256.HashData(content));

        var first = await UploadTests.UploadAsync(_h, "s3-once", content);
        var second = await UploadTests.UploadAsync(_h, "s3-twice", content);

        (await _h.WaitAsync(first.GetProperty("deploy_id").GetString()!)).AssertDeploying();
        (await _h.WaitAsync(second.GetProperty("deploy_id").GetString()!)).AssertDeploying();
        Assert.Equal([$"up/sha256/{sha[..2]}/{sha}"], await _s3.KeysAsync());
        Assert.Equal([sha], await _h.Server.QueryAsync(db => db.Blobs.Select(b => b.Sha256).ToListAsync()));
        var local = Path.Combine(_h.Server.DataDir, "blobs");
        Assert.False(Directory.Exists(Path.Combine(local, "sha256")));
        Assert.Empty(Directory.GetFiles(Path.Combine(local, "staging")));
        var store = _h.Server.Services.GetRequiredService<IBlobStore>();
        await using var stored = await store.OpenReadAsync(sha, ct: TestContext.Current.CancellationToken);
        Assert.Equal(sha, Convert.ToHexStringLower(await SHA256.HashDataAsync(stored!, TestContext.Current.CancellationToken)));
    }
}

/// <summary><c>loradeploy create --file</c>: the real client uploads a local file to a real server (its own process).</summary>
public sealed class UploadCliTests(LoraDeploy.Tests.Dashboard.E2eEnvironment env) : IClassFixture<LoraDeploy.Tests.Dashboard.E2eEnvironment>, IAsyncLifetime
{
    public async ValueTask InitializeAsync() => await env.StartAsync();

    public ValueTask DisposeAsync() => ValueTask.CompletedTask;

    [Fact]
    public async Task Create_with_a_file_uploads_it_and_follows_the_deploy()
    {
        var folder = Directory.CreateTempSubdirectory("upload-cli-");
        try
        {
            var content = AdapterFiles.Flux1(seed: 52);
            var path = Path.Combine(folder.FullName, "local lora.safetensors");
            await File.WriteAllBytesAsync(path, content, TestContext.Current.CancellationToken);

            var result = await env.CliAsync("create", "--file", path, "--base", LoraDeploy.Tests.Dashboard.E2eEnvironment.Flux, "--name", "cli-upload");

            Assert.True(result.ExitCode == 0, result.ToString());
            Assert.Contains($"created {env.User}/cli-upload deploy ", result.StdOut);
            var lora = await env.GetJsonAsync("v1/lora/cli-upload");
            Assert.Equal(content.Length, lora.GetProperty("size_bytes").GetInt64());
            Assert.Equal("upload", lora.GetProperty("source").GetProperty("type").GetString());
            Assert.Equal("local lora.safetensors", await env.Server.QueryAsync(db => db.Loras.Where(l => l.Name == "cli-upload").Select(l => l.FileName).FirstAsync()));

            var missing = await env.CliAsync("create", "--file", Path.Combine(folder.FullName, "nope.safetensors"), "--base", LoraDeploy.Tests.Dashboard.E2eEnvironment.Flux, "--name", "cli-missing");
            Assert.Equal(2, missing.ExitCode);
            Assert.Contains("no such file", missing.StdErr);
        }
        finally
        {
            folder.Delete(recursive: true);
        }
    }
}
