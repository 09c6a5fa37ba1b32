#!/usr/bin/env bash
# Worker benchmark: builds the example with our crate optimised (dependencies are already
# opt-level 3 and are reused) and prints a markdown table. Needs the model files
# (scripts/fetch-models.sh). Not a test: numbers depend on the machine and its load.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${DBGPT_CACHE_DIR:-$HOME/.cache/dbgpt-cluster}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target}
export DBGPT_MODELS_DIR=${DBGPT_MODELS_DIR:-$cache/models}
scripts/fetch-models.sh >/dev/null
source scripts/optimized-env.sh
cargo run --locked --quiet --example bench_worker
