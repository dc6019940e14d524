#!/usr/bin/env bash
# HTTP API benchmark: GET /deploy/{id} and GET /deploy/list under wrk (64 connections) against nginx serving the
# same bytes from a static file (the ceiling), on SQLite and on PostgreSQL, for one caller and for 256 callers
# picked at random per request (bench/many_callers.py, .lua), while another user's imports and their progress
# writes run (bench/write_load.py); list latency for a caller with 10,000 deploys among 1,000,000;
# POST /v1/lora/create → deploying for a version whose file is already stored.
#
# Needs (installs nothing): dotnet, wrk, nginx, sqlite3, psql, python3, curl, and a PostgreSQL server where the
# connection may create databases. Debian: apt-get install -y wrk nginx sqlite3 postgresql-client.
#
#   bench/run.sh                     # both providers
#   BENCH_PROVIDERS=sqlite bench/run.sh   # sqlite, sqlite_plain (no bodies kept for polls), postgres
#   (also sqlite_ef / postgres_ef: the deploy reads as plain EF queries, Deploy:Reads=ef, for the comparison)
# Settings (env): BENCH_PG (libpq URL of a server, default postgresql://postgres:postgres@127.0.0.1:5432/postgres),
# BENCH_DURATION (wrk seconds per run, default 10), BENCH_ROWS (total deploys, default 1000000),
# BENCH_CALLER_ROWS (the big caller's deploys, default 10000), BENCH_THREADS (wrk threads, default 2),
# BENCH_WARMUP (seconds of load on each endpoint before it is measured, default 20), BENCH_ROUNDS (rounds of the
# 64-connection runs, each nginx then the API, default 3; the summary gives each round's ratio, the median and the
# worst), BENCH_WRITERS (write-load workers, each with one import at a time, default 4; 0 measures an idle table),
# BENCH_HEARTBEATS (serving workers heartbeating every second during the rounds, as `loradeploy worker` does; default 4).
set -euo pipefail
cd "$(dirname "$0")/.."

PROVIDERS=${BENCH_PROVIDERS:-"sqlite sqlite_plain postgres"}
PG_URL=${BENCH_PG:-postgresql://postgres:postgres@127.0.0.1:5432/postgres}
DURATION=${BENCH_DURATION:-10}
ROWS=${BENCH_ROWS:-1000000}
CALLER_ROWS=${BENCH_CALLER_ROWS:-10000}
THREADS=${BENCH_THREADS:-2}
WARMUP=${BENCH_WARMUP:-20}
ROUNDS=${BENCH_ROUNDS:-3}
WRITERS=${BENCH_WRITERS:-4}
HEARTBEATS=${BENCH_HEARTBEATS:-4}
# A pool for the heartbeating workers only (no deploy is on it, so placement has nothing to do for them).
HEARTBEAT_POOL=bench-heartbeats
LOAD_VERSIONS=8
CONNECTIONS=64

missing=()
for tool in dotnet wrk nginx sqlite3 psql python3 curl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench/run.sh needs: ${missing[*]} (Debian: apt-get install -y wrk nginx sqlite3 postgresql-client python3 curl)" >&2
  exit 2
fi

WORK=$(mktemp -d /tmp/loradeploy-bench.XXXXXX)
chmod 755 "$WORK"
PIDS=()
PG_DB=""
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  [ -n "$PG_DB" ] && psql -q "$PG_URL" -c "DROP DATABASE IF EXISTS \"$PG_DB\" WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "== publishing (Release)"
dotnet publish src/LoraDeploy -c Release -o "$WORK/app" -v quiet -nologo >/dev/null
APP="$WORK/app/loradeploy"

# ---- nginx: the ceiling (static copies of the API's responses) and a static CivitAI stand-in ----
mkdir -p "$WORK/www/civitai" "$WORK/nginx-tmp"
VERSION_ID=900001
ADAPTER_SHA=$(python3 bench/civitai_standin.py "$WORK/www/civitai" "$VERSION_ID" "$LOAD_VERSIONS")
chmod -R a+rX "$WORK/www"
LOAD_IDS=$(seq -s '|' $((VERSION_ID + 1)) $((VERSION_ID + LOAD_VERSIONS)))
NGINX_PORT=$(free_port)
cat >"$WORK/nginx.conf" <<EOF
worker_processes auto;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nodelay on;
  keepalive_requests 10000000;
  client_body_temp_path $WORK/nginx-tmp;
  proxy_temp_path $WORK/nginx-tmp;
  fastcgi_temp_path $WORK/nginx-tmp;
  uwsgi_temp_path $WORK/nginx-tmp;
  scgi_temp_path $WORK/nginx-tmp;
  server {
    listen 127.0.0.1:$NGINX_PORT;
    root $WORK/www;
    location /static/ { default_type application/json; }
    # The write load's versions (ids above VERSION_ID) have files of their own, sent at 256 KB/s so that each of
    # their imports spends ~6 s downloading and publishing progress; every other id is the one small adapter.
    location ~ ^/api/v1/model-versions/(\d+)\$ { default_type application/json; try_files /civitai/version-\$1.json /civitai/version.json =404; }
    location ~ ^/api/download/models/($LOAD_IDS)\$ {
      default_type application/octet-stream;
      limit_rate 256k;
      try_files /civitai/adapter-\$1.safetensors =404;
    }
    location /api/download/models/ { default_type application/octet-stream; try_files /civitai/adapter.safetensors =404; }
  }
}
EOF
mkdir -p "$WORK/www/static"
nginx -c "$WORK/nginx.conf"
NGINX="http://127.0.0.1:$NGINX_PORT"
CIVIT_URL="https://civitai.com/models/$VERSION_ID?modelVersionId=$VERSION_ID"

