using System;
using Microsoft.EntityFrameworkCore.Migrations;

#nullable disable

namespace LoraDeploy.Data.Migrations.Postgres
{
    /// <inheritdoc />
    public partial class DownloadDeadlineAndFetcher : Migration
    {
        /// <inheritdoc />
        protected override void Up(MigrationBuilder migrationBuilder)
        {
            migrationBuilder.AddColumn<string>(
                name: "FetchedBy",
                table: "downloads",
                type: "character varying(64)",
                maxLength: 64,
                nullable: true);

            migrationBuilder.AddColumn<DateTime>(
                name: "StalledSince",
                table: "downloads",
                type: "timestamp with time zone",
                nullable: true);

            migrationBuilder.AddColumn<DateTime>(
                name: "StartedAt",
                table: "downloads",
                type: "timestamp with time zone",
                nullable: true);
        }

        /// <inheritdoc />
        protected override void Down(MigrationBuilder migrationBuilder)
        {
            migrationBuilder.DropColumn(
                name: "FetchedBy",
                table: "downloads");

            migrationBuilder.DropColumn(
                name: "StalledSince",
                table: "downloads");

            migrationBuilder.DropColumn(
                name: "StartedAt",
                table: "downloads");
        }
    }
}
