"""Weights from peers: every node serves its complete models to the others.

The server speaks the part of the Hugging Face hub's HTTP layout that the
Downloader uses (the model listing with sizes and sha256, and
`/{repo}/resolve/{revision}/{file}` with Range requests), so a node fetching
from a peer goes through exactly the same `.partial` / resume / verify path as
one fetching from the hub; only the base URL differs. Only complete folders are
served (never a `.partial` file), read-only, streamed from disk.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from exo.nodes.store import manifest
from exo.nodes.store.store import ModelStore

log = logging.getLogger(__name__)

CHUNK = 1 << 20
LISTING = re.compile(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?")
RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)")


# At most this many connections at once (more are closed at once), and a peer
# silent this long (headers not sent, a read not taken) is dropped: idle
# connections cannot pile up threads and file descriptors.
MAX_CONNECTIONS = 16
IDLE_S = 15.0


def hub_listing(repo: str, siblings: list[dict[str, Any]]) -> dict[str, Any]:
    """The hub's model-info document (`/api/models/{repo}`) for these files, as
    huggingface_hub's model_info reads it."""
    return {"id": repo, "modelId": repo, "sha": "0" * 40, "private": False, "siblings": siblings}


class BoundedServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args: Any, limit: int = MAX_CONNECTIONS, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.slots = threading.BoundedSemaphore(limit)
        self.refused = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def get_server(
    host: str, port: int, on_get: Callable[[BaseHTTPRequestHandler], None]
) -> BoundedServer:
    """A threaded HTTP/1.1 server that hands every GET to `on_get`, quietly, with
    at most MAX_CONNECTIONS connections and an IDLE_S deadline on each."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = IDLE_S

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            on_get(self)

    return BoundedServer((host, port), Handler)


class WeightsServer:
    def __init__(
        self, store: ModelStore, host: str = "0.0.0.0", port: int = 0, token: str | None = None
    ) -> None:
        self.store = store
        # Only the cluster's nodes may fetch (None: anyone, an insecure cluster).
        self.token = token
        self.lock = threading.Lock()
        self.bytes_served = 0
        self.http = get_server(host, port, self.handle)
        self.port = int(self.http.server_address[1])
        self.thread = threading.Thread(target=self.http.serve_forever, name="weights", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()

    def listing(self, repo: str, root: Path) -> dict[str, Any]:
        """The hub's listing of a model, from its manifest, verified first (a file
        corrupted on disk makes the whole model unservable: manifest.Corrupt)."""
        doc = manifest.verify(root)
        siblings = [
            {
                "rfilename": name,
                "size": e["size"],
                "lfs": {"sha256": e["sha256"], "size": e["size"], "pointerSize": 0},
            }
            for name, e in sorted(doc["files"].items())
        ]
        return hub_listing(repo, siblings)

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        if self.token is not None:
            given = h.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return self.send(h, 401, b'{"error": "not a node of this cluster"}')
        path = h.path.split("?", 1)[0]
        models = self.store.scan()  # complete folders only
        if m := LISTING.fullmatch(path):
            root = models.get(m.group(1))
            if root is None:
                return self.send(h, 404, b'{"error": "Repository not found"}', "RepoNotFound")
            try:
                body = json.dumps(self.listing(m.group(1), root)).encode()
            except manifest.Corrupt as e:
                log.error("not serving %s: %s", m.group(1), e)
                return self.send(h, 409, json.dumps({"error": str(e)}).encode(), "Corrupt")
            return self.send(h, 200, body)
        m = RESOLVE.fullmatch(path)
        root = models.get(m.group(1)) if m else None
        target = (root / m.group(2)).resolve() if root and m else None
        if (
            target is None
            or root is None
            or not target.is_file()
            or root.resolve() not in target.parents
            or target.name.startswith(".")
        ):
            return self.send(h, 404, b"not found")
        try:
            manifest.verify(root, str(target.relative_to(root.resolve())))
        except manifest.Corrupt as e:
            log.error("not serving %s: %s", target, e)
            return self.send(h, 409, json.dumps({"error": str(e)}).encode(), "Corrupt")
        size = target.stat().st_size
        start = 0
        if (rng := h.headers.get("Range")) and (r := re.fullmatch(r"bytes=(\d+)-", rng)):
            start = int(r.group(1))
            if start >= size:
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{size}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        h.send_response(206 if start else 200)
        h.send_header("Content-Length", str(size - start))
        h.send_header("Accept-Ranges", "bytes")
        if start:
            h.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        h.end_headers()
        try:
            with target.open("rb") as f:
                f.seek(start)
                while block := f.read(CHUNK):
                    h.wfile.write(block)
                    with self.lock:
                        self.bytes_served += len(block)
        except (BrokenPipeError, ConnectionResetError):
            return

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, body: bytes, error: str = "") -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        if error:
            h.send_header("X-Error-Code", error)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
