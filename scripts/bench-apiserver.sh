#!/usr/bin/env bash
# Benchmark (not a test): OpenAI chat completions straight to a fast fake upstream vs through
# the apiserver, at several concurrencies, bounded in time. Prints a Markdown table.
#
#   scripts/bench-apiserver.sh                 # 5 s per phase, concurrency 1,32,128
#   SECS=3 CONC=1,32 scripts/bench-apiserver.sh
#   BENCH_BIN_DIR=/tmp/old scripts/bench-apiserver.sh   # binaries of another build, no build
#   BENCH_OLD_BIN=/tmp/old/dbgpt scripts/bench-apiserver.sh  # A/B: another build's apiserver
#                                   # + proxy worker as extra rows ("old …"), same fake and client
#   BENCH_SGLANG=1 scripts/bench-apiserver.sh   # pip install sglang-router==0.3.2 if missing
#   BENCH_METRICS=0 scripts/bench-apiserver.sh  # without the "metrics off" rows
#   BENCH_KEYS=0 scripts/bench-apiserver.sh     # without the "static key"/"managed key" rows
#   BENCH_OVERHEAD=0 scripts/bench-apiserver.sh # without the in-process cost table (bench-overhead.sh)
#
# Rows (each at every concurrency; a plain and a streamed phase, CPU µs/req for both):
#   direct, apiserver, apiserver+worker, bare relay+worker (below), "apiserver+worker tools"
#   (the same path, every request with a `tools` list, `tool_choice` and a json_schema
#   `response_format`), "apiserver+worker metrics off" (a second apiserver and proxy worker
#   started with --metrics_addr off, model "viaworker_nometrics": the difference to
#   "apiserver+worker", printed per concurrency after the tables, is what serving /metrics
#   costs; --metrics_addr off still records every metric, for `dbgpt ctl status`, so the
#   recording's own cost is measured in one process by scripts/bench-overhead.sh),
#   "apiserver+worker static key" and "apiserver+worker managed key" (a third
#   apiserver started with --api_keys, behind its own controller and proxy worker, called
#   once with that static key and once with a managed key created through the keys API, carrying every limit (rpm, tpm,
#   max_concurrency, daily_tokens, on the key and on the model) set far too high to trip:
#   the CPU a managed key's auth, limits and usage add per request is the difference,
#   printed per concurrency after the tables), and, when the wheel is installed (python3 -c 'import sglang_router'),
#   "sglang" and "sglang tools": SGLang's Rust gateway (sglang-router 0.3.2,
#   `python3 -m sglang_router.launch_router`, its defaults but --log-level warn; SGLANG_ARGS
#   adds flags) in front of the same fake. The gateway probes the fake's /health,
#   /server_info and /model_info first. Streamed requests carry
#   stream_options.include_usage (19 events + [DONE]: role, 16 tokens, finish, usage).
#   The last table sums each row's CPU per request over its pids except the fake's: the
#   whole path (apiserver + proxy worker vs the gateway).
#
# Build: our crate as shipped (scripts/optimized-env.sh), dependencies reused from the
# dev cache (they are already opt-level 3); never --release.
#
# Topology:   bench ──► fake_openai /v1                       ("direct")
#             bench ──► apiserver ──► fake_openai worker API   ("apiserver")
#             bench ──► apiserver ──► dbgpt proxy worker ──► fake_openai /v1   ("apiserver+worker")
#             bench ──► bare_relay ──► dbgpt proxy worker ──► fake_openai /v1  ("bare relay+worker")
# bare_relay (examples/bare_relay.rs) is the baseline for the apiserver's own cost: the same
# HTTP stack (hyper server on one single-threaded runtime, the apiserver's worker pool)
# passing the client's body to the worker's native OpenAI route and its answer back, with
# none of the apiserver's work. The last lines print the
# apiserver's CPU per request as a ratio of the bare relay's, per concurrency.
# More targets can be passed in EXTRA_TARGETS ("--target 'label|url|pids|model|JSON'").
#
# Then, on a machine with at least two CPUs (BENCH_PIN=0 skips it), the hop's own CPU per
# request again with the hop pinned to CPU 0 and the client, worker, fake and controller to
# CPU 1 (as scripts/bench-controller.sh pins its server): unpinned, at c=1 the worker and
# the fake run between the hop's two halves of every request on the same cores and evict
# its caches, which is a property of this 2-core box rather than of the hop (in a cluster
# the workers run on their own machines). PIN_ROUNDS (default 5) alternating rounds of
# apiserver+worker and bare relay+worker at c=1 and c=32; the medians are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-5}
CONC=${CONC:-1,32,128}
# The shipped binary's settings, for the examples too (one build of the library).
source scripts/optimized-env.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/dbgpt-cluster/target}
if [ -n "${BENCH_BIN_DIR:-}" ]; then
  # A/B against another build: a directory holding dbgpt, fake_openai, bench_apiserver and
  # bare_relay (copied out of a target dir after the build below), nothing is built.
  BIN=$BENCH_BIN_DIR/dbgpt EX=$BENCH_BIN_DIR
