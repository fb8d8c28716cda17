#!/usr/bin/env bash
# Stage what scripts/device_check.sh carries to the GPU machine, where nothing can be downloaded:
#
#   .whl/   wheels (CPython 3.12, manylinux x86_64) of what t3d needs and that machine's image lacks
#           (its python3 has torch, transformers, peft, safetensors, typer, pyyaml, rich, tqdm,
#           fsspec, imageio, scikit-image, scipy, huggingface-hub, setuptools, ninja, nvcc; not
#           diffusers, pydantic, trimesh, xatlas, PyMCubes, fast-simplification, nvdiffrast).
#           Prefect is left out on purpose: the check runs the flow through t3d.runner in-process.
#   .tcnn/  tiny-cuda-nn's sources for its PyTorch bindings, encodings only (`setup.py
#           --no-networks`, so no cutlass), with the fmt submodule's include/ and src/. Copied from
#           local git clones (this machine cannot reach GitHub): --tcnn-git DIR --fmt-git DIR,
#           each a clone (or bare mirror) of NVlabs/tiny-cuda-nn and fmtlib/fmt; fmt is taken at
#           the commit tiny-cuda-nn pins. Without them an existing .tcnn/ is kept, and without one
#           the check says tinycudann was skipped.
#
# Both folders are listed in .git/info/exclude (never committed) and travel with `run`'s carry:
#   carry: [".whl", ".tcnn"]   (together with the working tree: under 64 MiB)
#
# Usage: scripts/stage_device_wheels.sh [--tcnn-git DIR --fmt-git DIR]
#        scripts/stage_device_wheels.sh --list     # the pinned wheel list (device_check.sh reads it)
set -euo pipefail

# name==version, one per line: keep ONE version of each (two stop the whole offline install).
WHEELS=(
  diffusers==0.42.1            # the priors (toy and SD-sized); needs huggingface-hub>=1.32 (there: 1.33)
  pydantic==2.14.4             # configs and stage params
  pydantic_core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing_extensions==4.16.0    # pydantic 2.14 needs >= 4.16
  trimesh==5.2.0               # meshes, GLB export, bench/raster.py's scene
  PyMCubes==0.1.6              # marching cubes (extract_mesh)
  xatlas==0.0.11               # UV unwrap (extract_mesh)
  fast_simplification==0.2.0   # trimesh's quadric decimation
  diffrp-nvdiffrast==0.3.3.1   # nvdiffrast 0.3.3 sources; torch JIT-builds it there (nvcc + ninja)
)

if [[ "${1:-}" == "--list" ]]; then
  printf '%s\n' "${WHEELS[@]}" | sed 's/[[:space:]]*#.*//'
  exit 0
fi

TCNN_GIT="" FMT_GIT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tcnn-git) TCNN_GIT=$2; shift 2 ;;
    --fmt-git) FMT_GIT=$2; shift 2 ;;
    *) echo "unknown argument: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")"
for pat in /.whl/ /.tcnn/ /device-check/; do
  grep -qxF "$pat" "$EXCLUDE" 2>/dev/null || echo "$pat" >>"$EXCLUDE"
done

PY=${PYTHON:-python3}
mkdir -p .whl
# drop wheels that are no longer pinned (two versions of one package break the install there)
keep=$(printf '%s\n' "${WHEELS[@]}" | sed 's/[[:space:]]*#.*//' | awk -F'==' '{n=tolower($1); gsub(/[-.]/,"_",n); print n"-"$2"-"}')
for f in .whl/*.whl; do
  [[ -e "$f" ]] || continue
  base=$(basename "$f" | tr 'A-Z' 'a-z')
  ok=0
  while read -r prefix; do [[ "$base" == "$prefix"* ]] && ok=1; done <<<"$keep"
  (( ok )) || { echo "removing unpinned $f"; rm -f "$f"; }
done
# shellcheck disable=SC2046
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl $(printf '%s\n' "${WHEELS[@]}" | sed 's/[[:space:]]*#.*//')

if [[ -n "$TCNN_GIT" ]]; then
  [[ -n "$FMT_GIT" ]] || { echo "--tcnn-git needs --fmt-git too (fmt is a submodule)" >&2; exit 2; }
  rm -rf .tcnn && mkdir -p .tcnn/tiny-cuda-nn/dependencies/fmt
  rev=$(git -C "$TCNN_GIT" rev-parse HEAD)
  fmt_rev=$(git -C "$TCNN_GIT" ls-tree HEAD dependencies/fmt | awk '{print $3}')
  git -C "$TCNN_GIT" archive "$rev" CMakeLists.txt LICENSE.txt include src bindings \
    dependencies/json dependencies/pcg32 dependencies/pybind11_json | tar -x -C .tcnn/tiny-cuda-nn
  git -C "$FMT_GIT" archive "$fmt_rev" include src | tar -x -C .tcnn/tiny-cuda-nn/dependencies/fmt
  printf 'tiny-cuda-nn %s\nfmt %s\n' "$rev" "$fmt_rev" >.tcnn/SOURCES
fi

echo "staged:"
du -sh .whl 2>/dev/null
du -sh .tcnn 2>/dev/null || echo "  (no .tcnn: tinycudann will be skipped)"
echo "check with: scripts/device_check.sh --dry-run"
