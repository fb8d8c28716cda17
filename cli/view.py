"""`t3d view PATH`: serve an outputs folder (report.html) or a batch gallery on 127.0.0.1.

A report opened from the disk works too (its GLB is inlined), but over HTTP a page also shows a
GLB too large to inline, and the URL can be reached through an SSH tunnel from another machine.
Only the chosen folder is served, and only on loopback.
"""

from __future__ import annotations

import functools
import signal
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DEFAULT_PORT = 8765
PAGES = ("report.html", "gallery.html")


class ViewError(ValueError):
    """PATH is not something `t3d view` can serve."""


def resolve_target(path: Path) -> tuple[Path, str]:
    """(folder to serve, page inside it, '' for the folder listing) for an outputs folder or a page."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ViewError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() not in (".html", ".htm"):
            raise ViewError(f"{path}: not an HTML page (give an outputs folder, a report.html or a gallery.html)")
        return path.resolve().parent, path.name
    if not path.is_dir():
        raise ViewError(f"{path}: neither a file nor a folder")
    folder = path.resolve()
    for page in PAGES:
        if (folder / page).is_file():
            return folder, page
    return folder, ""


class _QuietHandler(SimpleHTTPRequestHandler):
    """Files of one folder; no log line per request (the terminal shows the URL, not the traffic)."""

    extensions_map = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".glb": "model/gltf-binary",
        ".gltf": "model/gltf+json",
        ".mp4": "video/mp4",
        ".js": "text/javascript",
        ".mjs": "text/javascript",
    }

    def log_message(self, format, *args) -> None:
        pass


def open_server(path: Path, port: int | None = None, host: str = "127.0.0.1") -> tuple[ThreadingHTTPServer, str]:
    """A started-but-not-serving server for PATH and the URL of its page.

    port None: DEFAULT_PORT, or any free port when that one is taken; 0: any free port; else that
    port or a ViewError.
    """
    folder, page = resolve_target(path)
    handler = functools.partial(_QuietHandler, directory=str(folder))
    try:
        server = ThreadingHTTPServer((host, DEFAULT_PORT if port is None else port), handler)
    except OSError as exc:
        if port is not None:
            raise ViewError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        server = ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    bound_host, bound_port = server.server_address[:2]
    return server, f"http://{bound_host}:{bound_port}/{page}"


def serve_until_interrupted(server: ThreadingHTTPServer) -> None:
    """serve_forever until Ctrl-C or SIGTERM, then close the socket."""

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