else
  cargo build -q --example fake_openai --example bench_apiserver --example bare_relay --example bench_overhead
  scripts/build-optimized.sh   # dbgpt as shipped (function order applied)
  BIN=$CARGO_TARGET_DIR/debug/dbgpt EX=$CARGO_TARGET_DIR/debug/examples
fi

WORK=$(mktemp -d /tmp/dbgpt-bench.XXXXXX)
export DBGPT_RUNTIME_DIR=$WORK/run DBGPT_LOG_DIR=$WORK/log DBGPT_STATE_DIR=$WORK/state
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 200); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "timeout waiting for $1" >&2; exit 1; }

CTL=$(port); FAKE=$(port); API=$(port); WRK=$(port); RELAY=$(port)
$BIN start controller --host 127.0.0.1 --port "$CTL" --registry_path "$WORK/reg.redb" >"$WORK/ctl.log" 2>&1 & CTL_PID=$!; PIDS+=($CTL_PID)
wait_http "http://127.0.0.1:$CTL/api/health"
"$EX/fake_openai" --port "$FAKE" --tokens 16 --register "http://127.0.0.1:$CTL" --model fake >"$WORK/fake.log" 2>&1 & FAKE_PID=$!; PIDS+=($FAKE_PID)
$BIN start worker --host 127.0.0.1 --port "$WRK" --controller_addr "http://127.0.0.1:$CTL" --model_name viaworker \
  --model_type proxy --proxy_api_base "http://127.0.0.1:$FAKE/v1" --proxyllm_backend fake --limit_model_concurrency 512 \
  --log_level warn >"$WORK/worker.log" 2>&1 & WRK_PID=$!; PIDS+=($WRK_PID)
$BIN start apiserver --host 127.0.0.1 --port "$API" --controller_addr "http://127.0.0.1:$CTL" --log_level warn >"$WORK/api.log" 2>&1 & API_PID=$!; PIDS+=($API_PID)
wait_http "http://127.0.0.1:$API/api/health"
# The relay takes the worker's native route, as the apiserver does (BENCH_RELAY_LEGACY=1: the
# DB-GPT worker API, as before the native routes, e.g. for an older BENCH_BIN_DIR).
RELAY_ARGS=(--native); [ "${BENCH_RELAY_LEGACY:-0}" = 1 ] && RELAY_ARGS=()
"$EX/bare_relay" --port "$RELAY" --worker "http://127.0.0.1:$WRK" --model viaworker "${RELAY_ARGS[@]}" >"$WORK/relay.log" 2>&1 & RELAY_PID=$!; PIDS+=($RELAY_PID)
for _ in $(seq 100); do curl -s "http://127.0.0.1:$API/v1/models" | grep -q '"viaworker"' && curl -s "http://127.0.0.1:$API/v1/models" | grep -q '"fake"' && break; sleep 0.1; done

# The tools + response_format row: what a function-calling, structured-output client sends.
TOOLS_JSON='{"tools":[{"type":"function","function":{"name":"get_weather","description":"Current weather in a city","parameters":{"type":"object","properties":{"city":{"type":"string"},"unit":{"type":"string","enum":["c","f"]}},"required":["city"]}}}],"tool_choice":"auto","response_format":{"type":"json_schema","json_schema":{"name":"answer","strict":true,"schema":{"type":"object","properties":{"answer":{"type":"string"}},"required":["answer"],"additionalProperties":false}}}}'
TARGETS=(
  --target "direct|http://127.0.0.1:$FAKE/v1|$FAKE_PID"
  --target "apiserver|http://127.0.0.1:$API/v1|$API_PID,$FAKE_PID"
  --target "apiserver+worker|http://127.0.0.1:$API/v1|$API_PID,$WRK_PID,$FAKE_PID|viaworker"
  --target "apiserver+worker tools|http://127.0.0.1:$API/v1|$API_PID,$WRK_PID,$FAKE_PID|viaworker|$TOOLS_JSON"
  --target "bare relay+worker|http://127.0.0.1:$RELAY/v1|$RELAY_PID,$WRK_PID,$FAKE_PID|viaworker"
)
PIDNOTE="fake=$FAKE_PID apiserver=$API_PID worker=$WRK_PID bare_relay=$RELAY_PID"

