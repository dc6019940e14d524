using System;
using Microsoft.EntityFrameworkCore.Migrations;

#nullable disable

namespace LoraDeploy.Data.Migrations.Sqlite
{
    /// <inheritdoc />
    public partial class ServingDataModel : Migration
    {
        /// <inheritdoc />
        protected override void Up(MigrationBuilder migrationBuilder)
        {
            migrationBuilder.CreateTable(
                name: "adapters",
                columns: table => new
                {
                    Sha256 = table.Column<string>(type: "TEXT", maxLength: 64, nullable: false),
                    SizeBytes = table.Column<long>(type: "INTEGER", nullable: false),
                    Format = table.Column<string>(type: "TEXT", maxLength: 32, nullable: false),
                    Network = table.Column<string>(type: "TEXT", maxLength: 32, nullable: false),
                    Architecture = table.Column<string>(type: "TEXT", maxLength: 64, nullable: false),
                    RankMin = table.Column<int>(type: "INTEGER", nullable: true),
                    RankMax = table.Column<int>(type: "INTEGER", nullable: true),
                    Alpha = table.Column<double>(type: "REAL", nullable: true),
                    ProbeJson = table.Column<string>(type: "TEXT", nullable: false),
                    SourceType = table.Column<string>(type: "TEXT", maxLength: 32, nullable: false),
                    SourceRef = table.Column<string>(type: "TEXT", maxLength: 2048, nullable: false),
                    DerivedKey = table.Column<string>(type: "TEXT", maxLength: 256, nullable: true),
                    CreatedAt = table.Column<DateTime>(type: "TEXT", nullable: false)
                },
                constraints: table =>
                {
                    table.PrimaryKey("PK_adapters", x => x.Sha256);
                });

            migrationBuilder.CreateTable(
                name: "import_jobs",
                columns: table => new
                {
                    Id = table.Column<long>(type: "INTEGER", nullable: false)
                        .Annotation("Sqlite:Autoincrement", true),
                    DeployId = table.Column<string>(type: "TEXT", maxLength: 32, nullable: false),
                    Status = table.Column<string>(type: "TEXT", maxLength: 16, nullable: false),
                    LeaseOwner = table.Column<string>(type: "TEXT", maxLength: 64, nullable: true),
                    LeaseExpiresAt = table.Column<DateTime>(type: "TEXT", nullable: true),
                    Attempts = table.Column<int>(type: "INTEGER", nullable: false),
                    DownloadId = table.Column<long>(type: "INTEGER", nullable: true),
                    CreatedAt = table.Column<DateTime>(type: "TEXT", nullable: false),
                    UpdatedAt = table.Column<DateTime>(type: "TEXT", nullable: false)
                },
                constraints: table =>
                {
                    table.PrimaryKey("PK_import_jobs", x => x.Id);
                    table.ForeignKey(
                        name: "FK_import_jobs_deploys_DeployId",
                        column: x => x.DeployId,
                        principalTable: "deploys",
                        principalColumn: "Id",
                        onDelete: ReferentialAction.Cascade);
                    table.ForeignKey(
                        name: "FK_import_jobs_downloads_DownloadId",
                        column: x => x.DownloadId,
                        principalTable: "downloads",
                        principalColumn: "Id");
                });

            migrationBuilder.CreateTable(
                name: "worker_tokens",
                columns: table => new
                {
                    Id = table.Column<string>(type: "TEXT", maxLength: 32, nullable: false),
                    Name = table.Column<string>(type: "TEXT", maxLength: 64, nullable: false),
                    SecretHash = table.Column<byte[]>(type: "BLOB", maxLength: 32, nullable: false),
                    CreatedAt = table.Column<DateTime>(type: "TEXT", nullable: false)
                },
                constraints: table =>
                {
                    table.PrimaryKey("PK_worker_tokens", x => x.Id);
                });

            migrationBuilder.CreateTable(
                name: "workers",
                columns: table => new
                {
                    Id = table.Column<string>(type: "TEXT", maxLength: 64, nullable: false),
                    Name = table.Column<string>(type: "TEXT", maxLength: 64, nullable: false),
                    Engine = table.Column<string>(type: "TEXT", maxLength: 16, nullable: false),
                    PoolsJson = table.Column<string>(type: "TEXT", maxLength: 4000, nullable: false),
                    Slots = table.Column<int>(type: "INTEGER", nullable: false),
                    Url = table.Column<string>(type: "TEXT", maxLength: 2048, nullable: false),
                    Version = table.Column<string>(type: "TEXT", maxLength: 64, nullable: false),
                    CallKey = table.Column<string>(type: "TEXT", maxLength: 256, nullable: false),
                    QueueDepth = table.Column<int>(type: "INTEGER", nullable: false),
                    BusySlots = table.Column<int>(type: "INTEGER", nullable: false),
                    ResidentJson = table.Column<string>(type: "TEXT", nullable: false),
                    RegisteredAt = table.Column<DateTime>(type: "TEXT", nullable: false),
                    LastHeartbeatAt = table.Column<DateTime>(type: "TEXT", nullable: false)
                },
                constraints: table =>
                {
                    table.PrimaryKey("PK_workers", x => x.Id);
                });

            migrationBuilder.CreateTable(
                name: "instances",
                columns: table => new
                {
                    Id = table.Column<long>(type: "INTEGER", nullable: false)
                        .Annotation("Sqlite:Autoincrement", true),
                    DeployId = table.Column<string>(type: "TEXT", maxLength: 32, nullable: false),
                    WorkerId = table.Column<string>(type: "TEXT", maxLength: 64, nullable: false),
                    AdapterSha256 = table.Column<string>(type: "TEXT", maxLength: 64, nullable: false),
                    State = table.Column<string>(type: "TEXT", maxLength: 16, nullable: false),
                    Pinned = table.Column<bool>(type: "INTEGER", nullable: false),
                    FailReason = table.Column<string>(type: "TEXT", maxLength: 2000, nullable: false),
                    Since = table.Column<DateTime>(type: "TEXT", nullable: false)
                },
                constraints: table =>
                {
                    table.PrimaryKey("PK_instances", x => x.Id);
                    table.ForeignKey(
                        name: "FK_instances_deploys_DeployId",
                        column: x => x.DeployId,
                        principalTable: "deploys",
                        principalColumn: "Id",
                        onDelete: ReferentialAction.Cascade);
                    table.ForeignKey(
                        name: "FK_instances_workers_WorkerId",
                        column: x => x.WorkerId,
                        principalTable: "workers",
                        principalColumn: "Id",
                        onDelete: ReferentialAction.Cascade);
                });

            migrationBuilder.CreateIndex(
                name: "IX_deploys_Serving_CreatedAt",
                table: "deploys",
                column: "CreatedAt",
                filter: "\"Status\" IN ('deploying', 'running')");

            migrationBuilder.CreateIndex(
                name: "IX_adapters_DerivedKey",
                table: "adapters",
                column: "DerivedKey",
                unique: true);

            migrationBuilder.CreateIndex(
                name: "IX_import_jobs_Active_CreatedAt",
                table: "import_jobs",
                column: "CreatedAt",
                filter: "\"Status\" IN ('queued', 'importing')");

            migrationBuilder.CreateIndex(
                name: "IX_import_jobs_DeployId",
                table: "import_jobs",
                column: "DeployId",
                unique: true);

            migrationBuilder.CreateIndex(
                name: "IX_import_jobs_DownloadId",
                table: "import_jobs",
                column: "DownloadId");

            migrationBuilder.CreateIndex(
                name: "IX_instances_DeployId_WorkerId",
                table: "instances",
                columns: new[] { "DeployId", "WorkerId" },
                unique: true);

            migrationBuilder.CreateIndex(
                name: "IX_instances_WorkerId",
                table: "instances",
                column: "WorkerId");

            migrationBuilder.CreateIndex(
                name: "IX_worker_tokens_Name",
                table: "worker_tokens",
                column: "Name",
                unique: true);

            migrationBuilder.CreateIndex(
                name: "IX_workers_LastHeartbeatAt",
                table: "workers",
                column: "LastHeartbeatAt");

            // Existing rows move into the new tables before the old columns go: probed files become adapters,
            // every deploy gets the import job its status implies (an import under way keeps its lease and download).
            migrationBuilder.Sql("""
INSERT INTO adapters ("Sha256", "SizeBytes", "Format", "Network", "Architecture", "RankMin", "RankMax", "Alpha", "ProbeJson", "SourceType", "SourceRef", "CreatedAt")
SELECT l."Sha256", COALESCE(l."SizeBytes", 0), COALESCE(json_extract(l."ProbeJson", '$.format'), 'unknown'), COALESCE(json_extract(l."ProbeJson", '$.network'), 'unknown'),
       COALESCE(json_extract(l."ProbeJson", '$.architecture'), 'unknown'), json_extract(l."ProbeJson", '$.rank_min'), json_extract(l."ProbeJson", '$.rank_max'), json_extract(l."ProbeJson", '$.alpha'),
       l."ProbeJson", l."SourceType", CASE WHEN l."CivitaiFileId" IS NULL THEN l."SourceUrl" ELSE 'civitai:file:' || l."CivitaiFileId" END, l."UpdatedAt"
FROM loras l
WHERE l."Sha256" IS NOT NULL AND l."ProbeJson" IS NOT NULL
  AND l."Id" = (SELECT MIN(o."Id") FROM loras o WHERE o."Sha256" = l."Sha256" AND o."ProbeJson" IS NOT NULL);
""");

            migrationBuilder.Sql("""
INSERT INTO import_jobs ("DeployId", "Status", "LeaseOwner", "LeaseExpiresAt", "Attempts", "DownloadId", "CreatedAt", "UpdatedAt")
SELECT "Id",
       CASE "Status" WHEN 'initializing' THEN 'queued' WHEN 'downloading' THEN 'importing' WHEN 'failed' THEN 'ended' WHEN 'deleted' THEN 'ended' ELSE 'done' END,
       CASE WHEN "Status" = 'downloading' THEN "LeaseOwner" END,
       CASE WHEN "Status" = 'downloading' THEN "LeaseExpiresAt" END,
       "Attempts",
       CASE WHEN "Status" = 'downloading' THEN "DownloadId" END,
       "CreatedAt", "UpdatedAt"
FROM deploys;
""");

            migrationBuilder.Sql("""
UPDATE loras SET "Sha256" = NULL WHERE "Sha256" IS NOT NULL AND "Sha256" NOT IN (SELECT "Sha256" FROM adapters);
""");

            migrationBuilder.DropForeignKey(
                name: "FK_deploys_downloads_DownloadId",
                table: "deploys");

            migrationBuilder.DropIndex(
                name: "IX_loras_DeployId",
                table: "loras");

            migrationBuilder.DropIndex(
                name: "IX_deploys_DownloadId",
                table: "deploys");

            migrationBuilder.DropIndex(
                name: "IX_deploys_Importing_CreatedAt",
                table: "deploys");

            migrationBuilder.DropIndex(
                name: "IX_deploys_Status_LeaseExpiresAt",
                table: "deploys");

            migrationBuilder.DropColumn(
                name: "DeployId",
                table: "loras");

            migrationBuilder.DropColumn(
                name: "ProbeJson",
                table: "loras");

            migrationBuilder.DropColumn(
                name: "Attempts",
                table: "deploys");

            migrationBuilder.DropColumn(
                name: "DownloadId",
                table: "deploys");

            migrationBuilder.DropColumn(
                name: "LeaseExpiresAt",
                table: "deploys");

            migrationBuilder.DropColumn(
                name: "LeaseOwner",
                table: "deploys");

            migrationBuilder.RenameColumn(
                name: "Sha256",
                table: "loras",
                newName: "AdapterSha256");

            migrationBuilder.CreateIndex(
                name: "IX_loras_AdapterSha256",
                table: "loras",
                column: "AdapterSha256");

            migrationBuilder.AddForeignKey(
                name: "FK_loras_adapters_AdapterSha256",
                table: "loras",
                column: "AdapterSha256",
                principalTable: "adapters",
                principalColumn: "Sha256",
                onDelete: ReferentialAction.SetNull);
        }

