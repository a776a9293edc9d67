#!/usr/bin/env bash
# Starts a throwaway redis-server on a unix socket, runs three example_fleet processes on it at
# once, and prints what each got: together about RATE per second, not three times that.
#
#   bash examples/fleet_demo.sh [path/to/example_fleet] [SECONDS] [RATE]
set -euo pipefail
fleet=${1:-build/release/examples/example_fleet}
seconds=${2:-5}
rate=${3:-10}
dir=$(mktemp -d)
redis-server --port 0 --unixsocket "$dir/redis.sock" --save '' --appendonly no --daemonize no \
  --logfile "$dir/redis.log" &
redis=$!
trap 'kill $redis 2>/dev/null; wait $redis 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do [ -S "$dir/redis.sock" ] && break; sleep 0.05; done
[ -S "$dir/redis.sock" ] || { echo "redis-server did not start: $(cat "$dir/redis.log")" >&2; exit 1; }

pids=()
for i in 1 2 3; do "$fleet" "unix://$dir/redis.sock" "$seconds" "$rate" > "$dir/out.$i" & pids+=($!); done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
cat "$dir"/out.*
total=$(awk '/granted in/ { sum += $3 } END { print sum + 0 }' "$dir"/out.*)
echo "fleet: $total granted in $seconds s; the key allows $((rate * seconds + rate))"
# The limit holds for the fleet: never more than the key allows, and most of it used.
[ "$total" -le $((rate * seconds + rate + 1)) ] && [ "$total" -ge $(((rate * seconds + rate) * 9 / 10)) ] || status=1
exit $status
