#!/usr/bin/env bash
# Rate limiter overhead: GET /deploy/{id} under wrk with RateLimits:Enabled=false and with the limit on but set too
# high to trigger (RequestsPerMinute=1000000), alternating, same server binary and data, one run. Every limited
# request costs one upsert of the caller's window row; with one caller (the worst case: every request on one row)
# and with 256 callers picked at random per request (bench/many_callers.lua, a row each).
#
# Needs (installs nothing): dotnet, wrk, sqlite3, psql, python3, curl; PostgreSQL where the connection may create
# databases (BENCH_PG, default postgresql://postgres:postgres@127.0.0.1:5432/postgres).
#
#   bench/rate_limits.sh                        # sqlite and postgres
#   BENCH_PROVIDERS=sqlite bench/rate_limits.sh
# Settings (env): BENCH_DURATION (wrk seconds per run, default 5), BENCH_ROUNDS (off/on pairs, default 1),
# BENCH_CONNECTIONS (default 64), BENCH_THREADS (default 2). Defaults: about 25 s of load per provider.
set -euo pipefail
cd "$(dirname "$0")/.."

PROVIDERS=${BENCH_PROVIDERS:-"sqlite postgres"}
PG_URL=${BENCH_PG:-postgresql://postgres:postgres@127.0.0.1:5432/postgres}
DURATION=${BENCH_DURATION:-5}
ROUNDS=${BENCH_ROUNDS:-1}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-2}

for tool in dotnet wrk sqlite3 psql python3 curl; do
  command -v "$tool" >/dev/null 2>&1 || { echo "bench/rate_limits.sh needs $tool" >&2; exit 2; }
done

WORK=$(mktemp -d /tmp/loradeploy-ratelimit-bench.XXXXXX)
SERVER_PID=""
PG_DB=""
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null || true
  [ -n "$PG_DB" ] && psql -q "$PG_URL" -c "DROP DATABASE IF EXISTS \"$PG_DB\" WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "== publishing (Release)"
dotnet publish src/LoraDeploy -c Release -o "$WORK/app" -v quiet -nologo >/dev/null
APP="$WORK/app/loradeploy"

start_server() { # start_server EXTRA_ARGS...
  local port
  port=$(free_port)
  "$APP" serve --urls "http://127.0.0.1:$port" --data-dir "$DATA" "${PROVIDER_ARGS[@]}" \
    --Logging:LogLevel:Default=Warning --Logging:LogLevel:Microsoft.Hosting.Lifetime=Warning \
    --Pipeline:Enabled=false --Workers:Embedded=false "$@" >"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  BASE="http://127.0.0.1:$port"
  for _ in $(seq 1 300); do
    curl -sf "$BASE/ready" >/dev/null 2>&1 && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "server not ready" >&2; cat "$WORK/server.log" >&2; exit 1
}
stop_server() { kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""; }

# run NAME [wrk args...] → "NAME rps p50_ms p99_ms"; any non-2xx answer (a 429 would be one) fails the run.
run() {
  local name=$1 out
  shift
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" --latency "$@")
  if echo "$out" | grep -q "Non-2xx"; then echo "$out" >&2; echo "wrk saw errors for $name" >&2; exit 1; fi
  echo "$out" | awk -v name="$name" '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /Requests\/sec/ { rps = $2 }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    END { printf "%s %.0f %.2f %.2f\n", name, rps, p50, p99 }' | tee -a "$WORK/results"
}

for provider in $PROVIDERS; do
  DATA="$WORK/data-$provider"
  mkdir -p "$DATA"
  PROVIDER_ARGS=()
  if [ "$provider" = postgres ]; then
    PG_DB="ld_ratelimit_bench_$$"
    psql -q "$PG_URL" -c "CREATE DATABASE \"$PG_DB\"" >/dev/null
    PG_CONN=$(python3 -c 'import sys, urllib.parse as u; p = u.urlparse(sys.argv[1]); print("Host=%s;Port=%s;Username=%s;Password=%s;Database=%s" % (p.hostname, p.port or 5432, p.username, p.password or "", sys.argv[2]))' "$PG_URL" "$PG_DB")
    PROVIDER_ARGS=(--Database:Provider=postgres "--ConnectionStrings:Postgres=$PG_CONN")
    SQL() { psql -q -v ON_ERROR_STOP=1 "${PG_URL%/*}/$PG_DB"; }
  else
    SQL() { sqlite3 "$DATA/loradeploy.db" >/dev/null; }
  fi
  start_server # migrates
  stop_server
  token=$("$APP" token create --user small --data-dir "$DATA" "${PROVIDER_ARGS[@]}" 2>/dev/null | tail -n 1)
  SQL <<'EOF2'
