#!/usr/bin/env bash
# Benchmark (not a test): instructions per chat request spent by the apiserver and by the
# proxy worker, counted by valgrind's callgrind, so two builds compare exactly even on a
# machine whose speed varies (callgrind counts instructions, not time). Prints a table.
#
#   scripts/bench-instructions.sh DIR [DIR…]   # each DIR holds dbgpt and fake_openai
#   N=300 scripts/bench-instructions.sh /tmp/old /tmp/new
#   KEEP=1 …   # keep the callgrind files (callgrind_annotate them to see where a difference is)
#   SGLANG=1 …  # also SGLang's Rust gateway (sglang-router, if installed) in front of the
#               # fake of the first DIR: one "gateway" row (its Rust router runs inside python)
#
# For each build: a controller and the fake upstream run natively; the proxy worker and the
# apiserver run under callgrind; after a warm-up, N keep-alive requests of one kind (plain
# chat, then streamed chat) are a callgrind part of their own (dumps before and after).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 DIR [DIR…] (each with dbgpt and fake_openai)" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "needs valgrind (apt install valgrind)" >&2; exit 1; }
N=${N:-300}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 600); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "timeout waiting for $1" >&2; exit 1; }
total() { awk '/^(summary|totals):/ { print $2; exit }' "$1"; }

# drive N KIND [MODEL]: N keep-alive chat requests (plain or stream, with include_usage)
# through the hop at $API.
drive() {
  python3 - "$API" "$1" "$2" "${3:-viaworker}" <<'PY'
import http.client, json, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=300)
for i in range(int(sys.argv[2])):
    body = {"model": sys.argv[4], "max_tokens": 16, "stream": sys.argv[3] == "stream",
            "messages": [{"role": "user", "content": "Say something."}]}
    if sys.argv[3] == "stream":
        body["stream_options"] = {"include_usage": True}
    c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
PY
}

echo "| build | requests | apiserver (or gateway) instr/req | worker instr/req |"
echo "|---|---|---:|---:|"
pids=()
# Whatever happens (a failed request, an interrupt), the daemons of the current build stop.
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
for dir in "$@"; do
  work=$(mktemp -d /tmp/dbgpt-instr.XXXXXX)
  pids=()
  export DBGPT_RUNTIME_DIR=$work/run DBGPT_LOG_DIR=$work/log DBGPT_STATE_DIR=$work/state
  CTL=$(port); FAKE=$(port); WRK=$(port); API=$(port)
  "$dir/dbgpt" start controller --host 127.0.0.1 --port "$CTL" --registry_path "$work/reg.redb" --log_level warn >"$work/ctl.log" 2>&1 & pids+=($!)
  wait_http "http://127.0.0.1:$CTL/api/health"
  "$dir/fake_openai" --port "$FAKE" --tokens 16 >"$work/fake.log" 2>&1 & pids+=($!)
  (exec valgrind -q --tool=callgrind --dump-instr=no --callgrind-out-file="$work/worker.%p" \
    "$dir/dbgpt" start worker --host 127.0.0.1 --port "$WRK" --controller_addr "http://127.0.0.1:$CTL" \
    --model_name viaworker --model_type proxy --proxy_api_base "http://127.0.0.1:$FAKE/v1" \
    --proxyllm_backend fake --log_level warn >"$work/worker.log" 2>&1) & wpid=$!; pids+=($wpid)
  (exec valgrind -q --tool=callgrind --dump-instr=no --callgrind-out-file="$work/api.%p" \
    "$dir/dbgpt" start apiserver --host 127.0.0.1 --port "$API" --controller_addr "http://127.0.0.1:$CTL" \
    --log_level warn >"$work/api.log" 2>&1) & apid=$!; pids+=($apid)
  wait_http "http://127.0.0.1:$API/api/health"
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$API/v1/models" | grep -q viaworker && break; sleep 0.2; done
  part=0
  for kind in plain stream; do
    drive 20 "$kind"
    callgrind_control -d "$wpid" "$apid" >/dev/null 2>&1; part=$((part + 1))
    drive "$N" "$kind"
    callgrind_control -d "$wpid" "$apid" >/dev/null 2>&1; part=$((part + 1))
    for _ in $(seq 100); do [ -s "$work/api.$apid.$part" ] && [ -s "$work/worker.$wpid.$part" ] && break; sleep 0.1; done
    a=$(total "$work/api.$apid.$part"); w=$(total "$work/worker.$wpid.$part")
    printf '| %s | %s %s | %d | %d |\n' "$dir" "$N" "$kind" $((a / N)) $((w / N))
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "kept: $work" >&2; else rm -rf "$work"; fi
done

# SGLang's gateway under callgrind in front of the first build's fake (the python process
# hosts the Rust router; the python interpreter itself only waits once the router runs).
if [ "${SGLANG:-0}" = 1 ] && python3 -c 'import sglang_router.router' 2>/dev/null; then
  work=$(mktemp -d /tmp/dbgpt-instr.XXXXXX)
  pids=()
  FAKE=$(port); API=$(port); PROM=$(port)
  "$1/fake_openai" --port "$FAKE" --tokens 16 >"$work/fake.log" 2>&1 & pids+=($!)
  py=$(python3 -c 'import sys; print(sys.executable)')
  (exec valgrind -q --tool=callgrind --dump-instr=no --callgrind-out-file="$work/sglang.%p" \
    "$py" -m sglang_router.launch_router --host 127.0.0.1 --port "$API" --worker-urls "http://127.0.0.1:$FAKE" \
    --prometheus-host 127.0.0.1 --prometheus-port "$PROM" --log-level warn >"$work/sglang.log" 2>&1) & spid=$!; pids+=($spid)
  for _ in $(seq 600); do
    curl -sf -m 5 "http://127.0.0.1:$API/v1/chat/completions" -H 'content-type: application/json' \
      -d '{"model":"fake","messages":[{"role":"user","content":"hi"}]}' >/dev/null 2>&1 && break
    sleep 0.5
  done
  part=0
  for kind in plain stream; do
    drive 20 "$kind" fake
    callgrind_control -d "$spid" >/dev/null 2>&1; part=$((part + 1))
    drive "$N" "$kind" fake
    callgrind_control -d "$spid" >/dev/null 2>&1; part=$((part + 1))
    for _ in $(seq 100); do [ -s "$work/sglang.$spid.$part" ] && break; sleep 0.1; done
    g=$(total "$work/sglang.$spid.$part")
    printf '| sglang-router %s (gateway) | %s %s | %d | – |\n' \
      "$(python3 -c 'import importlib.metadata as m; print(m.version("sglang-router"))')" "$N" "$kind" $((g / N))
  done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "kept: $work" >&2; else rm -rf "$work"; fi
fi
