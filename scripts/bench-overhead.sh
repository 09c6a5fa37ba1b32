#!/usr/bin/env bash
# Benchmark (not a test): the CPU per chat request that the Prometheus metrics (apiserver
# and worker) and a managed API key (over a static one) add, each measured in one process
# against the same request without it (src/overhead.rs), so a cost of a microsecond is not
# lost in the spread of loopback requests between processes (scripts/bench-apiserver.sh).
# Built as shipped (scripts/optimized-env.sh). Prints a Markdown table and the load average.
#
#   scripts/bench-overhead.sh                      # 15 rounds of 20000 requests per variant
#   ROUNDS=31 REQUESTS=50000 scripts/bench-overhead.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${DBGPT_CACHE_DIR:-$HOME/.cache/dbgpt-cluster}/target}
source scripts/optimized-env.sh
cargo build --locked -q --example bench_overhead
echo "# $(date -u +%FT%TZ) load average: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) CPUs; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
# One core, so the thread is not moved between CPUs mid-round.
pin=(); command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ] && pin=(taskset -c 1)
"${pin[@]}" "$CARGO_TARGET_DIR/debug/examples/bench_overhead" --rounds "${ROUNDS:-15}" --requests "${REQUESTS:-20000}"

# INSTRUCTIONS=1: also each variant alone under callgrind (instructions count the same on a
# busy machine): instructions per request with and without the piece, and the difference.
if [ "${INSTRUCTIONS:-0}" = 1 ] && command -v valgrind >/dev/null; then
  n=${CG_REQUESTS:-3000}
  count() {  # count INDEX with|without N -> total instructions
    local out; out=$(mktemp /tmp/bench-overhead.cg.XXXXXX)
    valgrind -q --tool=callgrind --callgrind-out-file="$out" \
      "$CARGO_TARGET_DIR/debug/examples/bench_overhead" --only "$1" $([ "$2" = with ] && echo --with) --requests "$3" 2>/dev/null
    awk '/^(summary|totals):/ { print $2; exit }' "$out"; rm -f "$out"
  }
  echo
  echo "| piece | request | instructions/req without | with | added |"
  echo "|---|---|---:|---:|---:|"
  labels=("metrics (apiserver)|plain" "metrics (worker)|plain" "managed key over static|plain"
          "metrics (apiserver)|stream" "metrics (worker)|stream" "managed key over static|stream")
  for i in 0 1 2 3 4 5; do
    # Two request counts: the difference cancels the start-up.
    a1=$(count $i without 100); a2=$(count $i without $((n + 100)))
    b1=$(count $i with 100); b2=$(count $i with $((n + 100)))
    a=$(( (a2 - a1) / n )); b=$(( (b2 - b1) / n ))
    IFS='|' read -r piece kind <<<"${labels[$i]}"
    echo "| $piece | $kind | $a | $b | **+$((b - a))** |"
  done
fi
