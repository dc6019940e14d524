using Microsoft.EntityFrameworkCore.Migrations;

#nullable disable

namespace LoraDeploy.Data.Migrations.Postgres
{
    /// <inheritdoc />
    public partial class LicensePolicy : Migration
    {
        /// <inheritdoc />
        protected override void Up(MigrationBuilder migrationBuilder)
        {
            migrationBuilder.AddColumn<string>(
                name: "AllowCommercialUseJson",
                table: "loras",
                type: "character varying(256)",
                maxLength: 256,
                nullable: true);

            migrationBuilder.AddColumn<bool>(
                name: "AllowDerivatives",
                table: "loras",
                type: "boolean",
                nullable: true);

            migrationBuilder.AddColumn<bool>(
                name: "AllowDifferentLicense",
                table: "loras",
                type: "boolean",
                nullable: true);

            migrationBuilder.AddColumn<bool>(
                name: "AllowNoCredit",
                table: "loras",
                type: "boolean",
                nullable: true);

            migrationBuilder.AddColumn<string>(
                name: "CivitaiCreator",
                table: "loras",
                type: "character varying(200)",
                maxLength: 200,
                nullable: true);

            migrationBuilder.AddColumn<int>(
                name: "NsfwLevel",
                table: "loras",
                type: "integer",
                nullable: true);
        }

        /// <inheritdoc />
        protected override void Down(MigrationBuilder migrationBuilder)
        {
            migrationBuilder.DropColumn(
                name: "AllowCommercialUseJson",
                table: "loras");

            migrationBuilder.DropColumn(
                name: "AllowDerivatives",
                table: "loras");

            migrationBuilder.DropColumn(
                name: "AllowDifferentLicense",
                table: "loras");

            migrationBuilder.DropColumn(
                name: "AllowNoCredit",
                table: "loras");

            migrationBuilder.DropColumn(
                name: "CivitaiCreator",
                table: "loras");

            migrationBuilder.DropColumn(
                name: "NsfwLevel",
                table: "loras");
        }
    }
}
