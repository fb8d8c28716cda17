#!/usr/bin/env bash
# Set up everything t3d needs on a fresh machine, from this repo's own files. Idempotent.
#   .venv/               Python environment (CPU torch 2.13.0 unless T3D_TORCH says otherwise)
#   .tools/node_modules  Khronos glTF validator, used by the export tests
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip_install() {  # quiet pip; on failure print everything and stop
  local log; log=$(mktemp)
  if ! .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; exit 1
  fi
  grep -v "is ignored" "$log" || true; rm -f "$log"
}
# Pin torch first: an unpinned `torch` would pull a multi-GB CUDA build.
pip_install "${T3D_TORCH:-torch==2.13.0}"
pip_install -e ".[dev]"
.venv/bin/python -c "import t3d.cli.main" >/dev/null

if command -v npm >/dev/null 2>&1; then
  if [ ! -d .tools/node_modules/gltf-validator ]; then
    npm install --silent --no-audit --no-fund --prefix .tools gltf-validator@2.0.0-dev.3.10 >/dev/null 2>&1 || echo "warning: npm could not install gltf-validator; GLB validation tests will be skipped" >&2
  fi
else
  echo "warning: npm not found; GLB validation tests will be skipped" >&2
fi
echo "t3d installed: $(.venv/bin/t3d --help >/dev/null && echo ok) ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
