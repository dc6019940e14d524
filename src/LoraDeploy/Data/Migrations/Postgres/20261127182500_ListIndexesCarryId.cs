using Microsoft.EntityFrameworkCore.Migrations;

#nullable disable

namespace LoraDeploy.Data.Migrations.Postgres
{
    /// <inheritdoc />
    public partial class ListIndexesCarryId : Migration
    {
        /// <inheritdoc />
        protected override void Up(MigrationBuilder migrationBuilder)
        {
            migrationBuilder.DropIndex(
                name: "IX_deploys_UserId_CreatedAt",
                table: "deploys");

            migrationBuilder.DropIndex(
                name: "IX_deploys_UserId_Status_CreatedAt",
                table: "deploys");

            migrationBuilder.CreateIndex(
                name: "IX_deploys_UserId_CreatedAt_Id",
                table: "deploys",
                columns: new[] { "UserId", "CreatedAt", "Id" });

            migrationBuilder.CreateIndex(
                name: "IX_deploys_UserId_Status_CreatedAt_Id",
                table: "deploys",
                columns: new[] { "UserId", "Status", "CreatedAt", "Id" });
        }

        /// <inheritdoc />
        protected override void Down(MigrationBuilder migrationBuilder)
        {
            migrationBuilder.DropIndex(
                name: "IX_deploys_UserId_CreatedAt_Id",
                table: "deploys");

            migrationBuilder.DropIndex(
                name: "IX_deploys_UserId_Status_CreatedAt_Id",
                table: "deploys");

            migrationBuilder.CreateIndex(
                name: "IX_deploys_UserId_CreatedAt",
                table: "deploys",
                columns: new[] { "UserId", "CreatedAt" });

            migrationBuilder.CreateIndex(
                name: "IX_deploys_UserId_Status_CreatedAt",
                table: "deploys",
                columns: new[] { "UserId", "Status", "CreatedAt" });
        }
    }
}
