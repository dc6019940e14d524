using Microsoft.EntityFrameworkCore.Migrations;

#nullable disable

namespace LoraDeploy.Data.Migrations.Sqlite
{
    /// <inheritdoc />
    public partial class ImportingQueueIndex : Migration
    {
        /// <inheritdoc />
        protected override void Up(MigrationBuilder migrationBuilder)
        {
            migrationBuilder.CreateIndex(
                name: "IX_deploys_Importing_CreatedAt",
                table: "deploys",
                column: "CreatedAt",
                filter: "\"Status\" IN ('initializing', 'downloading')");
        }

        /// <inheritdoc />
        protected override void Down(MigrationBuilder migrationBuilder)
        {
            migrationBuilder.DropIndex(
                name: "IX_deploys_Importing_CreatedAt",
                table: "deploys");
        }
    }
}
