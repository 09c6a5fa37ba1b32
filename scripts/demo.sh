#!/usr/bin/env bash
# The main job, end to end on the embedded defaults: set up the machine, build, start a
# controller in the background, show the registry with `dbgpt model list` and the daemons
# with `dbgpt ctl status`, then stop everything it started.
# Everything runs in a temporary directory on free ports; set DBGPT_DEMO_KEEP=1 to leave
# the daemons running.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${DBGPT_CACHE_DIR:-$HOME/.cache/dbgpt-cluster}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target}
export DBGPT_MODELS_DIR=${DBGPT_MODELS_DIR:-$cache/models}
scripts/setup.sh
echo "== building (first build compiles llama.cpp and candle: ~20 min on 2 cores)" >&2
cargo build --locked --quiet
bin=$CARGO_TARGET_DIR/debug/dbgpt
work=$(mktemp -d -t dbgpt-demo.XXXXXX)
export DBGPT_RUNTIME_DIR=$work/run DBGPT_LOG_DIR=$work/log DBGPT_STATE_DIR=$work/state
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cport=$(free_port)
cleanup() { [ "${DBGPT_DEMO_KEEP:-0}" = 1 ] || "$bin" stop all >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "== dbgpt start controller --port $cport --daemon"
"$bin" start controller --host 127.0.0.1 --port "$cport" --daemon
curl -fsS -X POST "http://127.0.0.1:$cport/api/controller/models" -H 'Content-Type: application/json' \
  -d '{"model_name":"example@llm","host":"127.0.0.1","port":8001}' >/dev/null
echo "== dbgpt model list"
"$bin" model --address "http://127.0.0.1:$cport" list
echo "== dbgpt ctl status"
"$bin" ctl status
echo "demo: ok (logs in $DBGPT_LOG_DIR)"
