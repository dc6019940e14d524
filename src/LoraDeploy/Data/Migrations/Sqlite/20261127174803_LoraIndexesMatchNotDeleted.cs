using Microsoft.EntityFrameworkCore.Migrations;

#nullable disable

namespace LoraDeploy.Data.Migrations.Sqlite
{
    /// <inheritdoc />
    public partial class LoraIndexesMatchNotDeleted : Migration
    {
        /// <inheritdoc />
        protected override void Up(MigrationBuilder migrationBuilder)
        {
            migrationBuilder.DropIndex(
                name: "IX_loras_BaseModel_Private",
                table: "loras");

            migrationBuilder.DropIndex(
                name: "IX_loras_UserId_Name",
                table: "loras");

            migrationBuilder.CreateIndex(
                name: "IX_loras_BaseModel_Private",
                table: "loras",
                columns: new[] { "BaseModel", "Private" },
                filter: "NOT \"Deleted\"");

            migrationBuilder.CreateIndex(
                name: "IX_loras_UserId_Name",
                table: "loras",
                columns: new[] { "UserId", "Name" },
                unique: true,
                filter: "NOT \"Deleted\"");
        }

        /// <inheritdoc />
        protected override void Down(MigrationBuilder migrationBuilder)
        {
            migrationBuilder.DropIndex(
                name: "IX_loras_BaseModel_Private",
                table: "loras");

            migrationBuilder.DropIndex(
                name: "IX_loras_UserId_Name",
                table: "loras");

            migrationBuilder.CreateIndex(
                name: "IX_loras_BaseModel_Private",
                table: "loras",
                columns: new[] { "BaseModel", "Private" },
                filter: "\"Deleted\" = 0");

            migrationBuilder.CreateIndex(
                name: "IX_loras_UserId_Name",
                table: "loras",
                columns: new[] { "UserId", "Name" },
                unique: true,
                filter: "\"Deleted\" = 0");
        }
    }
}
