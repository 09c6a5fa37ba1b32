#!/usr/bin/env bash
# Controller benchmark (not a test: it prints a table and asserts nothing).
#
# Builds the `dbgpt` binary and the `hello_hyper` / `loadgen` examples optimised (our crate
# at opt-level 3 in the dev profile; dependencies are opt-level 3 already), copies them out
# of the target dir, then in ONE run on loopback:
#   * starts a controller (foreground, private temp dirs, ephemeral port) and registers
#     1000 instances; stops it gracefully and keeps a copy of that registry file;
#   * restarts it on the same file and starts the bare hyper server (examples/hello_hyper);
#   * drives heartbeat / hello / list / register at each concurrency for BENCH_SECS seconds
#     (closed loop, keep-alive), reading the server's utime+stime from /proc before and
#     after each run for CPU µs per request; the whole sequence is repeated BENCH_ROUNDS
#     times (heartbeat and hello back to back each time) and the table shows per-row
#     medians over the rounds, the ratio columns the median of the per-round ratios, so a
#     burst of load from other processes on a shared machine skews one round, not the row;
#   * measures idle RSS and start-up time to the first 200 from /api/health (median);
#   * prints one markdown table plus the start-up and RSS lines.
# The server is pinned to CPU 0 and the load generator to CPU 1 with taskset when there
# are at least two CPUs (BENCH_PIN=0 disables it).
#
# Environment: BENCH_SECS per run (default 2), BENCH_ROUNDS (default 3),
# BENCH_CONCS (default "1 16 64"),
# BENCH_MAX_REQUESTS per run (default 500000), BENCH_STARTS (default 10),
# BENCH_NO_BUILD=1 to reuse the binaries already in $BENCH_BIN_DIR (default
# $CARGO_TARGET_DIR/bench-bin), e.g. to compare another build of dbgpt.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${BENCH_SECS:-2}
ROUNDS=${BENCH_ROUNDS:-3}
CONCS=${BENCH_CONCS:-"1 16 64"}
MAX_REQ=${BENCH_MAX_REQUESTS:-500000}
STARTS=${BENCH_STARTS:-10}
INSTANCES=1000
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/dbgpt-cluster/target}
BIN=${BENCH_BIN_DIR:-$CARGO_TARGET_DIR/bench-bin}

if [ -z "${BENCH_NO_BUILD:-}" ]; then
    # The target dir is shared with other checkouts: their plain dev builds overwrite
    # debug/dbgpt. Copy right after building and check that the copy was built from this
    # checkout (its debug info names this directory); rebuild if not.
    mkdir -p "$BIN"
    for attempt in 1 2 3; do
        echo "== building (dev profile, opt-level 3 for dbgpt-cluster), attempt $attempt" >&2
        (source scripts/optimized-env.sh && cargo build --examples >&2)
        scripts/build-optimized.sh >&2   # dbgpt as shipped (function order applied)
        ok=1
        for f in dbgpt examples/hello_hyper examples/loadgen; do
            cp "$CARGO_TARGET_DIR/debug/$f" "$BIN/$(basename "$f").new"
            grep -qF "$PWD" "$BIN/$(basename "$f").new" || ok=0
        done
        [ "$ok" = 1 ] && break
        echo "   a build from another checkout replaced the binaries; building again" >&2
    done
    [ "$ok" = 1 ] || { echo "could not get binaries built from $PWD" >&2; exit 1; }
    for f in dbgpt hello_hyper loadgen; do mv "$BIN/$f.new" "$BIN/$f"; done
fi
for f in dbgpt hello_hyper loadgen; do
    [ -x "$BIN/$f" ] || { echo "missing $BIN/$f (run without BENCH_NO_BUILD)" >&2; exit 1; }
done

SRV=() GEN=()
if [ "${BENCH_PIN:-1}" != 0 ] && command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    SRV=(taskset -c 0) GEN=(taskset -c 1)
    pinning="server pinned to CPU 0, load generator to CPU 1 (taskset)"
else
    pinning="no CPU pinning"
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/dbgpt-bench.XXXXXX")
export DBGPT_RUNTIME_DIR=$tmp/run DBGPT_STATE_DIR=$tmp/state DBGPT_LOG_DIR=$tmp/log
unset CONTROLLER_ADDRESS NOTIFY_SOCKET DBGPT_LOG_LEVEL RUST_LOG
mkdir -p "$DBGPT_LOG_DIR"

