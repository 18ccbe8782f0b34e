"""The dashboard: one page at `/`, every file it loads shipped in this package
(api/dashboard/: nothing from the internet, no JavaScript toolchain), and the
live state it watches (`GET /v1/cluster/events`, server-sent events).

The page and its files hold no data, so they load without an API key (the page
asks for one when the API answers 401); everything the page shows comes from
the API's own endpoints, under the same keys as any client."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from exo.api.errors import error_response
from exo.api.routes import api_key, client_of

router = APIRouter()

FOLDER = Path(__file__).resolve().parent.parent / "dashboard"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Read once: no path a request names ever reaches the filesystem.
FILES = {p.name: p.read_bytes() for p in sorted(FOLDER.iterdir()) if p.suffix in TYPES}
# The page may load and call only this origin: an injected script or a
# compromised file cannot reach anywhere else, nor can another site frame it.
HEADERS = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}
PUBLIC_PATHS = ("/", "/favicon.ico")  # and /ui/*: what the Guard lets through without a key
KEEPALIVE_S = 15.0  # a comment on an idle stream, so proxies keep it open


def public(method: str, path: str) -> bool:
    """Whether the Guard serves this without an API key (the page's own files)."""
    return method in ("GET", "HEAD") and (path in PUBLIC_PATHS or path.startswith("/ui/"))


def asset(name: str) -> Response:
    body = FILES.get(name)
    if body is None:
        return error_response(404, f"no file {name!r} in the dashboard", "not_found")
    media = TYPES[Path(name).suffix]
    return Response(body, media_type=media, headers=HEADERS)


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def page() -> Response:
    return asset("index.html")


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> Response:
    return asset("icon.svg")


@router.api_route("/ui/{name}", methods=["GET", "HEAD"], include_in_schema=False)
async def ui_file(name: str) -> Response:
    return asset(name)


def event(name: str, data: object) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@router.get("/v1/cluster/events")
async def cluster_events(request: Request) -> StreamingResponse:
    """The cluster's state now, then each state the broker publishes, as
    `event: cluster` server-sent events. Requests in flight that this caller
    submitted (its API key) are marked `mine`: those it may cancel."""
    client = client_of(request)
    first = await client.query("cluster")
    key = api_key(request)

    def marked(state: dict[str, Any]) -> dict[str, Any]:
        owners = client.owners
        mine = [
            {**r, "mine": r.get("id") in owners and owners[r["id"]] == key}
            for r in state.get("requests", [])
        ]
        return {**state, "requests": mine}

    async def stream() -> AsyncIterator[bytes]:
        version = client.feed.version
        yield event("cluster", marked(first))
        while True:
            v, state = await client.feed.next(version, KEEPALIVE_S)
            if v == version or state is None:
                yield b": keep-alive\n\n"
                continue
            version = v
            yield event("cluster", marked(state))

    headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)
