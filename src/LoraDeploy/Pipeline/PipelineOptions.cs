using System.ComponentModel.DataAnnotations;

namespace LoraDeploy.Pipeline;

/// <summary>Settings section <c>Pipeline</c>.</summary>
public sealed class PipelineOptions
{
    public const string Section = "Pipeline";

    /// <summary>Run the import pipeline in this process (off for API-only replicas).</summary>
    public bool Enabled { get; set; } = true;

    /// <summary>How often to look for work that another replica queued (local work wakes the pipeline at once).</summary>
    public TimeSpan PollInterval { get; set; } = TimeSpan.FromSeconds(2);

    /// <summary>A claimed row is this replica's until the lease expires; a crashed replica's work is taken over after it.</summary>
    public TimeSpan LeaseDuration { get; set; } = TimeSpan.FromSeconds(30);

    /// <summary>How often a running download publishes its byte count (and renews its lease).</summary>
    public TimeSpan ProgressInterval { get; set; } = TimeSpan.FromMilliseconds(500);

    [Range(1, 64)]
    public int MaxConcurrentDownloads { get; set; } = 4;

    [Range(1, 1000)]
    public int BatchSize { get; set; } = 32;

    /// <summary>A blob no LoRA references, or a failed download's staging file, is deleted once it is older than this.</summary>
    public TimeSpan BlobGracePeriod { get; set; } = TimeSpan.FromHours(1);

    public TimeSpan CollectInterval { get; set; } = TimeSpan.FromMinutes(5);

    /// <summary>A download still unfinished this long after it first started fails (class <c>download_deadline</c>).</summary>
    [Range(typeof(TimeSpan), "00:00:00.001", "30.00:00:00")]
    public TimeSpan DownloadDeadline { get; set; } = TimeSpan.FromHours(4);

    /// <summary>
    /// A download whose worker stopped without finishing (a crash, a restart) is taken up again after its lease; after
    /// this many starts it fails instead (class <c>internal</c>), so a download that kills its worker does not loop.
    /// </summary>
    [Range(1, 1000)]
    public int MaxDownloadStarts { get; set; } = 10;

    /// <summary>When no byte arrived for this long, the LoRA shows <c>stalled_since</c>.</summary>
    [Range(typeof(TimeSpan), "00:00:00.001", "1.00:00:00")]
    public TimeSpan StalledAfter { get; set; } = TimeSpan.FromMinutes(1);
}
