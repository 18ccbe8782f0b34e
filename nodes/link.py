"""The node's connection to the broker, on its own thread.

This thread owns the DEALER socket: it registers, heartbeats, notices a silent
broker and reconnects, and passes request traffic to and from the engine
thread over an inproc PAIR. Heartbeats keep flowing while the engine thread is
busy loading a model or computing a step (MLX releases the GIL while it
computes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from exo.broker import protocol as P
from exo.common import keys
from exo.common.dealer import Session

log = logging.getLogger(__name__)

# Request frames kept after they went: the broker relays each TOKENS once (by
# seq), so what a dying link may have lost is sent again when the node is back.
KEEP_S = 10.0

# What the broker sends the node's main loop (worker.py), passed on as it came.
ENGINE_TYPES = (P.Generate, P.Cancel, P.Download, P.Load, P.Unload, P.Probe, P.Route)


def on_my_networks(endpoint: str) -> bool:
    """Whether a broker endpoint is on a network this machine has an address in."""
    import ipaddress

    from exo.nodes.machine.interfaces import interfaces

    try:
        ip = ipaddress.ip_address(endpoint.removeprefix("tcp://").rsplit(":", 1)[0])
        nets = [ipaddress.ip_network(n, strict=False) for i in interfaces() for n in i.networks]
    except ValueError:
        return False
    return ip.is_loopback or any(ip in n for n in nets)


@dataclass
class Outgoing:
    """Request traffic to the broker, kept KEEP_S after it went (`at`)."""

    at: float
    frame: bytes
    sent: bool = False


class BrokerLink(threading.Thread):
    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        broker: str,
        peer_id: str,
        name: str,
        pair_addr: str,
        info: Callable[[], dict[str, Any]],
        status: Callable[[], dict[str, Any]],
        on_reset: Callable[[], None],
        cluster: keys.Cluster | None = None,
    ) -> None:
        super().__init__(name="broker-link", daemon=True)
        self.cluster = cluster  # None: an insecure cluster
        self.ctx, self.broker, self.peer_id = ctx, broker, peer_id
        self.session = Session(
            broker,
            peer_id,
            lambda: P.Hello(role="node", peer_id=peer_id, name=name, info=info()),
            cluster,
            cluster.node if cluster else None,
            silent_s=P.SILENT_S,
            usable=on_my_networks,
        )
        self.pair_addr = pair_addr
        self.info, self.status, self.on_reset = info, status, on_reset
        self.stop_event = threading.Event()
        self.info_now = threading.Event()  # send INFO at once (a download just finished)
        self.dropped = P.Counters()
        # Request traffic to the broker (TOKENS, FAIL, STATE, CANCEL_ACK), to send
        # again after a failover.
        self.outbox: deque[Outgoing] = deque()
        self.dealer: zmq.Socket[bytes] | None = None
        self.sub: zmq.Socket[bytes] | None = None
        self.poller = zmq.Poller()

    @property
    def refused(self) -> str | None:
        return self.session.refused

    @property
    def registered(self) -> bool:
        return self.session.registered

    def _connect(self) -> None:
        if self.dealer is not None:
            self.dealer.close(linger=0)
        self.dealer = self.session.dial(self.ctx)
        self.dealer.send(self.session.hello())

    def _subscribe(self) -> None:
        """Cancels also come on the broker's PUB: a second path, never the only one."""
        if self.sub is not None:
            self.poller.unregister(self.sub)
            self.sub.close(linger=0)
        self.sub = self.session.subscribe(self.ctx, P.TOPIC_CANCEL)
        self.poller.register(self.sub, zmq.POLLIN)

    def on_session(self, msg: P.Msg) -> None:
        what = self.session.on(msg)
        if what == "again":
            # A new registration means the broker forgot us: whatever we were
            # computing has no one to go to.
            self.outbox.clear()
            self.on_reset()
        elif what == "resumed":
            # Back over another link: what the dead one may have lost goes again.
            cutoff = time.monotonic() - KEEP_S
            self.outbox = deque(Outgoing(o.at, o.frame) for o in self.outbox if o.at >= cutoff)
        if what in ("welcome", "again", "resumed") and self.session.pub_port:
            self._subscribe()
        elif what == "refused":
            self.stop_event.set()
        elif what == "reconnect":
            assert self.dealer is not None
            self.dealer.send(self.session.hello())

    def flush(self, now: float) -> None:
        """Send what the engine gave, in order, once registered; keep it KEEP_S."""
        if self.registered:
            assert self.dealer is not None
            for item in self.outbox:
                if not item.sent:
                    self.dealer.send(item.frame)
                    item.sent = True
        while self.outbox and self.outbox[0].sent and self.outbox[0].at < now - KEEP_S:
            self.outbox.popleft()

    def run(self) -> None:
        pair = self.ctx.socket(zmq.PAIR)
        pair.connect(self.pair_addr)
        self._connect()
        assert self.dealer is not None
        next_beat = next_info = 0.0
        poller = self.poller
        poller.register(pair, zmq.POLLIN)
        poller.register(self.dealer, zmq.POLLIN)
        while not self.stop_event.is_set():
            # Sleep until a message or the next heartbeat: no idle wake-ups stealing
            # CPU from the engine on small machines.
            wait = max(
                0.0,
                min(next_beat, next_info if self.registered else next_beat) - time.monotonic(),
            )
            events = dict(poller.poll(max(1, int(wait * 1000))))
            if self.sub is not None and self.sub in events:
                while self.sub.poll(0):
                    parts = self.sub.recv_multipart()
                    try:
                        if len(parts) == 2 and isinstance(P.decode(parts[1]), P.Cancel):
                            pair.send(parts[1])
                    except P.ProtocolError as e:
                        self.dropped[e.reason] += 1
            now = time.monotonic()
            if self.dealer in events:
                while self.dealer.poll(0):
                    frame = self.dealer.recv(copy=False).buffer
                    self.session.heard()
                    try:
                        msg = P.decode(frame)
                    except P.ProtocolError as e:
                        self.dropped[e.reason] += 1
                        log.warning("dropped a frame from the broker: %s", e)
                        continue
                    if isinstance(msg, ENGINE_TYPES):
                        pair.send(frame)
                        log.debug("%s from the broker", msg.type)
                    else:
                        self.on_session(msg)
            if pair in events:
                while pair.poll(0):
                    self.outbox.append(Outgoing(now, pair.recv()))
            self.flush(now)
            if self.session.silent(now):
                self.session.next_endpoint()
                poller.unregister(self.dealer)
                self._connect()
                poller.register(self.dealer, zmq.POLLIN)
            if now >= next_beat:
                self.dealer.send(P.encode(P.Heartbeat(status=self.status())))
                next_beat = now + P.HEARTBEAT_S
            if self.info_now.is_set():
                self.info_now.clear()
                next_info = 0.0
            if now >= next_info and self.registered:
                self.dealer.send(P.encode(P.Info(info=self.info())))
                next_info = now + 5.0
        self.dealer.close(linger=0)
        if self.sub is not None:
            self.sub.close(linger=0)
        pair.close(linger=0)