# ---- helpers ----

# wrk_run NAME URL [TOKEN] → one line "NAME rps p50_ms p99_ms" appended to $WORK/results
wrk_run() {
  local name=$1 url=$2 token=${3:-} out
  if [ -n "$token" ]; then
    out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -H "Authorization: Bearer $token" "$url")
  else
    out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency "$url")
  fi
  wrk_summary "$name" "$out"
}

# wrk_callers NAME KIND → like wrk_run, but each request is one of 256 callers at random (bench/many_callers.lua)
wrk_callers() {
  local name=$1 kind=$2 out
  out=$(BENCH_CALLERS="$WORK/callers.txt" BENCH_KIND=$kind wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency -s bench/many_callers.lua "$BASE")
  wrk_summary "$name" "$out"
}

# wrk_summary NAME WRK_OUTPUT → fails on any non-2xx answer, else one line "NAME rps p50_ms p99_ms" into $WORK/results
wrk_summary() {
  local name=$1 out=$2
  if echo "$out" | grep -q "Non-2xx"; then
    echo "$out" >&2
    echo "wrk saw errors for $name" >&2
    exit 1
  fi
  echo "$out" | awk -v name="$name" '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /Requests\/sec/ { rps = $2 }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    END { printf "%s %.0f %.2f %.2f\n", name, rps, p50, p99 }' | tee -a "$WORK/results"
}

# single_latency NAME URL TOKEN → "NAME p50_ms p99_ms" from one connection (requests one after another)
single_latency() {
  local name=$1 url=$2 token=$3
  wrk_summary "$name" "$(wrk -t1 -c1 -d"${DURATION}s" --latency -H "Authorization: Bearer $token" "$url")"
}

start_server() { # start_server PROVIDER_ARGS...  (sets SERVER_PID, BASE)
  local port
  port=$(free_port)
  "$APP" serve --urls "http://127.0.0.1:$port" --data-dir "$DATA" \
    --Logging:LogLevel:Default=Warning --Logging:LogLevel:Microsoft.Hosting.Lifetime=Warning \
    --Civitai:BaseUrl="$NGINX" --Network:AllowedPrivateRanges:0=127.0.0.0/8 \
    --Pipeline:PollInterval=00:00:00.200 --Pipeline:BlobGracePeriod=00:00:00 --Pipeline:CollectInterval=00:00:05 \
    --RateLimits:Enabled=false \
    --BaseModels:$HEARTBEAT_POOL:Family=sdxl --BaseModels:$HEARTBEAT_POOL:Engine=comfyui \
    --BaseModels:$HEARTBEAT_POOL:ComfyUi:Url=http://127.0.0.1:9 --BaseModels:$HEARTBEAT_POOL:ComfyUi:Checkpoint=bench.safetensors \
    "$@" >"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  BASE="http://127.0.0.1:$port"
  for _ in $(seq 1 300); do
    curl -sf "$BASE/ready" >/dev/null 2>&1 && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "server not ready" >&2; cat "$WORK/server.log" >&2; exit 1
}

