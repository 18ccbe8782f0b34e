"""Bounds on what an HTTP client can send, applied before any handler reads it.

A request body over MAX_BODY is refused with 413: a SUBMIT carrying it must fit
the broker's frame limit (protocol.MAX_FRAME) with room for the envelope, or it
would cost the broker connection that every other user shares. (JSON nested too
deep is the parser's to refuse: pydantic's stops at a recursion limit, a 400.)
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exo.api.errors import error_body
from exo.broker import protocol as P

MAX_BODY = P.MAX_FRAME // 2


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes (declared or streamed) gets 413."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await too_large(send, self.limit)
            return
        seen = 0
        refused = False

        async def counted() -> Message:
            nonlocal seen, refused
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    refused = True
                    raise BodyTooLarge
            return msg

        started = False

        async def watched(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if refused and not started:
                await too_large(send, self.limit)


class BodyTooLarge(Exception):
    pass


async def too_large(send: Send, limit: int) -> None:
    body = json.dumps(
        error_body(413, f"The request body is over {limit} bytes.", "request_too_large")
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
