"""The cluster's state as the broker publishes it (on PUB, once a second), for
whoever watches it live: the dashboard's event stream (`/v1/cluster/events`).

One SUB per API process, however many pages watch: each watcher waits for the
next version and is handed the latest one (a slow page skips states, it never
queues them)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import zmq
import zmq.asyncio

from exo.broker import protocol as P

log = logging.getLogger(__name__)


class ClusterFeed:
    def __init__(self) -> None:
        self.sock: zmq.asyncio.Socket | None = None
        self.state: dict[str, Any] | None = None
        self.version = 0
        self.changed = asyncio.Event()  # set at each new state, then replaced
        self.dropped = P.Counters()
        self.task: asyncio.Task[None] | None = None

    def attach(self, sock: zmq.asyncio.Socket) -> None:
        """Read from `sock` (a SUB to the broker's cluster topic) from now on: a
        new one after every registration, since the broker may have moved."""
        old, self.sock = self.sock, sock
        if old is not None:
            old.close(linger=0)
        if self.task is None:
            self.task = asyncio.create_task(self.run())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.sock is not None:
            self.sock.close(linger=0)

    async def run(self) -> None:
        while True:
            sock = self.sock
            assert sock is not None
            try:
                parts = await sock.recv_multipart()
            except zmq.ZMQError:
                await asyncio.sleep(0.05)  # replaced under us
                continue
            except asyncio.CancelledError:
                if sock is self.sock:  # close(), not a replacement
                    raise
                continue
            self.take(parts)

    def take(self, parts: list[bytes]) -> None:
        try:
            msg = P.decode(parts[1]) if len(parts) == 2 else None
        except P.ProtocolError as e:
            self.dropped[e.reason] += 1
            return
        if not isinstance(msg, P.Reply) or not isinstance(msg.data, dict):
            self.dropped["not_a_state"] += 1
            return
        self.state, self.version = msg.data, self.version + 1
        self.changed.set()
        self.changed = asyncio.Event()

    async def next(self, after: int, timeout: float) -> tuple[int, dict[str, Any] | None]:
        """The state after version `after`, waiting up to `timeout` for one; the
        same version again when none came (the caller sends a keep-alive)."""
        if self.version <= after:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout)
        return self.version, self.state