# The same path with the Prometheus metrics off in both daemons (their cost is the difference).
APIOFF_PID= WRKOFF_PID=
if [ "${BENCH_METRICS:-1}" = 1 ]; then
  APIOFF=$(port); WRKOFF=$(port)
  $BIN start worker --host 127.0.0.1 --port "$WRKOFF" --controller_addr "http://127.0.0.1:$CTL" --model_name viaworker_nometrics \
    --model_type proxy --proxy_api_base "http://127.0.0.1:$FAKE/v1" --proxyllm_backend fake --limit_model_concurrency 512 \
    --metrics_addr off --log_level warn >"$WORK/worker-off.log" 2>&1 & WRKOFF_PID=$!; PIDS+=($WRKOFF_PID)
  $BIN start apiserver --host 127.0.0.1 --port "$APIOFF" --controller_addr "http://127.0.0.1:$CTL" --metrics_addr off \
    --log_level warn >"$WORK/api-off.log" 2>&1 & APIOFF_PID=$!; PIDS+=($APIOFF_PID)
  wait_http "http://127.0.0.1:$APIOFF/api/health"
  for _ in $(seq 100); do curl -s "http://127.0.0.1:$APIOFF/v1/models" | grep -q '"viaworker_nometrics"' && break; sleep 0.1; done
  TARGETS+=(--target "apiserver+worker metrics off|http://127.0.0.1:$APIOFF/v1|$APIOFF_PID,$WRKOFF_PID,$FAKE_PID|viaworker_nometrics")
  PIDNOTE="$PIDNOTE apiserver-metrics-off=$APIOFF_PID worker-metrics-off=$WRKOFF_PID"
fi

# Managed API keys: a third apiserver with a static key, behind its own controller and proxy
# worker (a controller that has managed keys makes every apiserver in front of it require
# keys, which the open rows above must not); the same path with that key and with a managed
# key carrying every limit (never reached). The difference is the keys' cost.
APIK_PID=
if [ "${BENCH_KEYS:-1}" = 1 ]; then
  CTLK=$(port); WRKK=$(port); APIK=$(port)
  $BIN start controller --host 127.0.0.1 --port "$CTLK" --registry_path "$WORK/reg-keys.redb" >"$WORK/ctl-keys.log" 2>&1 & CTLK_PID=$!; PIDS+=($CTLK_PID)
  wait_http "http://127.0.0.1:$CTLK/api/health"
  $BIN start worker --host 127.0.0.1 --port "$WRKK" --controller_addr "http://127.0.0.1:$CTLK" --model_name viaworker \
    --model_type proxy --proxy_api_base "http://127.0.0.1:$FAKE/v1" --proxyllm_backend fake --limit_model_concurrency 512 \
    --log_level warn >"$WORK/worker-keys.log" 2>&1 & WRKK_PID=$!; PIDS+=($WRKK_PID)
  $BIN start apiserver --host 127.0.0.1 --port "$APIK" --controller_addr "http://127.0.0.1:$CTLK" --api_keys bench-static \
    --log_level warn >"$WORK/api-keys.log" 2>&1 & APIK_PID=$!; PIDS+=($APIK_PID)
  wait_http "http://127.0.0.1:$APIK/api/health"
  BIG=1000000000000
  MANAGED=$(curl -sf "http://127.0.0.1:$CTLK/api/controller/keys" -H 'content-type: application/json' -d '{"name":"bench",
    "limits":{"rpm":'$BIG',"tpm":'$BIG',"max_concurrency":100000,"daily_tokens":'$BIG'},
    "model_limits":{"viaworker":{"rpm":'$BIG',"tpm":'$BIG',"max_concurrency":100000,"daily_tokens":'$BIG'}}}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
  for _ in $(seq 100); do
    curl -sf -o /dev/null "http://127.0.0.1:$APIK/v1/chat/completions" -H "authorization: Bearer $MANAGED" -H 'content-type: application/json' \
      -d '{"model":"viaworker","messages":[{"role":"user","content":"hi"}]}' && break
    sleep 0.1
  done
  TARGETS+=(--target "apiserver+worker static key|http://127.0.0.1:$APIK/v1|$APIK_PID,$WRKK_PID,$FAKE_PID|viaworker|{\"_api_key\":\"bench-static\"}"
            --target "apiserver+worker managed key|http://127.0.0.1:$APIK/v1|$APIK_PID,$WRKK_PID,$FAKE_PID|viaworker|{\"_api_key\":\"$MANAGED\"}")
  PIDNOTE="$PIDNOTE apiserver-keys=$APIK_PID worker-keys=$WRKK_PID controller-keys=$CTLK_PID"
