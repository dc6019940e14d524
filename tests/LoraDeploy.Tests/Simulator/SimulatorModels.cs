using System.Security.Cryptography;

namespace LoraDeploy.Tests.Simulator;

/// <summary>A CivitAI model as the simulator serves it.</summary>
public sealed class SimModel
{
    internal SimModel(CivitaiSimulator sim, int id, string name, string type)
    {
        Simulator = sim;
        Id = id;
        Name = name;
        Type = type;
    }

    internal CivitaiSimulator Simulator { get; }
    public int Id { get; }
    public string Name { get; set; }
    /// <summary>CivitAI model type (<c>LORA</c>, <c>LoCon</c>, <c>DoRA</c>, <c>Checkpoint</c>, …).</summary>
    public string Type { get; set; }
    /// <summary>null, <c>Archived</c> or <c>TakenDown</c>.</summary>
    public string? Mode { get; set; }

    /// <summary>
    /// <c>allowCommercialUse</c> as served: by default the array-literal string CivitAI ships (<c>"{Image,RentCivit}"</c>);
    /// a test may set an older single string, a <c>string[]</c> (a JSON array) or null (field omitted).
    /// </summary>
    public object? AllowCommercialUse { get; set; } = "{Image,RentCivit}";
    public bool AllowDerivatives { get; set; } = true;
    public bool AllowDifferentLicense { get; set; } = true;
    public bool AllowNoCredit { get; set; } = true;
    /// <summary>The model-level NSFW level; by default the OR of its versions' levels, as CivitAI keeps it.</summary>
    public int? NsfwLevel { get; set; }
    /// <summary>The creator's username; null drops <c>creator</c> from the body, as for CivitAI's system user.</summary>
    public string? Creator { get; set; } = "simulated";
    /// <summary>Versions newest first (index 0 is the default the site shows).</summary>
    public List<SimVersion> Versions { get; } = [];

    /// <summary>Adds a version as the newest one.</summary>
    public SimVersion AddVersion(string baseModel = "SDXL 1.0", string? name = null, IEnumerable<string>? trainedWords = null, int? id = null)
    {
        var v = new SimVersion(this, id ?? Simulator.NextVersionId(), name ?? $"v{Versions.Count + 1}.0", baseModel)
        {
            TrainedWords = trainedWords?.ToList() ?? [],
        };
        lock (Simulator.Gate)
        {
            Versions.Insert(0, v);
        }
        return v;
    }
}

public sealed class SimVersion
{
    internal SimVersion(SimModel model, int id, string name, string baseModel)
    {
        Model = model;
        Id = id;
        Name = name;
        BaseModel = baseModel;
    }

    public SimModel Model { get; }
    public int Id { get; }
    public string Name { get; set; }
    public string BaseModel { get; set; }
    public string Status { get; set; } = "Published";
    public string Availability { get; set; } = "Public";
    /// <summary>0 means unrated: the version endpoint then answers 404, like CivitAI's.</summary>
    public int NsfwLevel { get; set; } = 1;
    public List<string> TrainedWords { get; set; } = [];
    public List<SimFile> Files { get; } = [];
    /// <summary>Creator requires a login to download (401 without a valid token).</summary>
    public bool RequireAuth { get; set; }
    /// <summary>Creator disabled downloads (401 with the "disabled downloads" message).</summary>
    public bool DownloadsDisabled { get; set; }
    /// <summary>Early access until this time (403 "Early Access" unless <see cref="EarlyAccessBought"/> and a valid token).</summary>
    public DateTimeOffset? EarlyAccessEndsAt { get; set; }
    public bool EarlyAccessBought { get; set; }
    public DateTimeOffset PublishedAt { get; set; } = DateTimeOffset.UtcNow;

    /// <summary>The primary file (or the first file when none is primary).</summary>
    public SimFile File => Files.FirstOrDefault(f => f.Primary) ?? Files[0];

    public string Air => $"urn:air:sdxl:lora:civitai:{Model.Id}@{Id}";

    public SimFile AddFile(byte[] content, string? name = null, string type = "Model", string? format = "SafeTensor", bool primary = false,
        string? size = null, string? fp = null)
    {
        var f = new SimFile(this, Model.Simulator.NextFileId(), name ?? $"file-{Files.Count + 1}.safetensors", content)
        {
            Type = type,
            Format = format,
            Primary = primary,
            Size = size,
            Fp = fp,
        };
        lock (Model.Simulator.Gate)
        {
            Files.Add(f);
        }
        return f;
    }

