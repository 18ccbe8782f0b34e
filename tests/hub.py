"""A small Hugging Face-compatible hub on loopback, for download tests.

It serves model folders in the hub's URL layout: the API's file listing with
sizes and LFS sha256 (`/api/models/{repo}[/revision/{rev}]?blobs=true`) and
`/{repo}/resolve/{revision}/{file}` with Range support. Faults on demand: cut a
connection after N bytes, answer 429 with Retry-After or 500, serve corrupted
bytes, or throttle to a rate.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from exo.nodes.store.weights import LISTING, RESOLVE, get_server, hub_listing


@dataclass
class Faults:
    cut_after: dict[str, int] = field(default_factory=dict)  # file -> bytes, then close (once)
    statuses: dict[str, list[int]] = field(default_factory=dict)  # file -> statuses to answer first
    corrupt: dict[str, int] = field(default_factory=dict)  # file -> times to serve bad bytes
    rate: float | None = None  # bytes/s for every file body
    retry_after: int = 1
    # A rogue hub: list a file under another name (a path out of the folder), or
    # list a smaller size than it then sends.
    listed_as: dict[str, str] = field(default_factory=dict)
    listed_size: dict[str, int] = field(default_factory=dict)


class Hub:
    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.faults = Faults()
        self.served: dict[str, int] = {}  # file -> body bytes sent
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.lock = threading.Lock()
        self.server = get_server("127.0.0.1", 0, self.handle)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Hub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def listing(self, repo: str) -> dict:
        root = self.repos[repo]
        siblings = []
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                data = p.read_bytes()
                name = str(p.relative_to(root))
                size = self.faults.listed_size.get(name, len(data))
                siblings.append(
                    {
                        "rfilename": self.faults.listed_as.get(name, name),
                        "size": size,
                        "blobId": hashlib.sha1(data).hexdigest(),
                        "lfs": {
                            "sha256": hashlib.sha256(data).hexdigest(),
                            "size": size,
                            "pointerSize": 134,
                        },
                    }
                )
        return hub_listing(repo, siblings)

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        with self.lock:
            self.requests.append((path, h.headers.get("Range")))
        if m := LISTING.fullmatch(path):
            if m.group(1) not in self.repos:
                return self.send(
                    h, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}
                )
            return self.send(
                h,
                200,
                json.dumps(self.listing(m.group(1))).encode(),
                {"Content-Type": "application/json"},
            )
        m = RESOLVE.fullmatch(path)
        if (
            not m
            or m.group(1) not in self.repos
            or not (self.repos[m.group(1)] / m.group(2)).is_file()
        ):
            return self.send(h, 404, b"not found")
        name = m.group(2)
        with self.lock:
            pending = self.faults.statuses.get(name)
            status = pending.pop(0) if pending else None
        if status is not None:
            extra = {"Retry-After": str(self.faults.retry_after)} if status == 429 else {}
            return self.send(h, status, b"try again", extra)
        data = (self.repos[m.group(1)] / name).read_bytes()
        with self.lock:
            if self.faults.corrupt.get(name, 0) > 0:
                self.faults.corrupt[name] -= 1
                data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        start = 0
        rng = h.headers.get("Range")
        if rng and (r := re.fullmatch(r"bytes=(\d+)-", rng)):
            start = int(r.group(1))
            if start >= len(data):
                return self.send(h, 416, b"", {"Content-Range": f"bytes */{len(data)}"})
        body = data[start:]
        h.send_response(206 if start else 200)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "bytes")
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        with self.lock:
            cut = self.faults.cut_after.pop(name, None)
        sent = 0
        step = 16384
        try:
            while sent < len(body):
                piece = body[sent : sent + step]
                if cut is not None and sent + len(piece) > cut:
                    piece = piece[: max(0, cut - sent)]
                    h.wfile.write(piece)
                    self.count(name, len(piece))
                    h.wfile.flush()
                    h.close_connection = True
                    h.connection.shutdown(2)
                    return
                h.wfile.write(piece)
                sent += len(piece)
                self.count(name, len(piece))
                if self.faults.rate:
                    time.sleep(len(piece) / self.faults.rate)
        except (BrokenPipeError, ConnectionResetError):
            return

    def count(self, name: str, n: int) -> None:
        with self.lock:
            self.served[name] = self.served.get(name, 0) + n

    @staticmethod
    def send(
        h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
