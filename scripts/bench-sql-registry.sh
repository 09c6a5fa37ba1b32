#!/usr/bin/env bash
# Heartbeat throughput and p99 of the controller with the redb registry (one controller)
# beside the SQL registry on MariaDB and PostgreSQL (two controllers on one database each),
# 1000 instances, loopback only, bounded in time (SECONDS per store) and request count.
# Usage: scripts/bench-sql-registry.sh [instances=1000] [seconds=10] [connections=32]
# Needs the test database servers (scripts/setup.sh starts them). DBGPT_BIN overrides the
# controller binary (default: the one this script builds, with PROFILE=dev|release).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
target=${CARGO_TARGET_DIR:-target}
echo "bench: building dbgpt and the bench example ($profile)" >&2
cargo build -q --profile "$profile" --bin dbgpt --example bench_sql_registry
bin=${DBGPT_BIN:-$target/$dir/dbgpt}
exec timeout 600 "$target/$dir/examples/bench_sql_registry" "$bin" "${1:-1000}" "${2:-10}" "${3:-32}"