fi

# A/B in one run: another build's apiserver and proxy worker (model "viaold"), same controller,
# fake and client.
if [ -n "${BENCH_OLD_BIN:-}" ]; then
  OLD_LABEL=${BENCH_OLD_LABEL:-old}
  OAPI=$(port); OWRK=$(port)
  "$BENCH_OLD_BIN" start worker --host 127.0.0.1 --port "$OWRK" --controller_addr "http://127.0.0.1:$CTL" --model_name viaold \
    --model_type proxy --proxy_api_base "http://127.0.0.1:$FAKE/v1" --proxyllm_backend fake --limit_model_concurrency 512 \
    --log_level warn >"$WORK/oldworker.log" 2>&1 & OWRK_PID=$!; PIDS+=($OWRK_PID)
  "$BENCH_OLD_BIN" start apiserver --host 127.0.0.1 --port "$OAPI" --controller_addr "http://127.0.0.1:$CTL" --log_level warn >"$WORK/oldapi.log" 2>&1 & OAPI_PID=$!; PIDS+=($OAPI_PID)
  wait_http "http://127.0.0.1:$OAPI/api/health"
  for _ in $(seq 100); do curl -s "http://127.0.0.1:$OAPI/v1/models" | grep -q '"viaold"' && break; sleep 0.1; done
  TARGETS+=(--target "$OLD_LABEL apiserver+worker|http://127.0.0.1:$OAPI/v1|$OAPI_PID,$OWRK_PID,$FAKE_PID|viaold")
  PIDNOTE="$PIDNOTE $OLD_LABEL-apiserver=$OAPI_PID $OLD_LABEL-worker=$OWRK_PID ($BENCH_OLD_BIN)"
fi

# SGLang's Rust gateway (a PyPI wheel; its Rust router runs inside the python process) in
# front of the same fake: only if installed, or BENCH_SGLANG=1 installs it.
PY=${PYTHON:-python3}
if [ "${BENCH_SGLANG:-0}" = 1 ] && ! "$PY" -c 'import sglang_router.router' 2>/dev/null; then
  "$PY" -m pip install -q sglang-router==0.3.2
fi
# A process and all its descendants, comma-separated.
tree_pids() { local p=$1 c; printf '%s' "$p"; for c in $(pgrep -P "$p" 2>/dev/null); do printf ','; tree_pids "$c"; done; }
if "$PY" -c 'import sglang_router.router' 2>/dev/null; then
  SGL=$(port); SGLPROM=$(port)
  # shellcheck disable=SC2086
  "$PY" -m sglang_router.launch_router --host 127.0.0.1 --port "$SGL" --worker-urls "http://127.0.0.1:$FAKE" \
    --prometheus-host 127.0.0.1 --prometheus-port "$SGLPROM" --log-level warn ${SGLANG_ARGS:-} >"$WORK/sglang.log" 2>&1 & SGL_PID=$!; PIDS+=($SGL_PID)
  ok=
  for _ in $(seq 300); do
    curl -sf -m 2 "http://127.0.0.1:$SGL/v1/chat/completions" -H 'content-type: application/json' \
      -d '{"model":"fake","messages":[{"role":"user","content":"hi"}]}' >/dev/null 2>&1 && { ok=1; break; }
    sleep 0.1
  done
  if [ -n "$ok" ]; then
    SGL_PIDS=$(tree_pids "$SGL_PID")
    TARGETS+=(--target "sglang|http://127.0.0.1:$SGL/v1|$SGL_PIDS,$FAKE_PID"
              --target "sglang tools|http://127.0.0.1:$SGL/v1|$SGL_PIDS,$FAKE_PID||$TOOLS_JSON")
    PIDNOTE="$PIDNOTE sglang=$SGL_PIDS"
  else
    echo "# sglang-router did not answer within 30 s; no sglang row (log: $(tail -3 "$WORK/sglang.log"))"
  fi
