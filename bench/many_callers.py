#!/usr/bin/env python3
"""Prints SQL that adds 256 callers with 10 deploys and one API token each; writes their tokens, one a line.

bench/run.sh pipes it into sqlite3 or psql after the main seed, and bench/many_callers.lua picks one of these callers
at random for every request, so wrk's 64 connections ask for different deploys and lists, as real pollers do.
Tokens are made the way Auth/ApiTokens.cs makes them: ld_{12-char id}_{43-char secret}, SHA-256(secret) stored.

usage: many_callers.py sqlite|postgres TOKENS_FILE
"""
import hashlib
import secrets
import string
import sys

CALLERS = 256
provider, tokens_path = sys.argv[1], sys.argv[2]
pg = provider == "postgres"
alphabet = string.ascii_lowercase + string.digits
now = "'2026-02-01 00:00:00'"
true, false = ("true", "false") if pg else ("1", "0")

out = ["BEGIN;"]
tokens = []
for caller in range(CALLERS):
    token_id = "".join(secrets.choice(alphabet) for _ in range(12))
    secret = secrets.token_urlsafe(32)[:43]
    digest = hashlib.sha256(secret.encode()).hexdigest()
    tokens.append(f"ld_{token_id}_{secret}")
    name = f"poll{caller:04d}"
    stored = f"decode('{digest}', 'hex')" if pg else f"X'{digest}'"
    user = f"(SELECT \"Id\" FROM users WHERE \"Name\" = '{name}')"
    out.append(f"INSERT INTO users (\"Name\", \"IsAdmin\", \"CreatedAt\") VALUES ('{name}', {false}, {now});")
    out.append(f"INSERT INTO api_tokens (\"Id\", \"UserId\", \"SecretHash\", \"Label\", \"CreatedAt\") VALUES ('{token_id}', {user}, {stored}, 'bench', {now});")
    for n in range(10):
        deploy_id = f"pl{caller:06d}{n}"
        lora_id = 5_000_000 + caller * 10 + n
        created = f"'2026-02-01 00:00:{n:02d}'"
        out.append(
            f"INSERT INTO loras (\"Id\", \"UserId\", \"Name\", \"BaseModel\", \"SourceType\", \"SourceUrl\", \"Private\", \"Description\", \"Deleted\", \"CreatedAt\", \"UpdatedAt\", \"ExpectedSha256\", \"SizeBytes\") "
            f"{'OVERRIDING SYSTEM VALUE ' if pg else ''}VALUES ({lora_id}, {user}, 'poll-{n}', 'black-forest-labs/FLUX-1-dev', 'civitai', 'https://civitai.com/models/1?modelVersionId=1', {true}, '', {false}, {created}, {created}, 'aa', 1000);")
        out.append(
            f"INSERT INTO deploys (\"Id\", \"UserId\", \"LoraId\", \"ModelName\", \"Type\", \"Task\", \"Status\", \"FailReason\", \"FailClass\", \"Version\", \"MinInstances\", \"MaxInstances\", \"RunningInstances\", \"PendingInstances\", \"CreatedAt\", \"UpdatedAt\") "
            f"VALUES ('{deploy_id}', {user}, {lora_id}, '{name}/poll-{n}', 'lora', 'text-to-image', 'deploying', '', '', 'aa', 1, 1, 0, 0, {created}, {created});")
out.append("COMMIT;")
out.append("ANALYZE;")
print("\n".join(out))
with open(tokens_path, "w") as f:
    f.write("\n".join(tokens) + "\n")
