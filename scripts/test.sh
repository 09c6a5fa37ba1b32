#!/usr/bin/env bash
# The whole test suite: set-up, format check, clippy with -D warnings, then every test
# (unit tests and the end-to-end tests that start the real binary with the real models).
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${DBGPT_CACHE_DIR:-$HOME/.cache/dbgpt-cluster}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target}
export DBGPT_MODELS_DIR=${DBGPT_MODELS_DIR:-$cache/models}
scripts/setup.sh
echo "== cargo fmt --check"; cargo fmt --all -- --check
echo "== cargo clippy"; cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"; cargo test --locked -- --test-threads="${DBGPT_TEST_THREADS:-4}"
echo "== package checks"; scripts/package-check.sh