    /// <summary>Adds the Training Data zip CivitAI lists next to many LoRAs.</summary>
    public SimFile AddTrainingData(int bytes = 1024) =>
        AddFile(SimContent.Zip(bytes), $"{Model.Name.Replace(' ', '_')}_trainingData.zip", type: "Training Data", format: "Other");
}

public sealed class SimFile
{
    internal SimFile(SimVersion version, int id, string name, byte[] content)
    {
        Version = version;
        Id = id;
        Name = name;
        Content = content;
    }

    public SimVersion Version { get; }
    public int Id { get; }
    public string Name { get; set; }
    public byte[] Content { get; set; }
    public string Type { get; set; } = "Model";
    public bool Primary { get; set; }
    public string? Format { get; set; } = "SafeTensor";
    public string? Size { get; set; }
    public string? Fp { get; set; }
    public string PickleScanResult { get; set; } = "Success";
    public string VirusScanResult { get; set; } = "Success";
    /// <summary>Overrides the SHA-256 the API lists (to simulate a mismatch); null lists the real one.</summary>
    public string? ListedSha256 { get; set; }
    /// <summary>Overrides the listed size in KiB.</summary>
    public double? ListedSizeKB { get; set; }
    public SimFileFaults Faults { get; } = new();

    public string Sha256 => Convert.ToHexString(SHA256.HashData(Content)).ToLowerInvariant();

    /// <summary>CivitAI's link for exactly this file.</summary>
    public string DownloadPath => $"/api/download/models/{Version.Id}?fileId={Id}";
}

/// <summary>Faults injected for one file. Counters count down as they fire.</summary>
public sealed class SimFileFaults
{
    /// <summary>The download endpoint answers 429 (quota) this many times first.</summary>
    public int Download429Times { get; set; }
    /// <summary>Retry-After sent with the 429s/503s (seconds), if any.</summary>
    public int? RetryAfterSeconds { get; set; }
    /// <summary>The storage host answers 503 this many times first.</summary>
    public int Storage503Times { get; set; }
    /// <summary>The storage host drops the connection after sending this many body bytes …</summary>
    public long? DropAfterBytes { get; set; }
    /// <summary>… this many times.</summary>
    public int DropTimes { get; set; } = 1;
    /// <summary>The storage host serves an HTML page with 200 instead of the bytes.</summary>
    public bool ServeHtml { get; set; }
    /// <summary>Serve the HTML with <c>application/octet-stream</c>, so only sniffing the bytes can tell.</summary>
    public bool DisguiseHtml { get; set; }
    /// <summary>The download endpoint redirects here instead of to the storage host.</summary>
    public Uri? RedirectTo { get; set; }
    /// <summary>The storage host streams without Content-Length (chunked).</summary>
    public bool OmitContentLength { get; set; }
    /// <summary>The storage host ignores Range and always answers 200 with the whole file.</summary>
    public bool IgnoreRange { get; set; }
    /// <summary>The storage host pauses this long before each 64 KiB chunk (a slow or stalled link).</summary>
    public TimeSpan ChunkDelay { get; set; }
    /// <summary>Each signed link works this many times (0 = until it expires).</summary>
    public int SignedLinkUses { get; set; }
}

/// <summary>Byte contents for simulated files.</summary>
public static class SimContent
{
    /// <summary>A small valid safetensors file with one U8 tensor of <paramref name="tensorBytes"/> pseudo-random bytes.</summary>
    public static byte[] Safetensors(int tensorBytes = 64 * 1024, int seed = 1,
        string tensorName = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight")
    {
        var header = $"{{\"__metadata__\":{{\"ss_network_module\":\"networks.lora\"}},\"{tensorName}\":{{\"dtype\":\"U8\",\"shape\":[{tensorBytes}],\"data_offsets\":[0,{tensorBytes}]}}}}";
        var padded = header.PadRight((header.Length + 7) / 8 * 8);
        var headerBytes = System.Text.Encoding.UTF8.GetBytes(padded);
        var result = new byte[8 + headerBytes.Length + tensorBytes];
        BitConverter.TryWriteBytes(result.AsSpan(0, 8), (ulong)headerBytes.Length);
        headerBytes.CopyTo(result, 8);
        new Random(seed).NextBytes(result.AsSpan(8 + headerBytes.Length));
        return result;
    }

    public static byte[] Zip(int bytes)
    {
        var result = new byte[Math.Max(bytes, 4)];
        "PK\u0003\u0004"u8.CopyTo(result);
        return result;
    }
}
