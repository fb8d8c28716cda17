#!/usr/bin/env bash
# Set up everything t3d needs on a fresh machine, from this repo's own files. Idempotent.
#   .venv/               Python environment (CPU torch 2.13.0 unless T3D_TORCH says otherwise)
#   .tools/node_modules  Khronos glTF validator, used by the export tests
#   web/node_modules     model-viewer (the 3D view copied next to report.html) and playwright-core (the page check)
# T3D_CUDA=1 sets up a CUDA machine instead: a CUDA torch (T3D_TORCH, default the index's `torch`),
# nvdiffrast (`diffrp-nvdiffrast`: its sources, built by torch on first use with nvcc + ninja) and
# tinycudann from its git source when the machine reaches GitHub (else the one command to run).
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
# Pin torch first: an unpinned `torch` would pull a multi-GB CUDA build (wanted only with T3D_CUDA=1).
CUDA=${T3D_CUDA:-0}
if [ "$CUDA" = 1 ]; then
  pip_install "${T3D_TORCH:-torch}"
else
  pip_install "${T3D_TORCH:-torch==2.13.0}"
fi
pip_install -e ".[dev]"
.venv/bin/python -c "import t3d.cli.main" >/dev/null

if [ "$CUDA" = 1 ]; then
  pip_install ".[cuda]" ninja
  command -v nvcc >/dev/null 2>&1 || echo "warning: nvcc not found: nvdiffrast and tinycudann need the CUDA toolkit (nvcc) to build; install it, or the torch twins are used" >&2
  TCNN_GIT="git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch"
  if .venv/bin/python -c "import tinycudann" >/dev/null 2>&1; then
    echo "tinycudann: already installed"
  elif command -v nvcc >/dev/null 2>&1 && command -v git >/dev/null 2>&1 && timeout 15 git ls-remote https://github.com/NVlabs/tiny-cuda-nn HEAD >/dev/null 2>&1; then
    echo "tinycudann: building from its git source (several minutes per GPU architecture) ..."
    pip_install --no-build-isolation "$TCNN_GIT"
  else
    echo "tinycudann: not installed (this machine cannot reach GitHub, or has no nvcc); where it can: .venv/bin/pip install --no-build-isolation \"$TCNN_GIT\"" >&2
  fi
  .venv/bin/t3d doctor || true
fi

if command -v npm >/dev/null 2>&1; then
  if [ ! -d .tools/node_modules/gltf-validator ]; then
    npm install --silent --no-audit --no-fund --prefix .tools gltf-validator@2.0.0-dev.3.10 >/dev/null 2>&1 || echo "warning: npm could not install gltf-validator; GLB validation tests will be skipped" >&2
  fi
  # web/: skipped while npm's record of the last install is newer than the lock file
  if [ ! web/node_modules/.package-lock.json -nt web/package-lock.json ]; then
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --silent --no-audit --no-fund --prefix web >/dev/null 2>&1 || echo "warning: npm ci in web/ failed; reports have no 3D view and the browser tests will be skipped" >&2
  fi
else
  echo "warning: npm not found; GLB validation and browser tests will be skipped, reports have no 3D view" >&2
fi
# Prefect's database for `t3d run`'s local server (~/.cache/t3d/prefect, or T3D_PREFECT_HOME): its
# migrations take 6-8 s that a new user's first run would otherwise wait for.
.venv/bin/t3d server --prepare >/dev/null || echo "warning: could not prepare Prefect's database; the first \`t3d run\` will create it (6-8 s more)" >&2
echo "t3d installed: $(.venv/bin/t3d --help >/dev/null && echo ok) ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
