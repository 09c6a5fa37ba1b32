#!/usr/bin/env bash
# Embeddings benchmark (not a test): MiniLM texts/s at 1, 8 and 32 concurrent single-text
# requests and for one request of 32 texts, and the worker's CPU per text, for the base build
# ("old", before dynamic batching) and this build ("new"), A/B alternating in one run,
# through the worker's own OpenAI route and through the apiserver. Prints a Markdown table of
# medians over the rounds with the new/old ratios, and the load average. Bounded: every
# phase lasts SECS seconds (and at most 100000 requests), startup waits are capped.
#
#   scripts/bench-embed.sh                       # 3 rounds of 3 s phases
#   ROUNDS=5 SECS=5 CONC=1,8,32 scripts/bench-embed.sh
#   BENCH_OLD_BIN=/tmp/old/dbgpt scripts/bench-embed.sh   # the "old" binary, nothing built for it
#   BENCH_NEW_BIN=/path/dbgpt scripts/bench-embed.sh      # the "new" binary, nothing built for it
#   BENCH_BASE=<commit> scripts/bench-embed.sh            # base commit [default: 8b4ebb4]
#   BENCH_OPT_LEVEL=0 scripts/bench-embed.sh              # our crate unoptimised (quicker builds;
#                                   # the model code is in dependencies, optimised either way)
#
# Without BENCH_OLD_BIN the base commit is checked out into a temporary git worktree and
# built once with the same CARGO_TARGET_DIR (dependencies are reused, only our crate is
# compiled), our crate optimised as in scripts/build-optimized.sh (CARGO_PROFILE_DEV_OPT_LEVEL=3,
# never --release); the binary is kept in $DBGPT_CACHE_DIR/bench-embed/ for the next run.
#
# Topology (one controller; each build runs its own worker and apiserver, default flags):
#   bench_embed ──► worker /api/worker/openai/v1/embeddings                ("worker")
#   bench_embed ──► apiserver /v1/embeddings ──► worker (native route)     ("apiserver")
# CPU per text is the worker's (and the apiserver's) CPU during the phase divided by the
# texts answered (every thread's /proc/<pid>/task/*/schedstat).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-3}
ROUNDS=${ROUNDS:-3}
CONC=${CONC:-1,8,32}
BASE=${BENCH_BASE:-8b4ebb4}
cache=${DBGPT_CACHE_DIR:-$HOME/.cache/dbgpt-cluster}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target}
export DBGPT_MODELS_DIR=${DBGPT_MODELS_DIR:-$cache/models}
MODEL_DIR=$DBGPT_MODELS_DIR/all-MiniLM-L6-v2
[ -f "$MODEL_DIR/model.safetensors" ] || scripts/fetch-models.sh >/dev/null
OPT=${BENCH_OPT_LEVEL:-3}
[ "$OPT" = 0 ] || export CARGO_PROFILE_DEV_OPT_LEVEL=$OPT

# The old binary: given, cached, or built from the base commit.
OLD=${BENCH_OLD_BIN:-}
if [ -z "$OLD" ]; then
  sha=$(git rev-parse --short=12 "$BASE^{commit}")
  OLD=$cache/bench-embed/dbgpt-$sha-O$OPT
  if [ ! -x "$OLD" ]; then
    mkdir -p "$cache/bench-embed"
    tree=$(mktemp -d /tmp/dbgpt-embed-base.XXXXXX)
    git worktree add -q --detach "$tree" "$sha"
    echo "# building the base $sha in $tree (our crate only; dependencies are reused)" >&2
    if (cd "$tree" && cargo build --locked -q --bin dbgpt); then
      cp "$CARGO_TARGET_DIR/debug/dbgpt" "$OLD"
    fi
    git worktree remove --force "$tree"
    [ -x "$OLD" ] || { echo "building $sha failed" >&2; exit 1; }
  fi
fi
# The new binary and the load generator.
if [ -n "${BENCH_NEW_BIN:-}" ]; then
  cargo build --locked -q --example bench_embed
  NEW=$BENCH_NEW_BIN
else
  cargo build --locked -q --bin dbgpt --example bench_embed
  NEW=$CARGO_TARGET_DIR/debug/dbgpt
fi
LOAD=$CARGO_TARGET_DIR/debug/examples/bench_embed

WORK=$(mktemp -d /tmp/dbgpt-bench-embed.XXXXXX)
export DBGPT_RUNTIME_DIR=$WORK/run DBGPT_LOG_DIR=$WORK/log DBGPT_STATE_DIR=$WORK/state
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 300); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "timeout waiting for $1" >&2; exit 1; }

