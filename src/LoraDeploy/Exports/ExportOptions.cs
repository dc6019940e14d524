using System.ComponentModel.DataAnnotations;

namespace LoraDeploy.Exports;

/// <summary>Settings section <c>Exports</c>: merged models made on this host for download.</summary>
public sealed class ExportOptions : IValidatableObject
{
    public const string Section = "Exports";

    /// <summary>Run export jobs in this process (off for API-only replicas; any replica with the base weights can run them).</summary>
    public bool Enabled { get; set; } = true;

    /// <summary>Folder of the merged files; replicas that serve downloads share one. Default <c>DATA_DIR/exports</c>.</summary>
    public string? Path { get; set; }

    /// <summary>A finished export (its file and its row) is deleted this many hours after it finished.</summary>
    [Range(0.001, 24 * 365)]
    public double RetentionHours { get; set; } = 24;

    /// <summary>Merges run at once in this process (each reads the whole base and writes a file as large).</summary>
    [Range(1, 16)]
    public int MaxConcurrentJobs { get; set; } = 1;

    /// <summary>How often to look for jobs another replica queued (a local request wakes the runner at once).</summary>
    [Range(typeof(TimeSpan), "00:00:00.010", "00:10:00")]
    public TimeSpan PollInterval { get; set; } = TimeSpan.FromSeconds(2);

    /// <summary>A claimed job is this runner's until the lease expires; a crashed runner's job is taken up again after it.</summary>
    [Range(typeof(TimeSpan), "00:00:01", "01:00:00")]
    public TimeSpan LeaseDuration { get; set; } = TimeSpan.FromSeconds(30);

    /// <summary>How often a running merge writes its progress to the row (and renews its lease); at least a second apart.</summary>
    [Range(typeof(TimeSpan), "00:00:01", "00:10:00")]
    public TimeSpan ProgressInterval { get; set; } = TimeSpan.FromSeconds(1);

    /// <summary>A job whose runner died this many times is failed instead of started again, so a merge that kills its process does not loop.</summary>
    [Range(1, 100)]
    public int MaxStarts { get; set; } = 3;

    public TimeSpan Retention => TimeSpan.FromHours(RetentionHours);

    public IEnumerable<ValidationResult> Validate(ValidationContext validationContext)
    {
        if (Path is { } path && string.IsNullOrWhiteSpace(path))
        {
            yield return new ValidationResult("Exports:Path is blank; leave it out for DATA_DIR/exports or give a folder.", [nameof(Path)]);
        }
        if (LeaseDuration < 2 * ProgressInterval)
        {
            yield return new ValidationResult(
                $"Exports:LeaseDuration ({LeaseDuration}) must be at least twice Exports:ProgressInterval ({ProgressInterval}): the lease is renewed with each progress write.",
                [nameof(LeaseDuration)]);
        }
    }
}
