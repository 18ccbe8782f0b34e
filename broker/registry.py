"""Who the broker knows: nodes and API frontends, and the requests in flight."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from exo.broker import protocol as P
from exo.broker.reports import Download, NodeInfo, NodeStatus, typed


@dataclass
class Peer:
    identity: bytes
    peer_id: str
    role: str  # "node" | "frontend"
    name: str = ""
    # A node's reports as it sent them (checked: reports.py), published as they
    # are; the broker reads them typed: `facts` and `live`.
    info: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    joined: float = field(default_factory=time.time)
    key: str | None = None  # its connection's CURVE key (None: an insecure cluster)
    clock_skew: float | None = None  # its wall clock less the broker's, seconds
    # requests placed on it since its last status: a burst spreads over instances
    # before their heartbeats count them
    placed: int = 0

    def __post_init__(self) -> None:
        self.facts: NodeInfo = typed(self.info, NodeInfo)
        self.live: NodeStatus = typed(self.status, NodeStatus)

    def report_info(self, info: dict[str, Any]) -> None:
        self.info, self.facts = info, typed(info, NodeInfo)

    def report_status(self, status: dict[str, Any]) -> None:
        self.status, self.live, self.placed = status, typed(status, NodeStatus), 0

    @property
    def models(self) -> list[str]:
        return list(self.facts.models)

    @property
    def loaded(self) -> list[str]:
        return list(self.live.loaded)

    def silent(self) -> float:
        """Seconds since it was last heard."""
        return time.monotonic() - self.last_seen

    def load(self) -> int:
        return self.live.running + self.live.prefilling + self.placed

    def public(self) -> dict[str, Any]:
        return {
            "id": self.peer_id,
            "name": self.name,
            "info": self.info,
            "status": self.status,
            "age_s": round(time.monotonic() - self.last_seen, 3),
            "clock_skew_s": self.clock_skew,
        }


@dataclass
class InFlight:
    rid: str
    frontend: bytes
    node: bytes
    model: str
    deadline: float = float("inf")
    started: float = field(default_factory=time.monotonic)
    tokens: int = 0
    relayed: int = 0  # TOKENS frames relayed to the frontend (0: it may be placed again)
    seq: int = 0  # the last TOKENS relayed (protocol.Tokens.seq)
    instance: str = ""
    stages: tuple[bytes, ...] = ()  # every stage's node, the first (`node`) included
    submit: P.Submit | None = None  # what the frontend asked, to place it again
    placements: int = 1  # this one included (common/retry.py, rule 4)


@dataclass
class Parked:
    """A request waiting for an instance of its model (placed, downloading, loading),
    or to be placed again after a loss."""

    rid: str
    frontend: bytes
    submit: P.Submit
    deadline: float
    started: float = field(default_factory=time.monotonic)
    placements: int = 0  # placements it had and lost
    lost: str = ""  # what the last one lost, said if it cannot be placed again
    avoid: str = ""  # the instance it lost: another ready one is preferred


def downloading(nodes: list[Peer], model: str) -> list[tuple[Peer, Download]]:
    """Nodes with a download of `model` in progress, and its progress."""
    out = []
    for n in nodes:
        for d in n.live.downloads:
            # "done" counts until the node's INFO lists the model: the heartbeat that
            # says done can overtake it.
            if d.model == model and (
                d.state in ("listing", "downloading")
                or (d.state == "done" and model not in n.models)
            ):
                out.append((n, d))
    return out


def failed_download(nodes: list[Peer], model: str) -> tuple[Peer, Download] | None:
    for n in nodes:
        for d in n.live.downloads:
            if d.model == model and d.state == "failed":
                return n, d
    return None


MAX_SEEN = 65536


class Registry:
    def __init__(self) -> None:
        self.peers: dict[bytes, Peer] = {}
        self.requests: dict[str, InFlight] = {}
        self.seen_models: set[str] = set()  # (bounded: see saw_models)
        self.parked: dict[str, Parked] = {}

    def saw_models(self, models: list[str]) -> None:
        """Models some node held (a request for one whose nodes left is a 503, not a
        404). Bounded: past MAX_SEEN names it keeps only those held now."""
        self.seen_models.update(models)
        if len(self.seen_models) > MAX_SEEN:
            self.seen_models = {m for n in self.nodes() for m in n.models}

    def nodes(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.role == "node"]

    def by_id(self) -> dict[str, Peer]:
        return {p.peer_id: p for p in self.nodes()}

    def expired(self, now: float, expiry_s: float) -> list[Peer]:
        return [p for p in self.peers.values() if now - p.last_seen > expiry_s]

    def remove(self, identity: bytes) -> tuple[Peer | None, list[InFlight]]:
        """Forget a peer; return it and the requests that die with it."""
        peer = self.peers.pop(identity, None)
        gone = [r for r in self.requests.values() if identity in (r.node, r.frontend)]
        for r in gone:
            del self.requests[r.rid]
        return peer, gone

    def in_flight(self, limit: int = 256) -> list[dict[str, Any]]:
        """The requests running and waiting, newest first (ids and figures, never
        their text): what the dashboard lists with a cancel button."""
        now, names = time.monotonic(), {p.identity: p.name for p in self.peers.values()}
        running: list[dict[str, Any]] = [
            {
                "id": r.rid,
                "model": r.model,
                "state": "running",
                "instance": r.instance,
                "node": names.get(r.node, ""),
                "tokens": r.tokens,
                "age_s": round(now - r.started, 1),
            }
            for r in self.requests.values()
        ]
        waiting: list[dict[str, Any]] = [
            {
                "id": w.rid,
                "model": w.submit.model,
                "state": "placing_again" if w.placements else "waiting",
                "instance": "",
                "node": "",
                "tokens": 0,
                "age_s": round(now - w.started, 1),
            }
            for w in self.parked.values()
        ]
        return sorted(running + waiting, key=lambda r: r["age_s"])[:limit]

    def models(self) -> dict[str, dict[str, Any]]:
        """Every model some node holds on disk, with where it is and whether it is loaded."""
        out: dict[str, dict[str, Any]] = {}
        for n in self.nodes():
            for m in n.models:
                e = out.setdefault(
                    m, {"id": m, "nodes": [], "loaded_on": [], "created": int(n.joined)}
                )
                e["nodes"].append(n.peer_id)
                if m in n.loaded:
                    e["loaded_on"].append(n.peer_id)
        return out
