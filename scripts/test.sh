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
# Unit tests (lib), the binary's tests and the end-to-end suite (no doc tests: there are none).
log=$(mktemp); trap 'rm -f "$log"' EXIT
echo "== cargo test"
cargo test --locked --lib --bins --tests -- --test-threads="${DBGPT_TEST_THREADS:-4}" 2>&1 | tee "$log"
echo "== package checks"; scripts/package-check.sh
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
