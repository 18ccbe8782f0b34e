"""Cancels that must arrive: to each node, point to point until acknowledged.

A CANCEL goes to every stage's node of a request, is resent every
CANCEL_RESEND_S until the node answers CANCEL_ACK (or is declared dead), and is
also fanned out on PUB, which may drop it: never relied on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import zmq

from exo.broker import protocol as P
from exo.broker.registry import InFlight
from exo.common.retry import CANCEL_RESEND_S


class Cancels:
    def __init__(
        self, send_raw: Callable[[bytes, bytes], bool], pub: zmq.Socket[bytes], stats: P.Counters
    ) -> None:
        self.send_raw, self.pub, self.stats = send_raw, pub, stats
        # (rid, node identity) -> when to resend the CANCEL if no CANCEL_ACK came
        self.pending: dict[tuple[str, bytes], float] = {}

    def stages(self, r: InFlight) -> None:
        """Every stage's node learns of it; stage 0 frees the later stages' state
        in-band at its next step, the others just acknowledge."""
        for node in r.stages or (r.node,):
            self.on_node(r.rid, node)

    def on_node(self, rid: str, node: bytes) -> None:
        frame = P.encode(P.Cancel(rid=rid))
        self.send_raw(node, frame)
        self.pub.send_multipart([P.TOPIC_CANCEL, frame])
        self.pending[(rid, node)] = time.monotonic() + CANCEL_RESEND_S

    def acknowledged(self, rid: str, node: bytes) -> None:
        self.pending.pop((rid, node), None)

    def resend(self, now: float) -> None:
        for (rid, node), due in list(self.pending.items()):
            if now >= due:
                self.stats["cancel_resent"] += 1
                self.send_raw(node, P.encode(P.Cancel(rid=rid)))
                self.pending[(rid, node)] = now + CANCEL_RESEND_S

    def forget(self, node: bytes) -> None:
        """A node that is gone acknowledges nothing."""
        for key in [k for k in self.pending if k[1] == node]:
            del self.pending[key]
