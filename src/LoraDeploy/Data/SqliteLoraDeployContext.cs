using Microsoft.Data.Sqlite;
using Microsoft.EntityFrameworkCore;

namespace LoraDeploy.Data;

public sealed class SqliteLoraDeployContext(DbContextOptions<SqliteLoraDeployContext> options) : LoraDeployDbContext(options)
{
    private const int SqliteConstraintUnique = 2067;
    private const int SqliteConstraintPrimaryKey = 1555;

    // Written the way EF writes "!l.Deleted" (NOT "Deleted"): SQLite uses a partial index only when the query's WHERE
    // contains the index's WHERE term, and it cannot prove that NOT "Deleted" implies "Deleted" = 0, so with that
    // spelling every name check scanned all LoRAs.
    protected override string DeletedFalseFilter => "NOT \"Deleted\"";

    public override bool IsUniqueViolation(DbUpdateException exception) =>
        exception.InnerException is SqliteException { SqliteExtendedErrorCode: SqliteConstraintUnique or SqliteConstraintPrimaryKey };
}