stop_server() { kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; }

token() { "$APP" token create --user "$1" --data-dir "$DATA" "${PROVIDER_ARGS[@]}" 2>/dev/null | tail -n 1; }
worker_token() { "$APP" token create --worker "$1" --data-dir "$DATA" "${PROVIDER_ARGS[@]}" 2>/dev/null | tail -n 1; }

# The seed: users 'small' (10 deploys, the wrk target), 'big' ($CALLER_ROWS deploys) and 1,000 others sharing the
# rest, so the deploys table holds $ROWS rows. One lora row per deploy, as the API creates them.
seed_sqlite() {
  local db=$1 others=$((ROWS - CALLER_ROWS - 10))
  sqlite3 "$db" >/dev/null <<EOF
PRAGMA journal_mode=WAL;
PRAGMA synchronous=OFF;
BEGIN;
INSERT INTO users (Name, IsAdmin, CreatedAt)
  WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000)
  SELECT 'other' || i, 0, '2026-01-01 00:00:00' FROM n;
CREATE TEMP TABLE plan AS
  WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $ROWS)
  SELECT i,
    CASE WHEN i <= 10 THEN (SELECT Id FROM users WHERE Name = 'small')
         WHEN i <= 10 + $CALLER_ROWS THEN (SELECT Id FROM users WHERE Name = 'big')
         ELSE (SELECT Id FROM users WHERE Name = 'other' || (1 + i % 1000)) END AS user_id,
    CASE WHEN i <= 10 THEN 'small' WHEN i <= 10 + $CALLER_ROWS THEN 'big' ELSE 'other' || (1 + i % 1000) END AS user_name
  FROM n;
INSERT INTO loras (Id, UserId, Name, BaseModel, SourceType, SourceUrl, Private, Description, Deleted, CreatedAt, UpdatedAt, ExpectedSha256, SizeBytes)
  SELECT 1000000 + i, user_id, 'seed-' || i, 'black-forest-labs/FLUX-1-dev', 'civitai', 'https://civitai.com/models/1?modelVersionId=1', 1, '', 0,
    strftime('%Y-%m-%d %H:%M:%f', '2026-01-01', '+' || i || ' seconds'), strftime('%Y-%m-%d %H:%M:%f', '2026-01-01', '+' || i || ' seconds'),
    '$ADAPTER_SHA', 1000
  FROM plan;
INSERT INTO deploys (Id, UserId, LoraId, ModelName, Type, Task, Status, FailReason, FailClass, Version, MinInstances, MaxInstances, RunningInstances, PendingInstances, CreatedAt, UpdatedAt)
  SELECT printf('seed%012d', i), user_id, 1000000 + i, user_name || '/seed-' || i, 'lora', 'text-to-image', 'deploying', '', '', '$ADAPTER_SHA', 1, 1, 0, 0,
    strftime('%Y-%m-%d %H:%M:%f', '2026-01-01', '+' || i || ' seconds'), strftime('%Y-%m-%d %H:%M:%f', '2026-01-01', '+' || i || ' seconds')
  FROM plan;
COMMIT;
ANALYZE;
EOF
}