        /// <inheritdoc />
        protected override void Down(MigrationBuilder migrationBuilder)
        {
            migrationBuilder.DropForeignKey(
                name: "FK_loras_adapters_AdapterSha256",
                table: "loras");

            migrationBuilder.DropTable(
                name: "adapters");

            migrationBuilder.DropTable(
                name: "import_jobs");

            migrationBuilder.DropTable(
                name: "instances");

            migrationBuilder.DropTable(
                name: "worker_tokens");

            migrationBuilder.DropTable(
                name: "workers");

            migrationBuilder.DropIndex(
                name: "IX_loras_AdapterSha256",
                table: "loras");

            migrationBuilder.DropIndex(
                name: "IX_deploys_Serving_CreatedAt",
                table: "deploys");

            migrationBuilder.RenameColumn(
                name: "AdapterSha256",
                table: "loras",
                newName: "Sha256");

            migrationBuilder.AddColumn<string>(
                name: "DeployId",
                table: "loras",
                type: "TEXT",
                maxLength: 32,
                nullable: false,
                defaultValue: "");

            migrationBuilder.AddColumn<string>(
                name: "ProbeJson",
                table: "loras",
                type: "TEXT",
                nullable: true);

            migrationBuilder.AddColumn<int>(
                name: "Attempts",
                table: "deploys",
                type: "INTEGER",
                nullable: false,
                defaultValue: 0);

            migrationBuilder.AddColumn<long>(
                name: "DownloadId",
                table: "deploys",
                type: "INTEGER",
                nullable: true);

            migrationBuilder.AddColumn<DateTime>(
                name: "LeaseExpiresAt",
                table: "deploys",
                type: "TEXT",
                nullable: true);

            migrationBuilder.AddColumn<string>(
                name: "LeaseOwner",
                table: "deploys",
                type: "TEXT",
                maxLength: 64,
                nullable: true);

            migrationBuilder.CreateIndex(
                name: "IX_loras_DeployId",
                table: "loras",
                column: "DeployId",
                unique: true);

            migrationBuilder.CreateIndex(
                name: "IX_deploys_DownloadId",
                table: "deploys",
                column: "DownloadId");

            migrationBuilder.CreateIndex(
                name: "IX_deploys_Importing_CreatedAt",
                table: "deploys",
                column: "CreatedAt",
                filter: "\"Status\" IN ('initializing', 'downloading')");

            migrationBuilder.CreateIndex(
                name: "IX_deploys_Status_LeaseExpiresAt",
                table: "deploys",
                columns: new[] { "Status", "LeaseExpiresAt" });

            migrationBuilder.AddForeignKey(
                name: "FK_deploys_downloads_DownloadId",
                table: "deploys",
                column: "DownloadId",
                principalTable: "downloads",
                principalColumn: "Id");
        }
    }
}
