#!/bin/bash
# valve's shared-limiter throughput beside the Go pool govalve builds (a bounded channel, 2
# workers, each calling x/time/rate's Wait at an unlimited rate before each task) and beside
# asio::post to a thread_pool(2): 1,000,000 no-op tasks from 4 submitters each. Runs the two
# programs alternately, ROUNDS rounds (3 by default), and prints each round's figures and the
# medians of the ratios. Not in CI. Needs Debian's golang-go and golang-golang-x-time-dev, and
# a release build of bench_limiter:
#
#   cmake --preset release && cmake --build --preset release --target bench_limiter
#   bash bench/compare_go.sh [build/release/bench/bench_limiter]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bench=${1:-$here/../build/release/bench/bench_limiter}
rounds=${ROUNDS:-3}
command -v go > /dev/null || { echo "compare_go.sh: go not found; apt-get install golang-go golang-golang-x-time-dev" >&2; exit 1; }
[ -d /usr/share/gocode/src/golang.org/x/time/rate ] ||
    { echo "compare_go.sh: x/time/rate not found; apt-get install golang-golang-x-time-dev" >&2; exit 1; }
[ -x "$bench" ] || { echo "compare_go.sh: $bench not found; build the release preset's bench_limiter" >&2; exit 1; }

gobin=$(mktemp -d)/go_pool
trap 'rm -rf "$(dirname "$gobin")"' EXIT
(cd "$here/go_pool" && GOPATH=/usr/share/gocode GO111MODULE=off go build -o "$gobin" main.go)

# "2.28M/s" -> 2.28 (millions)
millions() { awk '{v=$1; sub(/\/s$/,"",v); m=1; if (v ~ /k$/) m=1e-3; if (v ~ /M$/) m=1; if (v ~ /G$/) m=1e3; sub(/[kMG]$/,"",v); printf "%.3f\n", v*m}'; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

go_ratios=() post_ratios=()
echo "round  go+x/time/rate  asio::post  valve  valve/go  valve/post   (M tasks/s)"
for r in $(seq 1 "$rounds"); do
    go_m=$("$gobin" -limiter -runs 3 | awk '{print $(NF-2)}' | median)
    out=$("$bench" --benchmark_filter=throughput --benchmark_repetitions=3 --benchmark_min_time=0.3 \
        --benchmark_enable_random_interleaving=true --benchmark_report_aggregates_only=true 2> /dev/null)
    post_m=$(echo "$out" | awk '/BM_throughput_asio_post_to_pool.*_median/ {for (i=1;i<=NF;i++) if ($i ~ /^tasks_per_second=/) {sub(/tasks_per_second=/,"",$i); print $i}}' | millions)
    valve_m=$(echo "$out" | awk '/BM_throughput_shared_limiter_2_workers.*_median/ {for (i=1;i<=NF;i++) if ($i ~ /^tasks_per_second=/) {sub(/tasks_per_second=/,"",$i); print $i}}' | millions)
    rg=$(awk -v a="$valve_m" -v b="$go_m" 'BEGIN {printf "%.2f", a/b}')
    rp=$(awk -v a="$valve_m" -v b="$post_m" 'BEGIN {printf "%.2f", a/b}')
    go_ratios+=("$rg") post_ratios+=("$rp")
    printf "%5d  %14s  %10s  %5s  %8s  %10s\n" "$r" "$go_m" "$post_m" "$valve_m" "${rg}x" "${rp}x"
done
echo "median valve/go: $(printf '%s\n' "${go_ratios[@]}" | median)x   median valve/asio::post: $(printf '%s\n' "${post_ratios[@]}" | median)x"
