"""A peer's side of the broker conversation, as the node and the API frontend
both hold it (the ZeroMQ guide's client and worker agents): its DEALER (socket
options, routing identity, CURVE key) and the session over it, apart from any
I/O loop: HELLO, WELCOME, REFUSED, RECONNECT, heartbeats and a silent broker.

The node runs it on a thread (nodes/link.py), the API on asyncio (api/client.py);
both ask the session what to do and do it with their own socket.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar

import zmq

from exo.broker import protocol as P
from exo.common import keys, retry

log = logging.getLogger(__name__)
S = TypeVar("S", bound=zmq.Socket[Any])  # a zmq or zmq.asyncio socket, as its context makes


def routing_id(peer_id: str) -> bytes:
    """A DEALER's routing identity at the broker: its public peer id and a secret.
    The broker's ROUTER hands a connection over to a peer that claims an identity
    it knows (so a reconnecting peer keeps its place); with a secret part no one
    else can claim it, though the peer id is published."""
    return f"{peer_id}.{secrets.token_hex(16)}".encode()


def configure_dealer(sock: zmq.Socket[Any], identity: bytes) -> None:
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 10000)
    sock.setsockopt(zmq.RCVHWM, 10000)
    sock.setsockopt(zmq.HEARTBEAT_IVL, int(P.HEARTBEAT_S * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(P.EXPIRY_S * 1000))
    sock.setsockopt(zmq.RECONNECT_IVL, int(retry.CONNECT.first * 1000))
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(retry.CONNECT.cap * 1000))
    sock.setsockopt(zmq.MAXMSGSIZE, 4 * P.MAX_FRAME)


class Session:
    """`hello` makes this peer's HELLO (a node's carries its facts, made fresh
    each time). `key`: this peer's CURVE keypair in `cluster` (None: insecure)."""

    def __init__(
        self,
        broker: str,
        peer_id: str,
        hello: Callable[[], P.Hello],
        cluster: keys.Cluster | None = None,
        key: keys.Pair | None = None,
        silent_s: float = 2 * P.EXPIRY_S,
        usable: Callable[[str], bool] = lambda endpoint: True,
    ) -> None:
        self.peer_id, self.make_hello = peer_id, hello
        self.cluster, self.key = cluster, key
        # Where the broker may be reached: the address given, then the others its
        # WELCOME lists (each of its machine's addresses). One is dialled at a time.
        self.endpoints = [broker]
        self.at = 0
        self.silent_s, self.usable = silent_s, usable
        self.routing_id = routing_id(peer_id)
        self.registered = False
        self.welcomes = 0
        self.refused: str | None = None
        self.pub_port = 0
        self.last_heard = time.monotonic()
        self.failovers: list[dict[str, Any]] = []  # the last few: at, from, to, silent_s

    @property
    def broker(self) -> str:
        """The endpoint dialled now."""
        return self.endpoints[self.at]

    def next_endpoint(self) -> None:
        """The one dialled now went quiet: the next one the broker listed."""
        if len(self.endpoints) < 2:
            return
        before, silent = self.broker, time.monotonic() - self.last_heard
        self.at = (self.at + 1) % len(self.endpoints)
        self.failovers = [
            *self.failovers[-7:],
            {"at": time.time(), "from": before, "to": self.broker, "silent_s": round(silent, 2)},
        ]
        log.warning("broker at %s silent %.1fs: trying %s", before, silent, self.broker)

    def public(self) -> dict[str, Any]:
        return {"endpoint": self.broker, "endpoints": self.endpoints, "failovers": self.failovers}

    def dial(self, ctx: zmq.Context[S]) -> S:
        """A new DEALER to the broker (a zmq or zmq.asyncio context's), connected:
        send `hello()` on it next."""
        sock = ctx.socket(zmq.DEALER)
        configure_dealer(sock, self.routing_id)
        if self.cluster is not None and self.key is not None:
            keys.connect_as(sock, self.key, self.cluster.broker)
        sock.connect(self.broker)
        self.last_heard = time.monotonic()
        return sock

    def subscribe(self, ctx: zmq.Context[S], *topics: bytes) -> S:
        """A SUB to the broker's PUB (on the host dialled now, at the port its
        WELCOME gave), with this peer's key, subscribed to `topics`."""
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 4 * P.MAX_FRAME)
        for topic in topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic)
        if self.cluster is not None and self.key is not None:
            keys.connect_as(sock, self.key, self.cluster.broker)
        sock.connect(f"{self.broker.rsplit(':', 1)[0]}:{self.pub_port}")
        return sock

    def hello(self) -> bytes:
        self.registered = False
        return P.encode(self.make_hello())

    def heard(self) -> None:
        self.last_heard = time.monotonic()

    def silent(self, now: float) -> bool:
        """The broker said nothing for `silent_s`: dial again (the next endpoint)."""
        return now - self.last_heard > self.silent_s

    def on(self, msg: P.Msg) -> str | None:
        """The session's own messages -> what happened: "welcome", "resumed" (the
        broker kept this peer through a silence: its work goes on), "again" (a
        WELCOME after the first: the broker forgot this peer and all it was
        doing), "refused" (stop: `refused` says why), "reconnect" (send HELLO
        again); None for everything else."""
        if isinstance(msg, P.Welcome):
            self.registered = True
            self.welcomes += 1
            self.pub_port = msg.pub_port
            # Those on this machine's own networks first: the others may be out of reach.
            fresh = [a for a in msg.addresses if a not in self.endpoints][:32]
            self.endpoints += sorted(fresh, key=lambda a: not self.usable(a))
            log.info("registered with %s as %s", self.broker, self.peer_id)
            if msg.resumed:
                return "resumed"
            return "again" if self.welcomes > 1 else "welcome"
        if isinstance(msg, P.Refused):
            self.refused = msg.reason
            log.error("broker %s refused %s: %s", self.broker, self.peer_id, msg.reason)
            return "refused"
        if isinstance(msg, P.Reconnect):
            log.info(
                "broker %s asks %s to register again (%s)", self.broker, self.peer_id, msg.reason
            )
            return "reconnect"
        return None
