using System;
using Microsoft.EntityFrameworkCore.Migrations;

#nullable disable

namespace LoraDeploy.Data.Migrations.Postgres
{
    /// <inheritdoc />
    public partial class ExportJobs : Migration
    {
        /// <inheritdoc />
        protected override void Up(MigrationBuilder migrationBuilder)
        {
            migrationBuilder.CreateTable(
                name: "export_jobs",
                columns: table => new
                {
                    Id = table.Column<string>(type: "character varying(32)", maxLength: 32, nullable: false),
                    UserId = table.Column<long>(type: "bigint", nullable: false),
                    LoraId = table.Column<long>(type: "bigint", nullable: false),
                    DeployId = table.Column<string>(type: "character varying(32)", maxLength: 32, nullable: false),
                    AdapterSha256 = table.Column<string>(type: "character varying(64)", maxLength: 64, nullable: false),
                    BaseModel = table.Column<string>(type: "character varying(200)", maxLength: 200, nullable: false),
                    Format = table.Column<string>(type: "character varying(16)", maxLength: 16, nullable: false),
                    Dtype = table.Column<string>(type: "character varying(8)", maxLength: 8, nullable: false),
                    Strength = table.Column<double>(type: "double precision", nullable: false),
                    Status = table.Column<string>(type: "character varying(16)", maxLength: 16, nullable: false),
                    LeaseOwner = table.Column<string>(type: "character varying(64)", maxLength: 64, nullable: true),
                    LeaseExpiresAt = table.Column<DateTime>(type: "timestamp with time zone", nullable: true),
                    Attempts = table.Column<int>(type: "integer", nullable: false),
                    TensorsDone = table.Column<int>(type: "integer", nullable: false),
                    TensorsTotal = table.Column<int>(type: "integer", nullable: false),
                    BytesDone = table.Column<long>(type: "bigint", nullable: false),
                    BytesTotal = table.Column<long>(type: "bigint", nullable: false),
                    OutputBytes = table.Column<long>(type: "bigint", nullable: true),
                    OutputSha256 = table.Column<string>(type: "character varying(64)", maxLength: 64, nullable: true),
                    FailReason = table.Column<string>(type: "character varying(2000)", maxLength: 2000, nullable: false),
                    CreatedAt = table.Column<DateTime>(type: "timestamp with time zone", nullable: false),
                    StartedAt = table.Column<DateTime>(type: "timestamp with time zone", nullable: true),
                    FinishedAt = table.Column<DateTime>(type: "timestamp with time zone", nullable: true)
                },
                constraints: table =>
                {
                    table.PrimaryKey("PK_export_jobs", x => x.Id);
                    table.ForeignKey(
                        name: "FK_export_jobs_loras_LoraId",
                        column: x => x.LoraId,
                        principalTable: "loras",
                        principalColumn: "Id",
                        onDelete: ReferentialAction.Cascade);
                });

            migrationBuilder.CreateIndex(
                name: "IX_export_jobs_Active_CreatedAt",
                table: "export_jobs",
                column: "CreatedAt",
                filter: "\"Status\" IN ('queued', 'running')");

            migrationBuilder.CreateIndex(
                name: "IX_export_jobs_FinishedAt",
                table: "export_jobs",
                column: "FinishedAt");

            migrationBuilder.CreateIndex(
                name: "IX_export_jobs_LoraId_CreatedAt",
                table: "export_jobs",
                columns: new[] { "LoraId", "CreatedAt" });
        }

        /// <inheritdoc />
        protected override void Down(MigrationBuilder migrationBuilder)
        {
            migrationBuilder.DropTable(
                name: "export_jobs");
        }
    }
}
