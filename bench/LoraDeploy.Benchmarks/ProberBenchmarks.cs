using System.Text.Json;
using BenchmarkDotNet.Attributes;
using LoraDeploy.Lora;
using LoraDeploy.Lora.Safetensors;

namespace LoraDeploy.Benchmarks;

/// <summary>Probing a 2,000-tensor kohya SDXL header against merely parsing the same header bytes with JsonDocument.</summary>
[MemoryDiagnoser]
public class ProberBenchmarks
{
    private byte[] _headerJson = [];
    private MemoryStream _file = new();

    internal MemoryStream File => _file;

    internal byte[] HeaderJson => _headerJson;

    /// <summary>Sorted is how real files list their tensors; module order is kept for comparison.</summary>
    [Params(TensorOrder.Sorted, TensorOrder.ModuleOrder)]
    public TensorOrder Order { get; set; } = TensorOrder.Sorted;

    [GlobalSetup]
    public void Setup()
    {
        var (head, dataLength) = KohyaSdxlHeader.Build(rank: 4, scaleWidth: w => w, Order);
        _headerJson = head[8..];
        var bytes = new byte[head.Length + dataLength];
        head.CopyTo(bytes, 0);
        _file = new MemoryStream(bytes, writable: false);
    }

    [Benchmark(Baseline = true, Description = "JsonDocument.Parse(header)")]
    public int JsonDocumentParse()
    {
        using var doc = JsonDocument.Parse(_headerJson);
        return (int)doc.RootElement.ValueKind;
    }

    // Both disposed, as production uses them (like JsonDocument, the header's tables go back to the shared pools).
    [Benchmark(Description = "SafetensorsReader.Read")]
    public int Read()
    {
        using var header = SafetensorsReader.Read(_file);
        return header.TensorCount;
    }

    [Benchmark(Description = "Read + LoraProber.Probe")]
    public int ReadAndProbe()
    {
        using var header = SafetensorsReader.Read(_file);
        return LoraProber.Probe(header, _file).ModuleCount;
    }
}

/// <summary>The same 2,000-tensor layout as a 1 GB sparse file and as a 1 MB file: probing cost must not depend on data size.</summary>
[MemoryDiagnoser]
public class FileSizeBenchmarks
{
    private string _dir = "";
    private string _small = "";
    private string _large = "";

    [GlobalSetup]
    public void Setup()
    {
        _dir = Path.Combine(Path.GetTempPath(), "loradeploy-bench-" + Environment.ProcessId);
        Directory.CreateDirectory(_dir);
        // Rank 1 with widths divided by 8 gives ~1 MB; rank 200 with real widths gives ~1 GB.
        _small = Write("small.safetensors", KohyaSdxlHeader.Build(rank: 1, scaleWidth: w => w / 8));
        _large = Write("large.safetensors", KohyaSdxlHeader.Build(rank: 200, scaleWidth: w => w));
    }

    [GlobalCleanup]
    public void Cleanup() => Directory.Delete(_dir, recursive: true);

    private string Write(string name, (byte[] Head, long DataLength) file)
    {
        var path = Path.Combine(_dir, name);
        using var stream = File.Create(path);
        stream.Write(file.Head);
        stream.SetLength(file.Head.Length + file.DataLength);
        Console.WriteLine($"// {name}: {new FileInfo(path).Length:N0} bytes");
        return path;
    }

    [Benchmark(Baseline = true, Description = "ProbeFile(1 MB)")]
    public int Small() => LoraProber.ProbeFile(_small).ModuleCount;

    [Benchmark(Description = "ProbeFile(1 GB sparse)")]
    public int Large() => LoraProber.ProbeFile(_large).ModuleCount;
}
