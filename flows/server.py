"""Local Prefect servers that t3d starts itself: one per data folder, shared, never orphaned.

Prefect's temporary per-run server gives itself 20 s to start (a first start also migrates its
database), which a busy machine misses, and concurrent runs each start one on the same SQLite
file. So `t3d run`, `t3d batch` and `t3d server` all use one real `prefect server start` per data
folder (default ~/.cache/t3d/prefect, so `t3d server` on that folder shows every run):

- the first user starts it, under a file lock, and waits as long as a loaded machine needs
  (T3D_PREFECT_START_TIMEOUT, default 300 s); later users find it in `server.json` and join;
- each user holds a lease file named after its pid; a small supervisor process stops the server
  once no lease belongs to a live process, so a `kill -9` of the last user leaves nothing behind;
- the server is the supervisor's child with a parent-death signal, so killing the supervisor
  itself cannot orphan it either.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "server.json"
LEASES = "leases"


def default_data_dir() -> Path:
    return Path(os.environ.get("T3D_PREFECT_HOME") or Path.home() / ".cache" / "t3d" / "prefect")


def start_timeout_s() -> float:
    """How long to wait for a starting server: minutes, since a first start migrates its database."""
    raw = os.environ.get("T3D_PREFECT_START_TIMEOUT", "300")
    try:
        return max(1.0, float(raw))
    except ValueError:
        raise ValueError(f"T3D_PREFECT_START_TIMEOUT={raw!r}: give seconds, e.g. 300") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def healthy(api_url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def server_env(data_dir: Path, api_url: str | None = None) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(data_dir), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    else:
        env.pop("PREFECT_API_URL", None)
    return env


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def live_leases(lease_dir: Path) -> list[Path]:
    """Lease files whose process still runs; the others are removed (their holder died)."""
    alive = []
    for lease in lease_dir.glob("*") if lease_dir.is_dir() else []:
        try:
            pid = int(lease.name.split(".", 1)[0])
        except ValueError:
            continue
        if _pid_alive(pid):
            alive.append(lease)
        else:
            with contextlib.suppress(FileNotFoundError):
                lease.unlink()
    return alive


def server_pids(data_dir: Path) -> list[int]:
    """Supervisors and Prefect servers started for `data_dir` (Linux /proc; [] elsewhere): what
    must be gone once the last user of a server has exited or been killed."""
    pids = []
    for proc in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if (b"t3d.flows.server" in cmd or b"server\0start" in cmd) and str(data_dir).encode() in env:
            pids.append(int(proc.name))
    return pids


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    """An exclusive lock on the data folder: starting, joining and stopping never interleave."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "server.lock", "a+") as f:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no cross-process lock, best effort
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_state(data_dir: Path) -> dict | None:
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