seed_postgres() {
  local url=$1
  psql -q -v ON_ERROR_STOP=1 "$url" <<EOF
INSERT INTO users ("Name", "IsAdmin", "CreatedAt")
  SELECT 'other' || i, false, '2026-01-01T00:00:00Z' FROM generate_series(1, 1000) i;
CREATE TEMP TABLE plan AS
  SELECT i,
    CASE WHEN i <= 10 THEN 'small' WHEN i <= 10 + $CALLER_ROWS THEN 'big' ELSE 'other' || (1 + i % 1000) END AS user_name
  FROM generate_series(1, $ROWS) i;
INSERT INTO loras ("Id", "UserId", "Name", "BaseModel", "SourceType", "SourceUrl", "Private", "Description", "Deleted", "CreatedAt", "UpdatedAt", "ExpectedSha256", "SizeBytes")
  OVERRIDING SYSTEM VALUE
  SELECT 1000000 + p.i, u."Id", 'seed-' || p.i, 'black-forest-labs/FLUX-1-dev', 'civitai', 'https://civitai.com/models/1?modelVersionId=1', true, '', false,
    timestamptz '2026-01-01' + p.i * interval '1 second', timestamptz '2026-01-01' + p.i * interval '1 second',
    '$ADAPTER_SHA', 1000
  FROM plan p JOIN users u ON u."Name" = p.user_name;
INSERT INTO deploys ("Id", "UserId", "LoraId", "ModelName", "Type", "Task", "Status", "FailReason", "FailClass", "Version", "MinInstances", "MaxInstances", "RunningInstances", "PendingInstances", "CreatedAt", "UpdatedAt")
  SELECT 'seed' || lpad(p.i::text, 12, '0'), u."Id", 1000000 + p.i, p.user_name || '/seed-' || p.i, 'lora', 'text-to-image', 'deploying', '', '', '$ADAPTER_SHA', 1, 1, 0, 0,
    timestamptz '2026-01-01' + p.i * interval '1 second', timestamptz '2026-01-01' + p.i * interval '1 second'
  FROM plan p JOIN users u ON u."Name" = p.user_name;
ANALYZE;
EOF
}

