#!/usr/bin/env bash
# Reproduce docs/prefect-run.png: a Prefect server on 127.0.0.1, one short real run on the
# embedded prior (so stages publish their previews), and headless Chromium screenshots of the
# flow-run page and of the stage artifact. Needs Debian's chromium (apt-get install chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
port=$(.venv/bin/python -c "from t3d.flows.server import free_port; print(free_port())")
export PREFECT_HOME=$work/prefect PREFECT_API_URL=http://127.0.0.1:$port/api T3D_TORCH_THREADS=1 TQDM_DISABLE=1
.venv/bin/python -m prefect server start --host 127.0.0.1 --port "$port" >"$work/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 120); do curl -sf "$PREFECT_API_URL/health" >/dev/null && break; sleep 0.5; done
cat >"$work/flow.yaml" <<YAML
prompt: a red cube
store: $work/store
stages:
  coarse: {steps: 120, preview_frames: 12}
  extract_mesh: {resolution: 64, texture_size: 256}
  texture: {steps: 20}
  export: {turntable_frames: 12, turntable_size: 128}
YAML
.venv/bin/t3d run "$work/flow.yaml"
read -r run_id artifact_id < <(.venv/bin/python - <<'PY'
import asyncio
from prefect.client.orchestration import get_client
async def main():
    async with get_client() as c:
        runs = await c.read_flow_runs(limit=1)
        arts = [a for a in await c.read_artifacts() if a.key == "a-red-cube-export"]
        print(runs[0].id, arts[0].id)
asyncio.run(main())
PY
)
shoot() {
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$work/chrome" --hide-scrollbars \
    --window-size=1500,1100 --virtual-time-budget=20000 --screenshot="$2" "$1" >/dev/null 2>&1
}
shoot "http://127.0.0.1:$port/runs/flow-run/$run_id" docs/prefect-run.png
shoot "http://127.0.0.1:$port/artifacts/artifact/$artifact_id" docs/prefect-artifact.png
echo "wrote docs/prefect-run.png and docs/prefect-artifact.png"