CTL=$(port)
"$NEW" start controller --host 127.0.0.1 --port "$CTL" --registry_path "$WORK/reg.redb" --log_level warn >"$WORK/ctl.log" 2>&1 & PIDS+=($!)
wait_http "http://127.0.0.1:$CTL/api/health"
declare -A WPORT WPID APORT APID
for side in old new; do
  bin=$OLD; [ "$side" = new ] && bin=$NEW
  WPORT[$side]=$(port); APORT[$side]=$(port)
  "$bin" start worker --host 127.0.0.1 --port "${WPORT[$side]}" --controller_addr "http://127.0.0.1:$CTL" \
    --model_name "minilm-$side" --worker_type text2vec --model_path "$MODEL_DIR" --log_level warn \
    >"$WORK/worker-$side.log" 2>&1 & WPID[$side]=$!; PIDS+=($!)
  "$bin" start apiserver --host 127.0.0.1 --port "${APORT[$side]}" --controller_addr "http://127.0.0.1:$CTL" \
    --log_level warn >"$WORK/api-$side.log" 2>&1 & APID[$side]=$!; PIDS+=($!)
done
for side in old new; do
  wait_http "http://127.0.0.1:${APORT[$side]}/api/health"
  ok=
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:${APORT[$side]}/v1/embeddings" -H 'content-type: application/json' \
      -d "{\"model\":\"minilm-$side\",\"input\":\"warm up\"}" >/dev/null 2>&1 && { ok=1; break; }
    sleep 0.1
  done
  [ -n "$ok" ] || { echo "minilm-$side did not answer through the apiserver within 30 s" >&2; tail -5 "$WORK/worker-$side.log" >&2; exit 1; }
done

phase() { # side path conc texts
  local side=$1 path=$2 conc=$3 texts=$4 url pids
  if [ "$path" = worker ]; then
    url="http://127.0.0.1:${WPORT[$side]}/api/worker/openai/v1/embeddings"; pids=${WPID[$side]}
  else
    url="http://127.0.0.1:${APORT[$side]}/v1/embeddings"; pids=${WPID[$side]},${APID[$side]}
  fi
  timeout $((SECS * 3 + 60)) "$LOAD" --label "$side|$path" --url "$url" --model "minilm-$side" \
    --conc "$conc" --texts "$texts" --secs "$SECS" --pids "$pids" >>"$WORK/raw.tsv"
}

echo "# $(nproc) cores; our crate at opt-level $OPT; old = $OLD, new = $NEW; $ROUNDS rounds of ${SECS}s phases; load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
IFS=, read -ra CONCS <<<"$CONC"
for r in $(seq "$ROUNDS"); do
  order="old new"; [ $((r % 2)) = 0 ] && order="new old"
  for path in worker apiserver; do
    for c in "${CONCS[@]}"; do
      for side in $order; do phase "$side" "$path" "$c" 1; done
    done
    for side in $order; do phase "$side" "$path" 1 32; done
  done
done
LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)

python3 - "$WORK/raw.tsv" "$LOADAVG" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    f = line.rstrip("\n").split("\t")
    side, path = f[0].split("|")
    conc, texts = int(f[1]), int(f[2])
    rate, p50, errors = float(f[6]), float(f[7]), int(f[8])
    cpus = [float(x) for x in f[9:]]
    rows.setdefault((path, conc, texts), {}).setdefault(side, []).append((rate, p50, errors, cpus))
med = lambda xs: statistics.median(xs) if xs else float("nan")
print("| path | concurrent requests × texts | old texts/s | new texts/s | new/old | old p50 ms | new p50 ms | old worker CPU ms/text | new worker CPU ms/text | apiserver CPU ms/text old / new | errors |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
for path in ("worker", "apiserver"):
    for (p, conc, texts), sides in sorted(rows.items(), key=lambda kv: (kv[0][2], kv[0][1])):
        if p != path:
            continue
        o, n = sides.get("old", []), sides.get("new", [])
        ro, rn = med([x[0] for x in o]), med([x[0] for x in n])
        api = ""
        if path == "apiserver":
            api = f"{med([x[3][1] for x in o]):.2f} / {med([x[3][1] for x in n]):.2f}"
        print(f"| {path} | {conc} × {texts} | {ro:.1f} | {rn:.1f} | {rn / ro:.2f}x | "
              f"{med([x[1] for x in o]):.1f} | {med([x[1] for x in n]):.1f} | "
              f"{med([x[3][0] for x in o]):.2f} | {med([x[3][0] for x in n]):.2f} | {api} | "
              f"{sum(x[2] for x in o + n)} |")
print(f"\nload average at the end: {sys.argv[2]}")
PY
