using Microsoft.EntityFrameworkCore;
using Microsoft.EntityFrameworkCore.Storage.ValueConversion;

namespace LoraDeploy.Data;

/// <summary>The shared model. Provider contexts only add provider specifics and own their migrations.</summary>
public abstract class LoraDeployDbContext(DbContextOptions options) : DbContext(options)
{
    public DbSet<User> Users => Set<User>();
    public DbSet<ApiToken> ApiTokens => Set<ApiToken>();
    public DbSet<Lora> Loras => Set<Lora>();
    public DbSet<Deploy> Deploys => Set<Deploy>();
    public DbSet<Download> Downloads => Set<Download>();
    public DbSet<Blob> Blobs => Set<Blob>();
    public DbSet<IdempotencyRecord> IdempotencyRecords => Set<IdempotencyRecord>();

    /// <summary>True when the exception is a unique-constraint violation on this provider.</summary>
    public abstract bool IsUniqueViolation(DbUpdateException exception);

    protected override void ConfigureConventions(ModelConfigurationBuilder configurationBuilder)
    {
        // Every timestamp is UTC; SQLite hands them back unspecified, PostgreSQL's timestamptz insists on UTC.
        configurationBuilder.Properties<DateTime>().HaveConversion<UtcDateTimeConverter>();
    }

    protected override void OnModelCreating(ModelBuilder modelBuilder)
    {
        modelBuilder.Entity<User>(user =>
        {
            user.ToTable("users");
            user.Property(u => u.Name).HasMaxLength(64);
            user.HasIndex(u => u.Name).IsUnique();
        });

        modelBuilder.Entity<ApiToken>(token =>
        {
            token.ToTable("api_tokens");
            token.HasKey(t => t.Id);
            token.Property(t => t.Id).HasMaxLength(32);
            token.Property(t => t.SecretHash).HasMaxLength(32);
            token.Property(t => t.Label).HasMaxLength(128);
            token.HasOne(t => t.User).WithMany().HasForeignKey(t => t.UserId);
        });

        modelBuilder.Entity<Lora>(lora =>
        {
            lora.ToTable("loras");
            lora.Property(l => l.Name).HasMaxLength(64);
            lora.Property(l => l.BaseModel).HasMaxLength(200);
            lora.Property(l => l.SourceType).HasMaxLength(32);
            lora.Property(l => l.SourceUrl).HasMaxLength(2048);
            lora.Property(l => l.DeployId).HasMaxLength(32);
            lora.Property(l => l.ExpectedSha256).HasMaxLength(64);
            lora.Property(l => l.Sha256).HasMaxLength(64);
            lora.HasOne(l => l.User).WithMany().HasForeignKey(l => l.UserId);
            // A name is unique per user among the LoRAs that are not deleted.
            lora.HasIndex(l => new { l.UserId, l.Name }).IsUnique().HasFilter(DeletedFalseFilter);
            lora.HasIndex(l => new { l.BaseModel, l.Private }).HasFilter(DeletedFalseFilter);
            lora.HasIndex(l => l.DeployId).IsUnique();
        });

        modelBuilder.Entity<Deploy>(deploy =>
        {
            deploy.ToTable("deploys");
            deploy.HasKey(d => d.Id);
            deploy.Property(d => d.Id).HasMaxLength(32);
            deploy.Property(d => d.ModelName).HasMaxLength(200);
            deploy.Property(d => d.Type).HasMaxLength(16);
            deploy.Property(d => d.Task).HasMaxLength(32);
            deploy.Property(d => d.Status).HasMaxLength(16);
            deploy.Property(d => d.FailReason).HasMaxLength(2000);
            deploy.Property(d => d.FailClass).HasMaxLength(32);
            deploy.Property(d => d.Version).HasMaxLength(64);
            deploy.Property(d => d.LeaseOwner).HasMaxLength(64);
            deploy.HasOne(d => d.Lora).WithOne().HasForeignKey<Deploy>(d => d.LoraId);
            deploy.HasOne(d => d.Download).WithMany().HasForeignKey(d => d.DownloadId);
            // Lists: a user's deploys newest first, optionally by status.
            // Lists: a user's deploys newest first; Id is the tie-breaker of the ORDER BY, so the index alone gives the
            // order and a caller with 10,000 deploys costs a range read, not a sort.
            deploy.HasIndex(d => new { d.UserId, d.CreatedAt, d.Id });
            deploy.HasIndex(d => new { d.UserId, d.Status, d.CreatedAt, d.Id });
            // The pipeline's queue: rows by status.
            deploy.HasIndex(d => new { d.Status, d.LeaseExpiresAt });
            // The pipeline's claim query: only the rows still importing, oldest first. Partial, so it stays tiny
            // however many deploys exist, and SQLite uses it even when ANALYZE says Status is unselective (its
            // statistics keep averages, not the skew of a table that is almost all deploying/running).
            deploy.HasIndex(d => d.CreatedAt).HasDatabaseName("IX_deploys_Importing_CreatedAt")
                .HasFilter("\"Status\" IN ('initializing', 'downloading')");
        });

        modelBuilder.Entity<Download>(download =>
        {
            download.ToTable("downloads");
            download.Property(d => d.SourceKey).HasMaxLength(128);
            download.Property(d => d.Status).HasMaxLength(16);
            download.Property(d => d.ExpectedSha256).HasMaxLength(64);
            download.Property(d => d.BlobSha256).HasMaxLength(64);
            download.Property(d => d.FailReason).HasMaxLength(2000);
            download.Property(d => d.FailClass).HasMaxLength(32);
            download.Property(d => d.LeaseOwner).HasMaxLength(64);
            download.Property(d => d.FetchedBy).HasMaxLength(64);
            download.HasIndex(d => d.SourceKey).IsUnique();
            download.HasIndex(d => new { d.Status, d.LeaseExpiresAt });
        });

        modelBuilder.Entity<Blob>(blob =>
        {
            blob.ToTable("blobs");
            blob.HasKey(b => b.Sha256);
            blob.Property(b => b.Sha256).HasMaxLength(64);
        });

        modelBuilder.Entity<IdempotencyRecord>(record =>
        {
            record.ToTable("idempotency_keys");
            record.HasKey(r => new { r.UserId, r.Key });
            record.Property(r => r.Key).HasMaxLength(255);
            record.Property(r => r.RequestHash).HasMaxLength(64);
            record.Property(r => r.DeployId).HasMaxLength(32);
        });
    }

    /// <summary>The partial-index filter for "not deleted", in this provider's SQL.</summary>
    protected abstract string DeletedFalseFilter { get; }

    private sealed class UtcDateTimeConverter() : ValueConverter<DateTime, DateTime>(
        value => value.Kind == DateTimeKind.Utc ? value : value.ToUniversalTime(),
        value => DateTime.SpecifyKind(value, DateTimeKind.Utc));
}
