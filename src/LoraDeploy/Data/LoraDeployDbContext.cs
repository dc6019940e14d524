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
    public DbSet<Adapter> Adapters => Set<Adapter>();
    public DbSet<ImportJob> ImportJobs => Set<ImportJob>();
    public DbSet<ExportJob> ExportJobs => Set<ExportJob>();
    public DbSet<Worker> Workers => Set<Worker>();
    public DbSet<WorkerToken> WorkerTokens => Set<WorkerToken>();
    public DbSet<Instance> Instances => Set<Instance>();
    public DbSet<Blob> Blobs => Set<Blob>();
    public DbSet<IdempotencyRecord> IdempotencyRecords => Set<IdempotencyRecord>();
    public DbSet<AuditEntry> AuditEntries => Set<AuditEntry>();
    public DbSet<RateLimitWindow> RateLimitWindows => Set<RateLimitWindow>();

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
            lora.Property(l => l.ExpectedSha256).HasMaxLength(64);
            lora.Property(l => l.AdapterSha256).HasMaxLength(64);
            lora.Property(l => l.AllowCommercialUseJson).HasMaxLength(256);
            lora.Property(l => l.CivitaiCreator).HasMaxLength(200);
            lora.HasOne(l => l.User).WithMany().HasForeignKey(l => l.UserId);
            // A collected adapter leaves deleted LoRAs pointing nowhere rather than blocking the collection.
            lora.HasOne(l => l.Adapter).WithMany().HasForeignKey(l => l.AdapterSha256).OnDelete(DeleteBehavior.SetNull);
            // A name is unique per user among the LoRAs that are not deleted.
            lora.HasIndex(l => new { l.UserId, l.Name }).IsUnique().HasFilter(DeletedFalseFilter);
            lora.HasIndex(l => new { l.BaseModel, l.Private }).HasFilter(DeletedFalseFilter);
            lora.HasIndex(l => l.AdapterSha256);
        });

        modelBuilder.Entity<Adapter>(adapter =>
        {
            adapter.ToTable("adapters");
            adapter.HasKey(a => a.Sha256);
            adapter.Property(a => a.Sha256).HasMaxLength(64);
            adapter.Property(a => a.Format).HasMaxLength(32);
            adapter.Property(a => a.Network).HasMaxLength(32);
            adapter.Property(a => a.Architecture).HasMaxLength(64);
            adapter.Property(a => a.SourceType).HasMaxLength(32);
            adapter.Property(a => a.SourceRef).HasMaxLength(2048);
            adapter.Property(a => a.DerivedKey).HasMaxLength(256);
            adapter.HasIndex(a => a.DerivedKey).IsUnique();
        });

        modelBuilder.Entity<ImportJob>(job =>
        {
            job.ToTable("import_jobs");
            job.Property(j => j.DeployId).HasMaxLength(32);
            job.Property(j => j.Status).HasMaxLength(16);
            job.Property(j => j.LeaseOwner).HasMaxLength(64);
            job.HasOne(j => j.Deploy).WithOne().HasForeignKey<ImportJob>(j => j.DeployId);
            job.HasOne(j => j.Download).WithMany().HasForeignKey(j => j.DownloadId);
            job.HasIndex(j => j.DeployId).IsUnique();
            job.HasIndex(j => j.DownloadId);
            // The claim query: only the jobs still importing, oldest first. Partial, so it stays tiny however many
            // deploys exist (done and ended jobs are almost all of them).
            job.HasIndex(j => j.CreatedAt).HasDatabaseName("IX_import_jobs_Active_CreatedAt")
                .HasFilter("\"Status\" IN ('queued', 'importing')");
        });

        modelBuilder.Entity<ExportJob>(job =>
        {
            job.ToTable("export_jobs");
            job.HasKey(j => j.Id);
            job.Property(j => j.Id).HasMaxLength(32);
            job.Property(j => j.DeployId).HasMaxLength(32);
            job.Property(j => j.AdapterSha256).HasMaxLength(64);
            job.Property(j => j.BaseModel).HasMaxLength(200);
            job.Property(j => j.Format).HasMaxLength(16);
            job.Property(j => j.Dtype).HasMaxLength(8);
            job.Property(j => j.Status).HasMaxLength(16);
            job.Property(j => j.LeaseOwner).HasMaxLength(64);
            job.Property(j => j.OutputSha256).HasMaxLength(64);
            job.Property(j => j.FailReason).HasMaxLength(2000);
            job.HasOne(j => j.Lora).WithMany().HasForeignKey(j => j.LoraId).OnDelete(DeleteBehavior.Cascade);
            // A LoRA's exports, newest first.
            job.HasIndex(j => new { j.LoraId, j.CreatedAt });
            // The claim query: only unfinished jobs, oldest first (partial, like the import queue's index).
            job.HasIndex(j => j.CreatedAt).HasDatabaseName("IX_export_jobs_Active_CreatedAt")
                .HasFilter("\"Status\" IN ('queued', 'running')");
            job.HasIndex(j => j.FinishedAt);
        });

        modelBuilder.Entity<WorkerToken>(token =>
        {
            token.ToTable("worker_tokens");
            token.HasKey(t => t.Id);
            token.Property(t => t.Id).HasMaxLength(32);
            token.Property(t => t.Name).HasMaxLength(64);
            token.Property(t => t.SecretHash).HasMaxLength(32);
            token.HasIndex(t => t.Name).IsUnique();
        });

        modelBuilder.Entity<Worker>(worker =>
        {
            worker.ToTable("workers");
            worker.HasKey(w => w.Id);
            worker.Property(w => w.Id).HasMaxLength(64);
            worker.Property(w => w.Name).HasMaxLength(64);
            worker.Property(w => w.Engine).HasMaxLength(16);
            worker.Property(w => w.PoolsJson).HasMaxLength(4000);
            worker.Property(w => w.Url).HasMaxLength(2048);
            worker.Property(w => w.Version).HasMaxLength(64);
            worker.Property(w => w.CallKey).HasMaxLength(256);
            worker.HasIndex(w => w.LastHeartbeatAt);
        });

        modelBuilder.Entity<Instance>(instance =>
        {
            instance.ToTable("instances");
            instance.Property(i => i.DeployId).HasMaxLength(32);
            instance.Property(i => i.WorkerId).HasMaxLength(64);
            instance.Property(i => i.AdapterSha256).HasMaxLength(64);
            instance.Property(i => i.State).HasMaxLength(16);
            instance.Property(i => i.FailReason).HasMaxLength(2000);
            instance.HasOne<Deploy>().WithMany().HasForeignKey(i => i.DeployId).OnDelete(DeleteBehavior.Cascade);
            instance.HasOne(i => i.Worker).WithMany().HasForeignKey(i => i.WorkerId).OnDelete(DeleteBehavior.Cascade);
            instance.HasIndex(i => new { i.DeployId, i.WorkerId }).IsUnique();
            instance.HasIndex(i => i.WorkerId);
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
            deploy.HasOne(d => d.Lora).WithOne().HasForeignKey<Deploy>(d => d.LoraId);
            // Lists: a user's deploys newest first, optionally by status.
            // Lists: a user's deploys newest first; Id is the tie-breaker of the ORDER BY, so the index alone gives the
            // order and a caller with 10,000 deploys costs a range read, not a sort.
            deploy.HasIndex(d => new { d.UserId, d.CreatedAt, d.Id });
            deploy.HasIndex(d => new { d.UserId, d.Status, d.CreatedAt, d.Id });
            // The placer's scan: deploys waiting for or holding capacity. Partial, like the import queue's index.
            deploy.HasIndex(d => d.CreatedAt).HasDatabaseName("IX_deploys_Serving_CreatedAt")
                .HasFilter("\"Status\" IN ('deploying', 'running')");
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

        modelBuilder.Entity<AuditEntry>(entry =>
        {
            entry.ToTable("audit_log");
            entry.Property(e => e.UserName).HasMaxLength(64);
            entry.Property(e => e.TokenId).HasMaxLength(32);
            entry.Property(e => e.TokenLabel).HasMaxLength(128);
            entry.Property(e => e.Ip).HasMaxLength(64);
            entry.Property(e => e.Action).HasMaxLength(32);
            entry.Property(e => e.ObjectType).HasMaxLength(32);
            entry.Property(e => e.ObjectId).HasMaxLength(200);
            entry.Property(e => e.Detail).HasMaxLength(AuditEntryLimits.DetailLength);
            // The admin's filters: by time, by user, by action; newest first is by Id.
            entry.HasIndex(e => e.At);
            entry.HasIndex(e => new { e.UserId, e.Id });
            entry.HasIndex(e => new { e.Action, e.Id });
        });

        modelBuilder.Entity<RateLimitWindow>(window =>
        {
            // Written by RateLimits.RateLimitCounter's upsert in raw SQL: keep its table and column names in step.
            window.ToTable("rate_limit_windows");
            window.HasKey(w => new { w.UserId, w.Window });
            // Dropping past minutes is a range delete on this index, not a scan.
            window.HasIndex(w => w.Window);
        });
    }

    /// <summary>The partial-index filter for "not deleted", in this provider's SQL.</summary>
    protected abstract string DeletedFalseFilter { get; }

    private sealed class UtcDateTimeConverter() : ValueConverter<DateTime, DateTime>(
        value => value.Kind == DateTimeKind.Utc ? value : value.ToUniversalTime(),
        value => DateTime.SpecifyKind(value, DateTimeKind.Utc));
}