@dataclass
class LocalServer:
    api_url: str
    ui_url: str
    data_dir: Path
    log_path: Path
    supervisor_pid: int
    lease: Path | None = None

    def alive(self) -> bool:
        _reap(self.supervisor_pid)
        return _pid_alive(self.supervisor_pid)

    def release(self) -> None:
        """Drop this process's lease: the server stops once no live process holds one."""
        if self.lease is not None:
            with contextlib.suppress(FileNotFoundError):
                self.lease.unlink()
            self.lease = None

    def stop(self, wait_s: float = 30.0) -> None:
        """Stop the server now, whoever else uses it (`t3d server`'s Ctrl-C, tests)."""
        self.release()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.supervisor_pid, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while _pid_alive(self.supervisor_pid) and time.monotonic() < deadline:
            _reap(self.supervisor_pid)
            time.sleep(0.1)

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _reap(pid: int) -> None:
    """Collect our own exited child so it stops counting as alive (a zombie answers kill(pid, 0))."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def start_server(
    data_dir: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    ui: bool = True,
    timeout_s: float | None = None,
    shared: bool = False,
) -> LocalServer:
    """Start a supervised `prefect server start` and wait until /api/health answers.

    shared=True joins the data folder's running server if there is one (what `t3d run` wants);
    otherwise a new server starts and becomes the one later runs join. The caller holds a lease
    until release()/stop(), or until it dies.
    """
    data_dir = Path(data_dir or default_data_dir()).expanduser().resolve()
    timeout_s = start_timeout_s() if timeout_s is None else timeout_s
    lease_dir = data_dir / LEASES
    with _locked(data_dir):
        lease_dir.mkdir(parents=True, exist_ok=True)
        lease = lease_dir / f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
        lease.touch()
        state = _read_state(data_dir)
        if (
            shared
            and state
            and _pid_alive(int(state.get("supervisor_pid", 0) or 0))
            and healthy(state.get("api_url", ""))
        ):
            return LocalServer(
                state["api_url"], state["ui_url"], data_dir, Path(state["log"]), int(state["supervisor_pid"]), lease
            )
        port = port or free_port(host)
        log_path = data_dir / "server.log"
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
        if not ui:
            cmd.append("--no-ui")
        supervisor = [
            sys.executable,
            "-m",
            "t3d.flows.server",
            "--data",
            str(data_dir),
            "--log",
            str(log_path),
            "--",
            *cmd,
        ]
        proc = subprocess.Popen(
            supervisor,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=server_env(data_dir),
        )
        api = f"http://{host if host not in ('0.0.0.0', '::') else '127.0.0.1'}:{port}/api"
        server = LocalServer(api, api.removesuffix("/api"), data_dir, log_path, proc.pid, lease)
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                server.release()
                raise RuntimeError(
                    f"the Prefect server stopped while starting (exit {proc.returncode}); its log: {log_path}"
                )
            if healthy(api):
                break
            if time.monotonic() > deadline:
                server.stop()
                raise TimeoutError(
                    f"the Prefect server did not answer within {timeout_s:.0f} s (log: {log_path}); on a busy "
                    "machine raise T3D_PREFECT_START_TIMEOUT"
                )
            time.sleep(0.1)  # a start takes 3-5 s; polling often starts the run as soon as it answers
        (data_dir / STATE_FILE).write_text(
            json.dumps({"api_url": api, "ui_url": server.ui_url, "supervisor_pid": proc.pid, "log": str(log_path)})
        )
        return server


def prepare_data_dir(data_dir: str | Path | None = None, timeout_s: float = 900.0) -> Path:
    """Create (or upgrade) the data folder's Prefect database now, without starting a server.

    A fresh folder's first server start runs Prefect's ~100 database migrations (6-8 s on an idle
    2-core machine, several times that on a busy one) before it answers. install.sh runs this for
    the default folder, so a new user's first `t3d run` only starts the server. An existing,
    current database is left as it is (the upgrade is then a no-op)."""
    data_dir = Path(data_dir or default_data_dir()).expanduser().resolve()
    cmd = [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"]
    try:
        with _locked(data_dir):
            proc = subprocess.run(
                cmd,
                env=server_env(data_dir),
                capture_output=True,
                text=True,
                timeout=timeout_s,
                stdin=subprocess.DEVNULL,
            )
    except OSError as exc:
        raise RuntimeError(f"cannot prepare a Prefect database in {data_dir}: {exc.strerror or exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"preparing the Prefect database in {data_dir} failed (exit {proc.returncode}): {tail[0]}")
    return data_dir


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)


def supervise(data_dir: Path, log_path: Path, cmd: list[str], poll_s: float = 1.0) -> int:
    """Run `cmd` (the server) until it exits, we are signalled, or no live lease remains."""
    stop = {"now": False}

    def on_signal(*_):
        stop["now"] = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        try:
            while not stop["now"] and server.poll() is None:
                time.sleep(poll_s)
                if not live_leases(data_dir / LEASES):
                    with _locked(data_dir):  # nobody can join between this check and the stop
                        if not live_leases(data_dir / LEASES):
                            break
        finally:
            with _locked(data_dir):
                state = _read_state(data_dir)
                if state and state.get("supervisor_pid") == os.getpid():
                    (data_dir / STATE_FILE).unlink(missing_ok=True)
            if server.poll() is None:
                server.terminate()
                try:
                    server.wait(20)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
    return 0


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="supervise a Prefect server for t3d (internal)")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return supervise(args.data, args.log, cmd)


class PrefectConnection:
    """The one way t3d gets a Prefect API (`t3d run`, `t3d batch`, `t3d server`, the benches):
    connected on first need, released at close().

    By default PREFECT_API_URL (env or Prefect's settings) wins when it answers; otherwise the
    shared local server of `data_dir` (default_data_dir()) is joined or started. dedicated=True
    ignores PREFECT_API_URL, always starts a new server (on host:port, with the UI when asked)
    and stops it at close(). api_url() returns None, with the reason in `problem`, when Prefect
    cannot be reached: a run then runs its stages locally. child_env() is the environment for
    processes that must report to the same API.
    """

    def __init__(
        self,
        on_wait: Callable[[str], contextlib.AbstractContextManager] | None = None,
        timeout_s: float | None = None,
        *,
        data_dir: str | Path | None = None,
        ui: bool = False,
        dedicated: bool = False,
        host: str = "127.0.0.1",
        port: int | None = None,
    ):
        self.on_wait = on_wait or (lambda _msg: contextlib.nullcontext())
        self.timeout_s = timeout_s
        self.data_dir = Path(data_dir).expanduser() if data_dir else None
        self.ui, self.dedicated, self.host, self.port = ui, dedicated, host, port
        self.problem: str | None = None
        self.server: LocalServer | None = None  # set when this connection started or joined one
        self._url: str | None = None
        self._tried = False

    def api_url(self) -> str | None:
        if self._tried:
            return self._url
        self._tried = True
        configured = None if self.dedicated else _configured_api()
        try:
            if configured:
                with self.on_wait(f"connecting to the Prefect API at {configured} ..."):
                    deadline = time.monotonic() + min(10.0, self.timeout_s or 10.0)
                    while not healthy(configured):
                        if time.monotonic() > deadline:
                            raise TimeoutError(
                                f"PREFECT_API_URL={configured} does not answer (start that server, or unset "
                                "PREFECT_API_URL)"
                            )
                        time.sleep(1.0)
                self._url = configured
            else:
                what = "Prefect's server and UI" if self.ui else "Prefect's local server"
                with self.on_wait(
                    f"starting {what} (the first start migrates its database; minutes on a busy machine) ..."
                ):
                    self.server = start_server(
                        self.data_dir,
                        host=self.host,
                        port=self.port,
                        ui=self.ui,
                        timeout_s=self.timeout_s,
                        shared=not self.dedicated,
                    )
                self._url = self.server.api_url
        except (OSError, RuntimeError, TimeoutError, ValueError) as exc:
            self.problem = str(exc)
            self._url = None
        return self._url

    @property
    def connected_url(self) -> str | None:
        """The API this connection already reached, without connecting (or starting a server) now."""
        return self._url if self._tried else None

    def child_env(self) -> dict:
        """os.environ for a child process, pointed at this API (and its server's data folder)."""
        url = self.api_url()
        if self.server is not None:
            return server_env(self.server.data_dir, url)
        return {**os.environ, "PREFECT_API_URL": url} if url else {**os.environ}

    def close(self) -> None:
        if self.server is not None:
            if self.dedicated:
                self.server.stop()
            else:
                self.server.release()
            self.server = None

    def __enter__(self) -> PrefectConnection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _configured_api() -> str | None:
    url = os.environ.get("PREFECT_API_URL")
    if url or "prefect" not in sys.modules:
        return url or None
    from prefect.settings import PREFECT_API_URL  # a test harness sets it through Prefect's settings

    return PREFECT_API_URL.value() or None


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
