using System;
using Microsoft.EntityFrameworkCore.Migrations;

#nullable disable

namespace LoraDeploy.Data.Migrations.Sqlite
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
                type: "TEXT",
                maxLength: 64,
                nullable: true);

            migrationBuilder.AddColumn<DateTime>(
                name: "StalledSince",
                table: "downloads",
                type: "TEXT",
                nullable: true);

            migrationBuilder.AddColumn<DateTime>(
                name: "StartedAt",
                table: "downloads",
                type: "TEXT",
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
