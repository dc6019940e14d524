using Microsoft.EntityFrameworkCore;
using Npgsql;

namespace LoraDeploy.Data;

public sealed class PostgresLoraDeployContext(DbContextOptions<PostgresLoraDeployContext> options) : LoraDeployDbContext(options)
{
    protected override string DeletedFalseFilter => "\"Deleted\" = false";

    public override bool IsUniqueViolation(DbUpdateException exception) =>
        exception.InnerException is PostgresException { SqlState: PostgresErrorCodes.UniqueViolation };
}