# ---- one provider ----
run_provider() {
  local provider=$1
  DATA="$WORK/data-$provider"
  mkdir -p "$DATA"
  PROVIDER_ARGS=()
  # sqlite_plain: SQLite without the bodies kept for polls (Deploy:ReadCacheBytes=0), to see what that cache buys.
  SERVER_ARGS=()
  [ "$provider" = sqlite_plain ] && SERVER_ARGS=(--Deploy:ReadCacheBytes=0)
  # *_ef: the deploy reads as plain EF queries instead of DeployReads' own SQL (Deploy:Reads=ef).
  case "$provider" in *_ef) SERVER_ARGS=(--Deploy:Reads=ef) ;; esac
  if [ "${provider%_ef}" = postgres ]; then
    PG_DB="loradeploy_bench_$$"
    psql -q "$PG_URL" -c "CREATE DATABASE \"$PG_DB\"" >/dev/null
    local db_url="${PG_URL%/*}/$PG_DB"
    local npgsql
    npgsql=$(python3 - "$db_url" <<'PY'
import sys
from urllib.parse import urlparse
u = urlparse(sys.argv[1])
# No TLS to a server on the same machine (Npgsql would otherwise negotiate it with Debian's snakeoil certificate).
print(f"Host={u.hostname};Port={u.port or 5432};Username={u.username};Password={u.password or ''};Database={u.path[1:]};Maximum Pool Size=100;SSL Mode=Disable")
PY
)
    PROVIDER_ARGS=(--Database:Provider=postgres "--ConnectionStrings:Postgres=$npgsql")
  fi

  echo "== $provider: migrate, users, seed $ROWS deploys ($CALLER_ROWS for the big caller)"
  local small big writer
  small=$(token small)
  big=$(token big)
  writer=$(token writer)
  local beater
  beater=$(worker_token bench-heartbeats)
  local clock=$SECONDS
  if [ "${provider%_ef}" = postgres ]; then seed_postgres "$db_url"; else seed_sqlite "$DATA/loradeploy.db"; fi
  # 256 more callers with 10 deploys and a token each, for the random-caller runs.
  if [ "${provider%_ef}" = postgres ]; then
    python3 bench/many_callers.py postgres "$WORK/callers.txt" | psql -q -v ON_ERROR_STOP=1 "$db_url" >/dev/null
  else
    python3 bench/many_callers.py sqlite "$WORK/callers.txt" | sqlite3 "$DATA/loradeploy.db" >/dev/null
  fi
  echo "   seeded in $((SECONDS - clock)) s"
  # The plans the hot reads get on the seeded table (the SQL of Deploys/DeployReads.cs, the parameters inlined).
  local by_id="SELECT \"Id\", \"ModelName\", \"Version\", \"Status\" FROM deploys WHERE \"Id\" = 'seed000000000005' AND \"UserId\" = (SELECT \"Id\" FROM users WHERE \"Name\" = 'small') LIMIT 1"
  local list="SELECT \"Id\", \"ModelName\", \"Version\", \"Status\" FROM deploys WHERE \"UserId\" = (SELECT \"Id\" FROM users WHERE \"Name\" = 'big') AND \"Status\" <> 'deleted' ORDER BY \"CreatedAt\" DESC, \"Id\" DESC"
  echo "   plans:"
  if [ "${provider%_ef}" = postgres ]; then
    psql -q "$db_url" -c "VACUUM ANALYZE deploys" >/dev/null
    # With the session settings of the server's read connections (PostgresDeployReads.PlannerSettings).
    for q in "$by_id" "$list"; do
      PGOPTIONS="-c enable_sort=off -c enable_bitmapscan=off" psql -At "$db_url" -c "EXPLAIN (ANALYZE, COSTS OFF) $q" | sed 's/^/     /'
    done
  else
    for q in "$by_id" "$list"; do sqlite3 -readonly "$DATA/loradeploy.db" "EXPLAIN QUERY PLAN $q" | sed 's/^/     /'; done
  fi

  start_server "${PROVIDER_ARGS[@]}" "${SERVER_ARGS[@]}"
  local id=seed000000000005
  curl -sf -H "Authorization: Bearer $small" "$BASE/deploy/$id" >"$WORK/www/static/deploy-$provider.json"
  curl -sf -H "Authorization: Bearer $small" "$BASE/deploy/list" >"$WORK/www/static/list-$provider.json"
  chmod a+r "$WORK/www/static/"*
  echo "   response sizes: deploy $(wc -c <"$WORK/www/static/deploy-$provider.json") B, list (10 items) $(wc -c <"$WORK/www/static/list-$provider.json") B"

  echo "== $provider: wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s, $ROUNDS rounds; 256 = one of 256 callers at random (name#round rps p50_ms p99_ms)"
  # Warm-up: the token cache, the connection pools, and JIT tiering — under full load on two cores the tiered JIT
  # needed well over 10 s to finish the PostgreSQL path (a profile after a 4 s warm-up was still mostly
  # instrumented tier-0 code and the JIT thread), so each endpoint gets $WARMUP s first.
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"${WARMUP}s" -H "Authorization: Bearer $small" "$BASE/deploy/$id" >/dev/null
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"${WARMUP}s" -H "Authorization: Bearer $small" "$BASE/deploy/list" >/dev/null
  # Besides one caller polling one deploy (what nginx's one file matches), each request from one of 256 callers at
  # random: real pollers ask for different deploys and lists (PostgreSQL batches concurrent reads, and only identical
  # ones share a rendered row; SQLite keeps a rendered body per deploy and per caller's list). Each caller's 10-item
  # list is 3.3 KB, its deploy 330 B: the nginx numbers stay the ceiling. wrk's Lua request hook costs wrk some CPU.
  BENCH_CALLERS="$WORK/callers.txt" BENCH_KIND=deploy wrk -t"$THREADS" -c"$CONNECTIONS" -d"${WARMUP}s" -s bench/many_callers.lua "$BASE" >/dev/null
  BENCH_CALLERS="$WORK/callers.txt" BENCH_KIND=list wrk -t"$THREADS" -c"$CONNECTIONS" -d"${WARMUP}s" -s bench/many_callers.lua "$BASE" >/dev/null
  # The reads are measured while another user's imports run: each writer creates a deploy of one of the stand-in's
  # slow files, waits for `deploying` (progress rows every 0.5 s meanwhile) and deletes it, over and over; the
  # collector deletes the unreferenced blobs, so the versions keep being downloaded again. Every commit also ends
  # the SQLite bodies kept for polls.
  local load_pid=""
  # And workers heartbeat every second (one committed write each), as serving workers do.
  if [ "$WRITERS" -gt 0 ] || [ "$HEARTBEATS" -gt 0 ]; then
    python3 bench/write_load.py "$BASE" "$writer" $((VERSION_ID + 1)) "$LOAD_VERSIONS" "$WRITERS" "$beater" "$HEARTBEATS" "$HEARTBEAT_POOL" >"$WORK/write-load-$provider.txt" 2>&1 &
    load_pid=$!
    sleep 5
  fi
  # Rounds, nginx right before the API each time: this machine's speed moves from one minute to the next.
  for round in $(seq 1 "$ROUNDS"); do
    wrk_run "nginx-deploy-$provider#$round" "$NGINX/static/deploy-$provider.json"
    wrk_run "api-deploy-$provider#$round" "$BASE/deploy/$id" "$small"
    wrk_callers "api-deploy256-$provider#$round" deploy
    wrk_run "nginx-list-$provider#$round" "$NGINX/static/list-$provider.json"
    wrk_run "api-list-$provider#$round" "$BASE/deploy/list" "$small"
    wrk_callers "api-list256-$provider#$round" list
  done
  if [ -n "$load_pid" ]; then
    kill -TERM "$load_pid"
    wait "$load_pid" || { cat "$WORK/write-load-$provider.txt" >&2; exit 1; }
    echo "   $(cat "$WORK/write-load-$provider.txt") during the rounds"
  fi

  echo "== $provider: GET /deploy/list for the caller with $CALLER_ROWS deploys, one connection (name rps p50_ms p99_ms)"
  curl -sf -H "Authorization: Bearer $big" "$BASE/deploy/list" -o "$WORK/big.json"
  echo "   response: $(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$WORK/big.json") items, $(wc -c <"$WORK/big.json") B"
  # The same 3.97 MB from nginx, one request at a time: what moving the bytes through HTTP costs here.
  cp "$WORK/big.json" "$WORK/www/static/biglist-$provider.json" && chmod a+r "$WORK/www/static/biglist-$provider.json"
  single_latency "nginx-biglist-$provider" "$NGINX/static/biglist-$provider.json" "-"
  single_latency "api-biglist-$provider" "$BASE/deploy/list" "$big"

  echo "== $provider: create → deploying of an already-stored version (median p90 max, ms, 20 creates)"
  # Store the file once through the stand-in (a real import), then time creates that find it stored.
  python3 bench/create_latency.py "$BASE" "$big" "$CIVIT_URL" 1 "first-$provider" >/dev/null
  python3 bench/create_latency.py "$BASE" "$big" "$CIVIT_URL" 20 "timed-$provider" | sed "s/^/create-$provider /" | tee -a "$WORK/results"

  stop_server
  if [ "${provider%_ef}" = postgres ]; then
    psql -q "$PG_URL" -c "DROP DATABASE IF EXISTS \"$PG_DB\" WITH (FORCE)" >/dev/null
    PG_DB=""
  fi
}

