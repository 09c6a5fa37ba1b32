#!/usr/bin/env bash
# Builds the dbgpt binary as shipped (scripts/optimized-env.sh: our crate at opt-level 3
# without debug assertions and overflow checks in the dev profile, as every dependency
# already is, so nothing else is rebuilt; never --release) and linked
# with the function order of packaging/symbol-order.txt, into $CARGO_TARGET_DIR/debug/dbgpt.
# Used by build-dist.sh and the benchmarks; plain `cargo build` (tests) links unordered.
#
# The order file lists the functions the daemons run (scripts/gen-symbol-order.sh); lld
# (`--symbol-ordering-file`) places them first and together in .text, so a daemon maps a
# few contiguous megabytes of code instead of ~128 KB around each of hundreds of places in
# the 17 MB of machine code that llama.cpp, candle and sqlx bring in (controller idle RSS:
# 15.5 -> 12.4 MB). Most names are the same in every build, but functions that LLVM
# promotes across our crate's codegen units carry a `.llvm.<hash>` suffix that depends on
# the checkout's path: the list stores them without it, and this script looks the actual
# names up in a first link, writes $CARGO_TARGET_DIR/symbol-order.resolved.txt and links
# again if that changed. Only the small binary crate (src/main.rs) is rebuilt for a link.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${DBGPT_CACHE_DIR:-$HOME/.cache/dbgpt-cluster}/target}
source scripts/optimized-env.sh
list=$PWD/packaging/symbol-order.txt
resolved=$CARGO_TARGET_DIR/symbol-order.resolved.txt
bin=$CARGO_TARGET_DIR/debug/dbgpt

# Cargo relinks when the arguments change, not when a file they name does: link with a
# copy named after its content.
link() {
    local sum copy
    sum=$(sha256sum "$1" | cut -c1-16)
    copy=$CARGO_TARGET_DIR/symbol-order.$sum.txt
    [ -f "$copy" ] || cp "$1" "$copy"
    cargo rustc --locked --bin dbgpt -- \
        -C "link-arg=-Wl,--symbol-ordering-file=$copy" -C link-arg=-Wl,--no-warn-symbol-ordering
}
mkdir -p "$CARGO_TARGET_DIR"
[ -f "$resolved" ] || cp "$list" "$resolved"
link "$resolved"
python3 - "$list" "$bin" >"$resolved.new" <<'PY'
import re, subprocess, sys
listed = [l.strip() for l in open(sys.argv[1]) if l.strip()]
out = subprocess.run(["nm", "--defined-only", sys.argv[2]], capture_output=True, text=True,
                     check=True).stdout
by_base = {}
for line in out.splitlines():
    parts = line.split()
    if len(parts) == 3:
        by_base.setdefault(re.sub(r"\.llvm\.\d+$", "", parts[2]), []).append(parts[2])
seen = set()
for name in listed:
    for actual in by_base.get(name, [name]):
        if actual not in seen:
            seen.add(actual)
            print(actual)
PY
if cmp -s "$resolved.new" "$resolved"; then
    rm "$resolved.new"
else
    mv "$resolved.new" "$resolved"
    link "$resolved"
fi
listed=$(grep -c . "$list")
found=$(comm -12 <(nm --defined-only "$bin" | awk '{print $3}' | sed -E 's/\.llvm\.[0-9]+$//' | sort -u) \
    <(sort -u "$list") | wc -l)
echo "   symbol order: $found of $listed listed functions are in the binary (the rest are" \
    "libc's and libstdc++'s; rerun scripts/gen-symbol-order.sh when this drops)" >&2
