"""A dedicated local Prefect server: for the UI, for batches and for workers.

Prefect's temporary server (started per run when no API is configured) takes 7-18 s and several
concurrent runs against it time out, so `t3d server` and `t3d batch` run one real
`prefect server start` bound to 127.0.0.1 with its database under a folder the user chooses.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


@dataclass
class LocalServer:
    process: subprocess.Popen
    api_url: str
    ui_url: str
    data_dir: Path
    log_path: Path
    log_file: object = None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.log_file is not None:
            self.log_file.close()

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def server_env(data_dir: Path, api_url: str | None = None) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(data_dir), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    else:
        env.pop("PREFECT_API_URL", None)
    return env


def start_server(data_dir: str | Path, host: str = "127.0.0.1", port: int | None = None, ui: bool = True, timeout_s: float = 90.0) -> LocalServer:
    """Start `prefect server start` in the background and wait until /api/health answers."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port(host)
    log_path = data_dir / "server.log"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    if not ui:
        cmd.append("--no-ui")
    logf = open(log_path, "ab")
    proc = subprocess.Popen(cmd, env=server_env(data_dir), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    api = f"http://{host}:{port}/api"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            logf.close()
            raise RuntimeError(f"prefect server exited with {proc.returncode}; see {log_path}")
        if healthy(api):
            return LocalServer(proc, api, f"http://{host}:{port}", data_dir, log_path, logf)
        time.sleep(0.3)
    proc.kill()
    logf.close()
    raise TimeoutError(f"prefect server did not become healthy in {timeout_s:.0f}s; see {log_path}")