for provider in $PROVIDERS; do
  run_provider "$provider"
done

echo
echo "== summary (ratios are to nginx serving the same bytes in the same run)"
python3 - "$WORK/results" <<'PY'
import statistics, sys
rows, rounds = {}, {}
for line in open(sys.argv[1]):
    parts = line.split()
    name, _, number = parts[0].partition("#")
    rows.setdefault(name, []).append([float(x) for x in parts[1:]])
    if number:
        rounds.setdefault(name, {})[int(number)] = [float(x) for x in parts[1:]]
def median(values):
    return statistics.median(values)
print(f"{'endpoint':<26}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'× nginx':>9}{'worst':>7}  per round (× nginx / p99 ms)")
for name, runs in rows.items():
    if name in rounds:
        rps, p50, p99 = (median([r[i] for r in runs]) for i in range(3))
        line = f"{name:<26}{rps:>9.0f}{p50:>8.2f}{p99:>8.2f}"
        if name.startswith("api-"):
            _, kind, provider = name.split("-")
            ceiling = rounds[f"nginx-{kind.removesuffix('256')}-{provider}"]
            ratios = [values[0] / ceiling[n][0] for n, values in sorted(rounds[name].items())]
            per = " ".join(f"{ratio:.2f}/{values[2]:.1f}" for ratio, (_, values) in zip(ratios, sorted(rounds[name].items())))
            line += f"{median(ratios):>9.2f}{min(ratios):>7.2f}  {per}"
        print(line)
    elif name.startswith("api-biglist") or name.startswith("nginx-biglist"):
        print(f"{name:<26}{runs[0][0]:>9.0f}{runs[0][1]:>8.2f}{runs[0][2]:>8.2f}")
    else:
        print(f"{name:<26} median {runs[0][0]:.1f} ms, p90 {runs[0][1]:.1f} ms, max {runs[0][2]:.1f} ms")
PY