else
  echo "# sglang-router is not installed (pip install sglang-router==0.3.2, or BENCH_SGLANG=1): no sglang row"
fi

# EXTRA_TARGETS is shell words: "--target 'label|url|pids|model'" …
eval "TARGETS+=(${EXTRA_TARGETS:-})"

echo "# $(nproc) cores, ${SECS}s per phase, 16-token replies (streamed: 19 events + [DONE]); CPU µs/req from /proc/<pid>/task/*/schedstat; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# pids: $PIDNOTE"
"$EX/bench_apiserver" --model fake --secs "$SECS" --concurrency "$CONC" "${TARGETS[@]}" | tee "$WORK/table.md"
# The whole path's CPU per request: every pid of the row but the fake's, summed.
echo
awk -F'|' -v fake="$FAKE_PID" '
  function path(cell,   n, i, kv, sum, parts) {
    n = split(cell, parts, ","); sum = 0
    for (i = 1; i <= n; i++) { split(parts[i], kv, ":"); if (kv[1] + 0 != fake + 0) sum += kv[2] }
    return sum
  }
  BEGIN { print "| path (CPU µs/req summed over its pids, fake excluded) | conc | plain | stream |"; print "|---|---:|---:|---:|" }
  $3 + 0 > 0 && $2 !~ /direct/ { printf "| %s | %d | %.0f | %.0f |\n", substr($2, 2, length($2) - 2), $3, path($11), path($12) }
' "$WORK/table.md"
echo
# The hop's own CPU (first pid of the row) in front of the same worker: apiserver vs bare relay.
awk -F'|' -v api="$API_PID" -v relay="$RELAY_PID" '
  function cpu(cell, pid,   m) { return match(cell, pid ": [0-9.]+") ? substr(cell, RSTART + length(pid) + 2, RLENGTH - length(pid) - 2) : "" }
  $2 == " apiserver+worker " { a[$3 + 0] = cpu($11, api) }
  $2 == " bare relay+worker " { r[$3 + 0] = cpu($11, relay) }
  END { for (c in a) if (r[c] > 0) printf "# c=%d: apiserver %s µs/req, bare relay %s µs/req: %.2fx\n", c, a[c], r[c], a[c] / r[c] }
' "$WORK/table.md" | sort -t= -k2 -n
# What the metrics cost: the same path with them on and off, per daemon, plain and streamed.
if [ -n "$APIOFF_PID" ]; then
  awk -F'|' -v api="$API_PID" -v wrk="$WRK_PID" -v apioff="$APIOFF_PID" -v wrkoff="$WRKOFF_PID" '
    function cpu(cell, pid,   m) { return match(cell, pid ": [0-9.]+") ? substr(cell, RSTART + length(pid) + 2, RLENGTH - length(pid) - 2) + 0 : -1 }
    $2 == " apiserver+worker " { c = $3 + 0; a[c] = cpu($11, api); as[c] = cpu($12, api); w[c] = cpu($11, wrk); ws[c] = cpu($12, wrk) }
    $2 == " apiserver+worker metrics off " { c = $3 + 0; ao[c] = cpu($11, apioff); aso[c] = cpu($12, apioff); wo[c] = cpu($11, wrkoff); wso[c] = cpu($12, wrkoff) }
    END {
      print ""; print "| metrics cost (CPU µs/req) | conc | apiserver on | off | added | worker on | off | added |"; print "|---|---:|---:|---:|---:|---:|---:|---:|"
      for (c in a) if (c in ao) {
        printf "| plain | %d | %.1f | %.1f | %+.1f | %.1f | %.1f | %+.1f |\n", c, a[c], ao[c], a[c] - ao[c], w[c], wo[c], w[c] - wo[c]
        printf "| stream | %d | %.1f | %.1f | %+.1f | %.1f | %.1f | %+.1f |\n", c, as[c], aso[c], as[c] - aso[c], ws[c], wso[c], ws[c] - wso[c]
      }
    }' "$WORK/table.md"
fi

