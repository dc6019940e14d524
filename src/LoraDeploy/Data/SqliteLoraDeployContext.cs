using Microsoft.Data.Sqlite;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Data;

public sealed class SqliteLoraDeployContext(DbContextOptions<SqliteLoraDeployContext> options) : LoraDeployDbContext(options)
{
    private const int SqliteConstraintUnique = 2067;
    private const int SqliteConstraintPrimaryKey = 1555;

    protected override string DeletedFalseFilter => "\"Deleted\" = 0";

    public override bool IsUniqueViolation(DbUpdateException exception) =>
        exception.InnerException is SqliteException { SqliteExtendedErrorCode: SqliteConstraintUnique or SqliteConstraintPrimaryKey };
}
