#!/usr/bin/env bash
# Load figure for examples/http_server.cpp: wrk against the server on loopback, the same run
# alternating three set-ups: no valve at all, valve with an unlimited per-client limit, and a
# per-client limit of 1000/s (burst 100) for one key, whose served rate must match the limit.
# Usage: bash bench/http_load.sh [seconds per run] [rounds]   (needs: apt-get install wrk)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-3}
cmake --preset release >/dev/null
cmake --build --preset release --target example_http_server >/dev/null
server=build/release/examples/example_http_server

run() { # $1 = label, rest = server options
  local label=$1; shift
  local log; log=$(mktemp)
  "$server" --listen 127.0.0.1:0 "$@" >"$log" &
  local pid=$!
  local port=""
  for _ in $(seq 100); do port=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$log"); [ -n "$port" ] && break; sleep 0.05; done
  local out
  out=$(wrk -t1 -c32 -d"${secs}s" --latency -H 'X-Api-Key: bench' "http://127.0.0.1:$port/hello")
  kill -TERM "$pid"; wait "$pid" || true; rm -f "$log"
  local total rps p99 non2xx
  total=$(echo "$out" | sed -n 's/^ *\([0-9]*\) requests in.*/\1/p')
  rps=$(echo "$out" | sed -n 's/^Requests\/sec: *\([0-9.]*\)/\1/p')
  p99=$(echo "$out" | sed -n 's/^ *99% *\([0-9.]*[a-z]*\)/\1/p')
  non2xx=$(echo "$out" | sed -n 's/^ *Non-2xx or 3xx responses: *\([0-9]*\)/\1/p'); non2xx=${non2xx:-0}
  printf '%-22s requests/s %10s  p99 %8s  served (2xx) %8d = %8.1f/s\n' "$label" "$rps" "$p99" \
    $((total - non2xx)) "$(awk -v t="$total" -v n="$non2xx" -v s="$secs" 'BEGIN { print (t - n) / s }')"
}

for r in $(seq "$rounds"); do
  echo "round $r"
  run "no valve" --no-limit
  run "valve, unlimited" --unlimited
  run "valve, 1000/s burst 100" --client-rate 1000 --client-burst 100
done