# What a managed key costs over a static one: the same apiserver, path and worker.
if [ -n "$APIK_PID" ]; then
  awk -F'|' -v apik="$APIK_PID" '
    function cpu(cell, pid) { return match(cell, pid ": [0-9.]+") ? substr(cell, RSTART + length(pid) + 2, RLENGTH - length(pid) - 2) + 0 : -1 }
    $2 == " apiserver+worker static key " { c = $3 + 0; s[c] = cpu($11, apik); ss[c] = cpu($12, apik); sq[c] = $4 + 0 }
    $2 == " apiserver+worker managed key " { c = $3 + 0; m[c] = cpu($11, apik); ms[c] = cpu($12, apik); mq[c] = $4 + 0 }
    END {
      print ""; print "| managed key cost (apiserver CPU µs/req) | conc | static key | managed key | added | req/s static | req/s managed |"; print "|---|---:|---:|---:|---:|---:|---:|"
      for (c in s) if (c in m) {
        printf "| plain | %d | %.1f | %.1f | %+.1f | %.0f | %.0f |\n", c, s[c], m[c], m[c] - s[c], sq[c], mq[c]
        printf "| stream | %d | %.1f | %.1f | %+.1f | | |\n", c, ss[c], ms[c], ms[c] - ss[c]
      }
    }' "$WORK/table.md"
fi

# The metrics' and a managed key's cost measured in one process (src/overhead.rs; what
# scripts/bench-overhead.sh prints): the rows above compare processes, whose spread is larger
# than a few microseconds, and --metrics_addr off still records. BENCH_OVERHEAD=0 skips it.
if [ "${BENCH_OVERHEAD:-1}" = 1 ] && [ -x "$EX/bench_overhead" ]; then
  echo
  echo "# in one process: what the metrics and a managed key add per request"
  "$EX/bench_overhead" --rounds "${OVERHEAD_ROUNDS:-9}" --requests 20000
fi

[ "${BENCH_PIN:-1}" = 1 ] && [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null || exit 0
PIN_ROUNDS=${PIN_ROUNDS:-5}
for p in "$CTL_PID" "$FAKE_PID" "$WRK_PID" $WRKOFF_PID; do taskset -a -p -c 1 "$p" >/dev/null; done
for p in "$API_PID" "$RELAY_PID" $APIOFF_PID; do taskset -a -p -c 0 "$p" >/dev/null; done
OFF_TARGET=(); [ -n "$APIOFF_PID" ] && OFF_TARGET=(--target "apiserver+worker metrics off|http://127.0.0.1:$APIOFF/v1|$APIOFF_PID|viaworker_nometrics")
echo
echo "# Pinned: hop on CPU 0; client, worker, fake and controller on CPU 1; $PIN_ROUNDS rounds of ${SECS}s phases"
for _ in $(seq "$PIN_ROUNDS"); do
  taskset -c 1 "$EX/bench_apiserver" --secs "$SECS" --concurrency 1,32 \
    --target "apiserver+worker|http://127.0.0.1:$API/v1|$API_PID|viaworker" \
    --target "bare relay+worker|http://127.0.0.1:$RELAY/v1|$RELAY_PID|viaworker" "${OFF_TARGET[@]}"
done | awk -F'|' -v api="$API_PID" -v relay="$RELAY_PID" -v apioff="${APIOFF_PID:-0}" '
  function cpu(cell, pid) { return match(cell, pid ": [0-9.]+") ? substr(cell, RSTART + length(pid) + 2, RLENGTH - length(pid) - 2) + 0 : -1 }
  function median(list,   v, n, i, j, t) {
    n = split(list, v, " ")
    for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] + 0 > v[j] + 0; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
    return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
  }
  $2 == " apiserver+worker " { a[$3 + 0] = a[$3 + 0] " " cpu($11, api); q[$3 + 0] = q[$3 + 0] " " ($4 + 0) }
  $2 == " apiserver+worker metrics off " { o[$3 + 0] = o[$3 + 0] " " cpu($11, apioff) }
  $2 ~ /bare relay\+worker/ { r[$3 + 0] = r[$3 + 0] " " cpu($11, relay) }
  END {
    print "| hop (pinned) | conc | CPU µs/req, median | each round | apiserver / relay | apiserver req/s, median |"
    print "|---|---:|---:|---|---:|---:|"
    for (c = 1; c <= 32; c += 31) {
      printf "| apiserver+worker | %d | %s | %s | %.2fx | %s |\n", c, median(a[c]), a[c], median(a[c]) / median(r[c]), median(q[c])
      printf "| bare relay+worker | %d | %s | %s | | |\n", c, median(r[c]), r[c]
      if (o[c] != "") printf "| apiserver+worker metrics off | %d | %s | %s | metrics add %+.2f µs/req | |\n", c, median(o[c]), o[c], median(a[c]) - median(o[c])
    }
  }'
