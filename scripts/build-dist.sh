#!/usr/bin/env bash
# Builds what the packages ship, then the packages, into $CARGO_TARGET_DIR/dist/:
#   dist/dbgpt                      the binary (stripped)
#   dist/man/*.1.gz                 man pages  } generated from the real CLI definition
#   dist/completions/{dbgpt.bash,_dbgpt,dbgpt.fish}  } by examples/gen-docs.rs
#   dist/dbgpt_<version>_<arch>.deb and dist/dbgpt-<version>.<arch>.rpm
#
# The binary comes from the dev profile with our crate at opt-level 3 and without debug
# assertions and overflow checks (scripts/optimized-env.sh): every dependency is built that
# way in dev builds already ([profile.dev.package."*"]: opt-level 3, debug-assertions and
# overflow-checks off), so this reuses the test suite's compiled llama.cpp/candle and
# recompiles only dbgpt-cluster, where `cargo build --release` or a profile of its own
# would rebuild everything (~20 min on 2 cores). It is copied out of
# target/debug so later plain dev builds do not replace it. cargo-deb and cargo-generate-rpm
# then run with `--profile dist`, which makes the `target/release/` asset paths in Cargo.toml
# point at $CARGO_TARGET_DIR/dist/.
#
# Usage: scripts/build-dist.sh [--no-packages]
# Needs cargo-deb and cargo-generate-rpm (scripts/package-check.sh installs them into
# $DBGPT_CACHE_DIR/tools) unless --no-packages is given.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${DBGPT_CACHE_DIR:-$HOME/.cache/dbgpt-cluster}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$cache/target}
export PATH=$cache/tools/bin:$PATH

packages=1
case "${1:-}" in
    "") ;;
    --no-packages) packages=0 ;;
    *) echo "usage: $0 [--no-packages]" >&2; exit 2 ;;
esac

dist=$CARGO_TARGET_DIR/dist
mkdir -p "$dist"

echo "== build dbgpt (dev profile, opt-level 3, no debug assertions or overflow checks) and gen-docs"
source scripts/optimized-env.sh
cargo build --locked --example gen-docs
scripts/build-optimized.sh   # the binary, linked with packaging/symbol-order.txt

install -m 0755 "$CARGO_TARGET_DIR/debug/dbgpt" "$dist/dbgpt.tmp"
strip "$dist/dbgpt.tmp"
mv -f "$dist/dbgpt.tmp" "$dist/dbgpt"
"$dist/dbgpt" --version

echo "== man pages and completions"
rm -rf "$dist/man" "$dist/completions"
"$CARGO_TARGET_DIR/debug/examples/gen-docs" "$dist" >/dev/null
test -s "$dist/man/dbgpt.1"
gzip -9n "$dist"/man/*.1
for f in dbgpt.bash _dbgpt dbgpt.fish; do test -s "$dist/completions/$f"; done

if [ "$packages" = 1 ]; then
    echo "== .deb and .rpm"
    rm -f "$dist"/*.deb "$dist"/*.rpm
    # --no-strip: the binary is stripped above; stripping again would only cost time.
    cargo deb --no-build --no-strip --profile dist --output "$dist/"
    cargo generate-rpm --profile dist --output "$dist/"
    ls -l "$dist"/*.deb "$dist"/*.rpm
fi
