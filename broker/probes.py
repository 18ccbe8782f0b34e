"""Which link to probe next: a pure function over plain data (`due`), and the
broker's prober that acts on it (`Prober`).

One probe at a time in the whole cluster (probes measure a link by filling it,
so two at once would measure each other), at most one every GAP_S. A link is
probed when it has never been, when it changed (came up, changed type or
address), or when its last figure is older than EVERY_S; a link carrying more
than BUSY_BPS of other traffic is skipped (serving comes first) and tried later.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from exo.broker import protocol as P

if TYPE_CHECKING:
    from exo.broker.hops import Topology
    from exo.broker.registry import Peer

EVERY_S = 300.0
GAP_S = 2.0
BUSY_BPS = 1_000_000.0
TIMEOUT_S = 15.0


def key(link: dict[str, Any]) -> str:
    a, b = link["a"], link["b"]
    return f"{a['node']}/{a['address']}>{b['node']}/{b['address']}"


def signature(link: dict[str, Any]) -> tuple[Any, ...]:
    return (link["up"], link["type"], link["a"]["interface"], link["b"]["interface"])


@dataclass
class Probed:
    at: float  # when it was last probed (sent), monotonic
    signature: tuple[Any, ...]


def due(
    links: list[dict[str, Any]],
    last: dict[str, Probed],
    now: float,
    in_flight: bool,
    every: float = EVERY_S,
) -> dict[str, Any] | None:
    """The link to probe now, or None."""
    if in_flight or any(now - p.at < GAP_S for p in last.values()):
        return None
    best: tuple[float, dict[str, Any]] | None = None
    for link in links:
        if not link["up"] or link["type"] == "loopback":
            continue
        if max(link.get("a_to_b_Bps") or 0.0, link.get("b_to_a_Bps") or 0.0) > BUSY_BPS:
            continue
        seen = last.get(key(link))
        if seen is not None and seen.signature == signature(link) and now - seen.at < every:
            continue
        age = float("inf") if seen is None else now - seen.at
        if best is None or age > best[0]:
            best = (age, link)
    return None if best is None else best[1]


def attach(links: list[dict[str, Any]], nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each link with its last probe's figures, from the probing (A) end's status."""
    by_id = {n["id"]: n for n in nodes}
    for link in links:
        node = by_id.get(link["a"]["node"], {})
        result = node.get("status", {}).get("probes", {}).get(key(link))
        if not result:
            continue
        link["probed_at"] = result.get("at")
        if result.get("error"):
            link["probe_error"] = result["error"]
            continue
        link["rtt_s"] = result.get("rtt_s")
        link["bandwidth_Bps"] = result.get("bandwidth_Bps")
        link["probe_s"] = result.get("duration_s")
    return links


class Prober:
    """The broker's link probes: one at a time, each link again when it changed or
    its last figure is old; the result comes back in the probing node's status."""

    def __init__(
        self, send: Callable[[bytes, P.Msg], bool], stats: Counter[str], every: float
    ) -> None:
        self.send, self.stats, self.every = send, stats, every
        self.probed: dict[str, Probed] = {}
        # (link key, probing node id, sent at monotonic, sent at wall clock)
        self.probing: tuple[str, str, float, float] | None = None

    def tend(self, now: float, view: Topology, nodes: dict[str, Peer]) -> None:
        """Start the next link probe when one is due (`due` decides). `view`: the
        broker's topology; `nodes`: its nodes by id."""
        if self.probing is not None:
            k, node_id, sent, wall = self.probing
            node = nodes.get(node_id)
            got = node.live.probes.get(k) if node else None
            if node is None or (got and got.at >= wall - 1) or now - sent > TIMEOUT_S:
                self.probing = None
        link = due(view[1], self.probed, now, self.probing is not None, self.every)
        if link is None:
            return
        a, b = nodes.get(link["a"]["node"]), nodes.get(link["b"]["node"])
        if a is None or b is None or not b.facts.probe_port:
            return
        k = key(link)
        self.send(
            a.identity,
            P.Probe(
                key=k,
                src=link["a"]["address"],
                dst=link["b"]["address"],
                port=b.facts.probe_port,
            ),
        )
        self.probing = (k, a.peer_id, now, time.time())
        self.probed[k] = Probed(now, signature(link))
        self.stats["probes_sent"] += 1
