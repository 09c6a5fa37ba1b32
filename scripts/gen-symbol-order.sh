#!/usr/bin/env bash
# Regenerates packaging/symbol-order.txt: the functions the daemons actually run, which the
# linker places first and together in .text (scripts/build-optimized.sh, used by
# build-dist.sh and the benchmarks, passes the file to lld's --symbol-ordering-file). A daemon then maps a few contiguous megabytes of code instead of
# ~130 KB around each of hundreds of places scattered over the 17 MB of code that llama.cpp,
# candle and sqlx bring in: the controller's idle RSS drops by ~3.5 MB.
#
# How: builds dbgpt at opt-level 3 as scripts/build-dist.sh does (the symbol names must match
# that build), runs a controller, a proxy worker, an apiserver and the client commands under
# valgrind's callgrind (which records every function executed) through a short scripted
# session on loopback, and writes the executed function names: first those of the steady
# state (300 keep-alive chat requests through the apiserver and the worker, recorded as a
# callgrind part of their own), hottest first, so that the request path is a few hundred KB
# of contiguous code; then the union of everything else the daemons ran, by daemon.
#
# When to run: after a dependency update (Cargo.lock) or a large change; names that no longer
# exist are ignored by the linker, so a stale file only costs memory, never correctness.
# scripts/build-optimized.sh prints how many of the listed names the binary still has.
# Names get LLVM's `.llvm.<hash>` suffix removed (it depends on the checkout's path);
# build-optimized.sh maps them back to the binary's actual names.
# Needs valgrind (apt install valgrind). Takes ~2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "needs valgrind (apt install valgrind)" >&2; exit 1; }
cache=${DBGPT_CACHE_DIR:-$HOME/.cache/dbgpt-cluster}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target}
(source scripts/optimized-env.sh && cargo build --locked --bin dbgpt --example fake_openai >&2)

work=$(mktemp -d /tmp/dbgpt-symorder.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
cp "$CARGO_TARGET_DIR/debug/dbgpt" "$CARGO_TARGET_DIR/debug/examples/fake_openai" "$work/"
bin=$work/dbgpt
export DBGPT_RUNTIME_DIR=$work/run DBGPT_LOG_DIR=$work/log DBGPT_STATE_DIR=$work/state
mkdir -p "$work/cg"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {
    for _ in $(seq 600); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "timeout waiting for $1" >&2; exit 1
}
cg() { local name=$1; shift; valgrind -q --tool=callgrind --demangle=no --dump-instr=no \
    --callgrind-out-file="$work/cg/$name.%p" "$@"; }
# For daemons started with `&`: the background subshell becomes valgrind, so `$!` is the
# pid callgrind_control needs.
cg_daemon() { local name=$1; shift; exec valgrind -q --tool=callgrind --demangle=no \
    --dump-instr=no --callgrind-out-file="$work/cg/$name.%p" "$@"; }

CTL=$(port); FAKE=$(port); WRK=$(port); API=$(port)
echo "== controller, proxy worker and apiserver under callgrind (slow: ~50x)" >&2
cg_daemon controller "$bin" start controller --host 127.0.0.1 --port "$CTL" \
    --registry_path "$work/reg.redb" >"$work/ctl.log" 2>&1 & pids+=($!)
wait_http "http://127.0.0.1:$CTL/api/health"
"$work/fake_openai" --port "$FAKE" --tokens 8 --register "http://127.0.0.1:$CTL" \
    --model fake >"$work/fake.log" 2>&1 & pids+=($!)
cg_daemon worker "$bin" start worker --host 127.0.0.1 --port "$WRK" \
    --controller_addr "http://127.0.0.1:$CTL" --model_name viaworker --model_type proxy \
    --proxy_api_base "http://127.0.0.1:$FAKE/v1" --proxyllm_backend fake \
    >"$work/worker.log" 2>&1 & pids+=($!)
cg_daemon apiserver "$bin" start apiserver --host 127.0.0.1 --port "$API" \
    --controller_addr "http://127.0.0.1:$CTL" --api_keys k1 >"$work/api.log" 2>&1 & pids+=($!)
wait_http "http://127.0.0.1:$API/api/health"

echo "== a scripted session" >&2
c="http://127.0.0.1:$CTL/api/controller"
for i in $(seq 200); do
    curl -sf "$c/models" -H 'content-type: application/json' -d "{\"model_name\": \"m$((i % 20))@llm\", \"host\": \"127.0.0.1\", \"port\": $((20000 + i)), \"check_healthy\": true, \"healthy\": true, \"enabled\": true, \"prompt_template\": null, \"last_heartbeat\": null}" >/dev/null
    curl -sf "$c/heartbeat" -H 'content-type: application/json' -d "{\"model_name\": \"m$((i % 20))@llm\", \"host\": \"127.0.0.1\", \"port\": $((20000 + i)), \"worker_type\": \"llm\"}" >/dev/null
done
for _ in 1 2 3; do curl -sf "$c/models" >/dev/null; curl -sf "$c/models?model_name=m1@llm&healthy_only=true" >/dev/null; done
curl -sf -X DELETE "$c/models?model_name=m1@llm&host=127.0.0.1&port=20001" >/dev/null
curl -s "$c/models" -H 'content-type: application/json' -d '{"model_name": 1}' >/dev/null
a="http://127.0.0.1:$API/v1"
for _ in $(seq 100); do curl -sf -H 'Authorization: Bearer k1' "$a/models" | grep -q viaworker && break; sleep 0.2; done
for m in fake viaworker; do
    for _ in 1 2 3 4 5; do
        curl -sf -H 'Authorization: Bearer k1' "$a/chat/completions" -H 'content-type: application/json' \
            -d "{\"model\": \"$m\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"max_tokens\": 8}" >/dev/null
        curl -sfN -H 'Authorization: Bearer k1' "$a/chat/completions" -H 'content-type: application/json' \
            -d "{\"model\": \"$m\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"stream\": true, \"stream_options\": {\"include_usage\": true}}" >/dev/null
        curl -sf -H 'Authorization: Bearer k1' "$a/completions" -H 'content-type: application/json' \
            -d "{\"model\": \"$m\", \"prompt\": \"hi\", \"max_tokens\": 4}" >/dev/null
    done
done
# The steady state of a loaded cluster: keep-alive chat requests through the apiserver and
# the worker, in a callgrind part of its own (dumps before and after: `<name>.<pid>.2`),
# whose functions go first in the order, hottest first.
echo "== steady state: 300 keep-alive chat requests" >&2
callgrind_control -d "${pids[2]}" "${pids[3]}" >/dev/null
python3 - "$API" <<'PY'
import http.client, json, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=120)
for i in range(300):
    body = {"model": "viaworker", "max_tokens": 16, "stream": i % 4 == 3,
            "messages": [{"role": "user", "content": "Say something."}]}
    c.request("POST", "/v1/chat/completions", json.dumps(body),
              {"Content-Type": "application/json", "Authorization": "Bearer k1"})
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
PY
callgrind_control -d "${pids[2]}" "${pids[3]}" >/dev/null
curl -s "$a/models" >/dev/null
curl -s -H 'Authorization: Bearer k1' "$a/chat/completions" -H 'content-type: application/json' -d '{"model": "nope", "messages": []}' >/dev/null
cg cli "$bin" model list --address "http://127.0.0.1:$CTL" >/dev/null
cg cli "$bin" ctl status >/dev/null
for svc in apiserver worker controller; do
    port_var=$(case $svc in apiserver) echo "$API";; worker) echo "$WRK";; controller) echo "$CTL";; esac)
    cg cli "$bin" ctl stop --port "$port_var" >/dev/null