ctl_pid= hello_pid=
stop_pid() { # pid: SIGTERM, wait up to 10 s, then SIGKILL
    local pid=$1
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    stop_pid "$ctl_pid"
    stop_pid "$hello_pid"
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_health() { # port [path]: up to 20 s
    for _ in $(seq 400); do
        curl -sf -o /dev/null "http://127.0.0.1:$1${2:-/api/health}" && return 0
        sleep 0.05
    done
    echo "server on port $1 never answered" >&2
    exit 1
}

lg() { "${GEN[@]}" "$BIN/loadgen" "$@"; }

registry=$tmp/registry.redb
start_controller() {
    ctl_port=$(lg freeport)
    "${SRV[@]}" "$BIN/dbgpt" start controller --host 127.0.0.1 --port "$ctl_port" \
        --registry_path "$registry" >>"$tmp/controller.log" 2>&1 &
    ctl_pid=$!
    wait_health "$ctl_port"
}

rss_line() { # pid
    awk '/^VmRSS|^RssAnon|^RssFile/ {printf "%s %s kB  ", $1, $2}' "/proc/$1/status"
}

echo "== populating $INSTANCES instances" >&2
start_controller
lg populate --addr "127.0.0.1:$ctl_port" --instances "$INSTANCES" >&2
stop_pid "$ctl_pid"; ctl_pid=
cp "$registry" "$tmp/populated.redb"
start_controller
hello_port=$(lg freeport)
"${SRV[@]}" "$BIN/hello_hyper" "$hello_port" >"$tmp/hello.log" 2>&1 &
hello_pid=$!
wait_health "$hello_port" /
sleep 3
ctl_rss=$(rss_line "$ctl_pid")
hello_rss=$(rss_line "$hello_pid")
ctl_rss_kb=$(awk '/^VmRSS/ {print $2}' "/proc/$ctl_pid/status")

results=$tmp/results.tsv
: >"$results"
run() { # mode conc port pid  (uses $round)
    local line
    line=$round$'\t'$(lg run --addr "127.0.0.1:$3" --mode "$1" --conc "$2" --secs "$SECS" \
        --max-requests "$MAX_REQ" --instances "$INSTANCES" --pid "$4")
    echo "$line" >>"$results"
    echo "   $line" >&2
}
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
echo "== load: round mode conc requests secs req/s p50_us p99_us errors server_cpu_us/req gen_cpu_us/req" >&2
# The controller and the bare server back to back at each concurrency, then the rest
# (registration last: it adds instances).
for round in $(seq "$ROUNDS"); do
    for c in $CONCS; do
        run heartbeat "$c" "$ctl_port" "$ctl_pid"
        run hello "$c" "$hello_port" "$hello_pid"
    done
    for c in $CONCS; do run list "$c" "$ctl_port" "$ctl_pid"; done
done
for round in $(seq "$ROUNDS"); do
    for c in $CONCS; do run register "$c" "$ctl_port" "$ctl_pid"; done
done
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
stop_pid "$ctl_pid"; ctl_pid=
stop_pid "$hello_pid"; hello_pid=

echo "== start-up ($STARTS starts each)" >&2
startup_empty=$(lg startup --bin "$BIN/dbgpt" --runs "$STARTS")
startup_full=$(lg startup --bin "$BIN/dbgpt" --runs "$STARTS" --registry "$tmp/populated.redb")

echo
echo "Controller benchmark: $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, medians of $ROUNDS rounds of ${SECS} s per row," \
    "$INSTANCES instances registered; $pinning."
echo "Load average (1/5/15 min) before the runs: $load_start; after: $load_end."
echo
echo "| mode | conc | req/s | p50 µs | p99 µs | errors | server CPU µs/req | loadgen CPU µs/req | req/s vs hello | CPU/req vs hello |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
awk -F'\t' '
    function median(list,    n, a, i, j, t) {
      n = split(list, a, " ")
      for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j-1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j-1]; a[j-1] = t }
      return n ? a[int((n + 1) / 2)] : "-"
    }
    # Columns: round mode conc requests secs req/s p50 p99 errors cpu gen
    { k = $2 SUBSEP $3
      if (!(k in seen)) { seen[k] = 1; order[++nk] = k; mode[k] = $2; conc[k] = $3 }
      rps[k] = rps[k] " " $6; p50[k] = p50[k] " " $7; p99[k] = p99[k] " " $8
      err[k] += $9; cpu[k] = cpu[k] " " $10; gen[k] = gen[k] " " $11
      r_rps[$1, $2, $3] = $6; r_cpu[$1, $2, $3] = $10; rounds[$1] = 1 }
    END {
      for (i = 1; i <= nk; i++) {
        k = order[i]; r = "-"; c = "-"; rr = ""; cr = ""
        if (mode[k] == "heartbeat") {
          for (x in rounds) {
            h = r_rps[x, "hello", conc[k]]; hc = r_cpu[x, "hello", conc[k]]
            if (h > 0) rr = rr " " 100 * r_rps[x, "heartbeat", conc[k]] / h
            if (hc > 0 && r_cpu[x, "heartbeat", conc[k]] != "-") cr = cr " " r_cpu[x, "heartbeat", conc[k]] / hc
          }
          if (rr != "") r = sprintf("%.0f%%", median(rr))
          if (cr != "") c = sprintf("%.2f×", median(cr))
        }
        printf "| %s | %s | %s | %s | %s | %d | %s | %s | %s | %s |\n", mode[k], conc[k], median(rps[k]), median(p50[k]), median(p99[k]), err[k], median(cpu[k]), median(gen[k]), r, c
      }
    }' "$results"
echo
echo "Start-up, spawn to first 200 from /api/health, median of $STARTS (ms): empty registry" \
    "$(cut -f1 <<<"$startup_empty") [$(cut -f2 <<<"$startup_empty")];" \
    "$INSTANCES-instance registry $(cut -f1 <<<"$startup_full") [$(cut -f2 <<<"$startup_full")]."
echo "Idle RSS after registering $INSTANCES instances and 3 s idle: controller $(awk -v k="$ctl_rss_kb" 'BEGIN { printf "%.1f", k / 1024 }') MiB ($ctl_rss); bare hyper server: $hello_rss."
