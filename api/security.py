"""Who may use the HTTP API: API keys, and no web page the user did not mean.

- **API keys** (`--api-key`, several allowed, or EXO_API_KEY, comma-separated):
  every request but CORS preflights and the dashboard's own files carries `Authorization: Bearer KEY` (as
  OpenAI's clients send it) or `x-api-key: KEY` (as Anthropic's do); otherwise 401
  in OpenAI's shape. Off when no key is configured (a loopback-only API).
- **Host allow-list**: a Host header outside it is refused, so a DNS-rebinding page
  (evil.example resolving to 127.0.0.1) cannot read the API. By default the
  loopback names and the address the API is bound to; `--allowed-host` adds more
  ("*": any).
- **Origin allow-list**: a request from a browser page carries Origin; one that is
  not the API's own or listed (`--allowed-origin`) is refused before any handler
  runs, so no page can pull models, place instances or burn compute through a
  "simple" cross-site POST that CORS would not stop. Listed origins get CORS
  headers and their preflights answered.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exo.api.errors import error_body

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


def keys_from_env() -> list[str]:
    return [k.strip() for k in os.environ.get("EXO_API_KEY", "").split(",") if k.strip()]


def host_of(value: str) -> str:
    """The host part of a Host header or an origin's authority, lower-cased."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@dataclass
class Policy:
    keys: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)  # besides the loopback names
    origins: list[str] = field(default_factory=list)  # besides the API's own

    def host_ok(self, host: str) -> bool:
        return "*" in self.hosts or host_of(host) in {*LOOPBACK_HOSTS, *self.hosts}

    def origin_ok(self, origin: str, host: str) -> bool:
        """An origin is the API's own (its authority is the Host the request came
        to, itself allowed) or listed."""
        if "*" in self.origins or origin in self.origins:
            return True
        scheme, _, authority = origin.partition("://")
        return scheme in ("http", "https") and authority.lower() == host.strip().lower()

    def key_ok(self, given: str | None) -> bool:
        if not self.keys:
            return True
        if not given:
            return False
        return any(hmac.compare_digest(given.encode(), k.encode()) for k in self.keys)


def caller_key(headers: dict[bytes, bytes]) -> str | None:
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    key = headers.get(b"x-api-key")
    return key.decode("latin-1").strip() if key else None


class Guard:
    """ASGI middleware applying a Policy to every HTTP request."""

    def __init__(
        self,
        app: ASGIApp,
        policy: Policy,
        public: Callable[[str, str], bool] = lambda method, path: False,
    ) -> None:
        # public(method, path): served without a key (the dashboard's own files)
        self.app, self.policy, self.public = app, policy, public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        origin = headers.get(b"origin", b"").decode("latin-1")
        p = self.policy
        if not p.host_ok(host):
            await refuse(send, 400, f"Host {host!r} is not allowed here.", "host_not_allowed")
            return
        cors: list[tuple[bytes, bytes]] = []
        if origin:
            if not p.origin_ok(origin, host):
                await refuse(send, 403, f"Origin {origin!r} is not allowed.", "origin_not_allowed")
                return
            cors = [
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"vary", b"Origin"),
            ]
            if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
                await preflight(send, cors)
                return
        given = caller_key(headers)
        if not p.key_ok(given) and not self.public(scope["method"], scope["path"]):
            await refuse(
                send,
                401,
                "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'.",
                "invalid_api_key",
                cors,
            )
            return
        scope.setdefault("state", {})["api_key"] = given if p.keys else None
        if not cors:
            await self.app(scope, receive, send)
            return

        async def with_cors(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), *cors]}
            await send(msg)

        await self.app(scope, receive, with_cors)


async def refuse(
    send: Send,
    status: int,
    message: str,
    code: str,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = json.dumps(error_body(status, message, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send(
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
    )
    await send({"type": "http.response.body", "body": body})


async def preflight(send: Send, cors: list[tuple[bytes, bytes]]) -> None:
    headers = [
        *cors,
        (b"access-control-allow-methods", b"GET, POST, DELETE, OPTIONS"),
        (b"access-control-allow-headers", b"authorization, content-type, x-api-key"),
        (b"access-control-max-age", b"600"),
        (b"content-length", b"0"),
    ]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