done
wait "${pids[0]}" "${pids[2]}" "${pids[3]}" 2>/dev/null || true
for _ in $(seq 100); do [ -z "$(ls "$work/run" 2>/dev/null | grep '\.sock$' || true)" ] && break; sleep 0.2; done
sleep 1

echo "== writing packaging/symbol-order.txt" >&2
python3 - "$work"/cg/* >packaging/symbol-order.txt <<'EOF'
import collections, re, sys
rank = {"controller": 0, "apiserver": 1, "worker": 2, "cli": 3}
role = lambda p: p.rsplit("/", 1)[-1].split(".")[0]
files = sorted(sys.argv[1:], key=lambda p: rank.get(role(p), 9))
seen = set()

def base(name):
    return re.sub(r"\.llvm\.\d+$", "", name.split("'")[0])

def self_cost(path):
    """Instructions spent in each function itself (callgrind's compressed names resolved)."""
    names, cost, cur, after_call = {}, collections.Counter(), None, False
    for line in open(path, errors="replace"):
        m = re.match(r"(c?)fn=\((\d+)\)(?: (\S+))?", line)
        if m:
            if m.group(3):
                names[m.group(2)] = m.group(3)
            if not m.group(1):
                cur = names.get(m.group(2))
        elif line.startswith("calls="):
            after_call = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            if after_call:  # the inclusive cost of a call, not the caller's own
                after_call = False
            elif cur:
                parts = line.split()
                if len(parts) > 1 and parts[1].isdigit():
                    cost[base(cur)] += int(parts[1])
    return cost

# First the steady-state functions of the apiserver, then the worker's, each hottest first:
# per request they then touch a few hundred contiguous KB of code, not pages all over the
# region below (measured: -13% apiserver CPU per request at c=1).
for path in sorted((p for p in files if re.search(r"\.\d+\.2$", p)), key=lambda p: rank[role(p)]):
    hot = [n for n, c in self_cost(path).most_common() if c > 0 and n not in seen
           and not n.startswith(("0x", "("))]
    seen.update(hot)
    print("\n".join(hot))
# Then every function a daemon ran (controller, apiserver, worker), then the CLI's; each once.
for path in files:
    names = []
    for line in open(path, errors="replace"):
        m = re.match(r"c?fn=\(\d+\) (\S+)", line)
        if m:
            name = base(m.group(1))
            if name not in seen and not name.startswith(("0x", "(")):
                seen.add(name)
                names.append(name)
    print("\n".join(sorted(names)))
EOF
echo "packaging/symbol-order.txt: $(wc -l <packaging/symbol-order.txt) functions" >&2
