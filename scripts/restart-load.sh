#!/usr/bin/env bash
# Restart/upgrade load run (issue 16 §3 at scale): a controller, a proxy worker in front of a
# test-double upstream, a SmolLM2 llama.cpp worker and the apiserver; while RESTART_CLIENTS
# clients (default 8; half on keep-alive connections, half on a new connection per request)
# send plain and streamed chat requests to both models through the apiserver, each round
# upgrades the apiserver, both workers and the controller in place (`dbgpt ctl upgrade`) and
# restarts the apiserver and the controller as systemd socket activation does (the listening
# socket outlives the process). RESTART_ROUNDS rounds (default 10). Prints a table of
# requests sent / streams / failed / truncated / refused; fails unless the last three are 0
# and the workers' models stayed healthy in the controller throughout.
#
# It runs the ignored end-to-end test restart::restart_load_at_scale (the same fixtures as
# the small-scale test in tests/e2e/restart.rs). Needs the model files
# (scripts/fetch-models.sh); without SmolLM2 it runs with the proxy worker only.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${DBGPT_CACHE_DIR:-$HOME/.cache/dbgpt-cluster}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target}
export DBGPT_MODELS_DIR=${DBGPT_MODELS_DIR:-$cache/models}
export RESTART_ROUNDS=${RESTART_ROUNDS:-10} RESTART_CLIENTS=${RESTART_CLIENTS:-8}
scripts/fetch-models.sh >/dev/null || echo "note: model files unavailable; proxy worker only" >&2
echo "restart load: $RESTART_ROUNDS rounds, $RESTART_CLIENTS clients, load average $(cut -d' ' -f1-3 /proc/loadavg)"
cargo test --locked --quiet --test e2e restart::restart_load_at_scale -- --ignored --exact --nocapture \
    2>&1 | grep -v '^running \|^test result\|^$\|^test restart'
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