INSERT INTO loras ("UserId", "Name", "BaseModel", "SourceType", "SourceUrl", "Private", "Description", "Deleted", "CreatedAt", "UpdatedAt", "SizeBytes")
  SELECT "Id", 'bench', 'black-forest-labs/FLUX-1-dev', 'civitai', 'https://civitai.com/models/1?modelVersionId=1', true, '', false,
    '2026-01-01 00:00:00', '2026-01-01 00:00:00', 1000 FROM users WHERE "Name" = 'small';
INSERT INTO deploys ("Id", "UserId", "LoraId", "ModelName", "Type", "Task", "Status", "FailReason", "FailClass", "Version", "MinInstances", "MaxInstances", "RunningInstances", "PendingInstances", "CreatedAt", "UpdatedAt")
  SELECT 'benchdeploy0001', l."UserId", l."Id", 'small/bench', 'lora', 'text-to-image', 'deploying', '', '', '', 1, 1, 0, 0,
    '2026-01-01 00:00:00', '2026-01-01 00:00:00' FROM loras l WHERE l."Name" = 'bench';
EOF2
  # 256 callers with deploys of their own, for the spread case (the same seed bench/run.sh uses).
  python3 bench/many_callers.py "$provider" "$WORK/callers-$provider.txt" | SQL
  for round in $(seq 1 "$ROUNDS"); do
    for mode in off on; do
      if [ "$mode" = off ]; then start_server --RateLimits:Enabled=false; else start_server --RateLimits:RequestsPerMinute=1000000; fi
      # Measure inside one clock minute: each user's first claim of a minute is a write, and 256 callers make 256 at
      # each minute's start (seen in the warm-up's latency, reported separately in docs/benchmarks.md).
      second=$(date -u +%-S)
      if [ "$second" -gt 40 ]; then sleep $((61 - second)); fi
      curl -sf -H "Authorization: Bearer $token" "$BASE/deploy/benchdeploy0001" >/dev/null
      # Warm-up of both shapes: the JIT, the pools, and each caller's first claim of the minute (256 writes at once).
      wrk -t"$THREADS" -c"$CONNECTIONS" -d1s -H "Authorization: Bearer $token" "$BASE/deploy/benchdeploy0001" >/dev/null
      BENCH_CALLERS="$WORK/callers-$provider.txt" BENCH_KIND=deploy wrk -t"$THREADS" -c"$CONNECTIONS" -d2s -s bench/many_callers.lua "$BASE" >/dev/null
      run "one-caller-$provider-$mode#$round" -H "Authorization: Bearer $token" "$BASE/deploy/benchdeploy0001"
      BENCH_CALLERS="$WORK/callers-$provider.txt" BENCH_KIND=deploy run "256-callers-$provider-$mode#$round" -s bench/many_callers.lua "$BASE"
      stop_server
    done
  done
  [ "$provider" = postgres ] && { psql -q "$PG_URL" -c "DROP DATABASE IF EXISTS \"$PG_DB\" WITH (FORCE)" >/dev/null; PG_DB=""; }
done

echo "== limits on / off (throughput ratio per round)"
awk '{ split($1, a, "#"); key = a[1]; sub(/-(on|off)$/, "", key); mode = (a[1] ~ /-on$/) ? "on" : "off"; r[key "#" a[2], mode] = $2; k[key "#" a[2]] = 1 }
  END { for (x in k) printf "%s %.2f (%s vs %s req/s)\n", x, r[x, "on"] / r[x, "off"], r[x, "on"], r[x, "off"] }' "$WORK/results" | sort
