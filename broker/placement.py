"""Where an instance of a model goes: a pure function over plain data.

A placement is an ordered list of stages, each a node and a layer range
[start, end), together covering every layer once. What a node can give is the
memory available to it under its memory pressure, not the memory it has free
on paper: at `warn` half of what is available counts, and a node under
`critical` pressure gets no new stage at all. Memory already promised to
stages that are still loading is taken off first.

Automatic placement prefers fewer stages (one node if one can hold the model),
then nodes that already have the weights, then more memory to spare; layers are
split in proportion to what each node can give.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

# Share of a node's available memory a placement may count on, by pressure level.
USABLE = {"normal": 1.0, "warn": 0.5, "critical": 0.0}
# Room left for KV caches and activations beyond the weights themselves.
HEADROOM = 1.2
MAX_CANDIDATES = 64


@dataclass(frozen=True, slots=True)
class NodeView:
    peer_id: str
    name: str
    available: int  # bytes available now
    level: str = "normal"  # memory pressure: normal | warn | critical
    has_model: bool = False
    promised: int = 0  # bytes of stages placed here that are not loaded yet
    holds_model: bool = False  # already holds a stage of this model
    # the versions a pipeline's stages must share (mlx, mlx-lm, protocol: info.ANSWER_KEYS)
    answer: tuple[tuple[str, str], ...] = ()

    @property
    def usable(self) -> int:
        return max(0, int(self.available * USABLE.get(self.level, 0.0)) - self.promised)


@dataclass(frozen=True, slots=True)
class ModelMeta:
    model: str
    layers: int
    bytes: int
    kind: str = ""  # its model_type
    split: bool = True  # whether its nodes can run it in pipeline stages

    def stage_bytes(self, start: int, end: int) -> int:
        return int(self.bytes * (end - start) / max(1, self.layers) * HEADROOM)


@dataclass(frozen=True, slots=True)
class StageSpec:
    node: str  # peer id
    start: int
    end: int

    def public(self) -> dict[str, Any]:
        return {"node": self.node, "layers": [self.start, self.end]}


@dataclass
class Candidate:
    stages: list[StageSpec]
    nodes: list[dict[str, Any]] = field(default_factory=list)  # per-node memory figures
    reason: str | None = None  # why it is impossible; None when it works

    @property
    def ok(self) -> bool:
        return self.reason is None

    def public(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "reason": self.reason,
            "stages": [s.public() for s in self.stages],
            "nodes": self.nodes,
        }


@dataclass(frozen=True, slots=True)
class Ask:
    """What the caller asked for; every field optional."""

    nodes: tuple[str, ...] = ()  # an explicit ordered list (ids or names)
    stages: tuple[tuple[str, int, int], ...] = ()  # explicit (node, start, end)
    min_nodes: int = 1
    max_nodes: int | None = None


class PlacementError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def split_layers(layers: int, weights: list[int]) -> list[tuple[int, int]]:
    """Contiguous ranges, one per weight, sized in proportion (each at least one layer)."""
    n = len(weights)
    total = sum(weights) or n
    raw = [layers * (w or total / n) / total for w in weights]
    sizes = [max(1, int(r)) for r in raw]
    # Largest remainders get the layers rounding left over; never below one each.
    while sum(sizes) < layers:
        i = max(range(n), key=lambda i: raw[i] - sizes[i])
        sizes[i] += 1
    while sum(sizes) > layers:
        i = max((i for i in range(n) if sizes[i] > 1), key=lambda i: sizes[i] - raw[i])
        sizes[i] -= 1
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out


def check(meta: ModelMeta, views: list[NodeView], ranges: list[tuple[int, int]]) -> Candidate:
    stages = [StageSpec(v.peer_id, a, b) for v, (a, b) in zip(views, ranges, strict=True)]
    figures, reasons = [], []
    for v, (a, b) in zip(views, ranges, strict=True):
        need = meta.stage_bytes(a, b)
        figures.append(
            {
                "node": v.peer_id,
                "name": v.name,
                "layers": [a, b],
                "needs": need,
                "usable": v.usable,
                "available": v.available,
                "pressure": v.level,
            }
        )
        if v.level == "critical":
            reasons.append(f"node {v.peer_id} is under critical memory pressure")
        elif need > v.usable:
            reasons.append(
                f"node {v.peer_id} needs {need >> 20} MiB for layers [{a}, {b}) "
                f"but can give {v.usable >> 20} MiB ({v.level} pressure)"
            )
        if v.holds_model:
            reasons.append(f"node {v.peer_id} already holds a stage of {meta.model}")
    if len({v.peer_id for v in views}) != len(views):
        reasons.append("a node appears twice")
    if len({v.answer for v in views}) > 1:
        differ = ", ".join(f"{v.peer_id}: {dict(v.answer)}" for v in views)
        reasons.append(f"the nodes' versions differ ({differ}): a pipeline could disagree")
    return Candidate(stages, figures, "; ".join(reasons) or None)


def resolve(nodes: list[NodeView], wanted: str) -> NodeView:
    for n in nodes:
        if wanted in (n.peer_id, n.name):
            return n
    raise PlacementError(404, "node_not_found", f"no node '{wanted}' is connected")


def explicit_stages(meta: ModelMeta, nodes: list[NodeView], ask: Ask) -> Candidate:
    views = [resolve(nodes, node) for node, _, _ in ask.stages]
    ranges = [(a, b) for _, a, b in ask.stages]
    at = 0
    for a, b in ranges:
        if a != at or b <= a:
            raise PlacementError(
                400,
                "invalid_stages",
                f"stages must cover layers [0, {meta.layers}) in order without gaps or "
                f"overlaps; [{a}, {b}) does not follow {at}",
            )
        at = b
    if at != meta.layers:
        raise PlacementError(
            400,
            "invalid_stages",
            f"stages cover layers [0, {at}) but {meta.model} has {meta.layers}",
        )
    return check(meta, views, ranges)


def candidates(meta: ModelMeta, nodes: list[NodeView], ask: Ask) -> list[Candidate]:
    """Every placement worth considering, best first; impossible ones say why."""
    if not meta.split and (len(ask.stages) > 1 or len(ask.nodes) > 1 or ask.min_nodes > 1):
        raise PlacementError(
            400,
            "model_not_splittable",
            f"{meta.model} ({meta.kind or 'unknown architecture'}) cannot be split into "
            "pipeline stages: its architecture's stages are not verified against mlx-lm; "
            "place it on one node",
        )
    if ask.stages:
        return [explicit_stages(meta, nodes, ask)]
    if ask.nodes:
        views = [resolve(nodes, n) for n in ask.nodes]
        if len(views) > meta.layers:
            raise PlacementError(
                400, "invalid_placement", f"{len(views)} nodes for {meta.layers} layers"
            )
        return [check(meta, views, split_layers(meta.layers, [v.usable for v in views]))]
    if not nodes:
        raise PlacementError(503, "no_nodes", "no node is connected to the broker")
    hi = min(ask.max_nodes or len(nodes), len(nodes), meta.layers if meta.split else 1)
    if ask.min_nodes > hi:
        raise PlacementError(
            400,
            "invalid_placement",
            f"min_nodes {ask.min_nodes} but only {hi} nodes can hold a stage",
        )
    # Nodes with the weights first, then the roomiest: the first sets tried are the best.
    ranked = sorted(nodes, key=lambda n: (not n.has_model, -n.usable, n.peer_id))
    out: list[Candidate] = []
    for k in range(max(1, ask.min_nodes), hi + 1):
        for combo in combinations(ranked, k):
            views = list(combo)
            out.append(check(meta, views, split_layers(meta.layers, [v.usable for v in views])))
            if len(out) >= MAX_CANDIDATES:
                break
    # Stable: fewer stages first, and within a size the preference order above.
    return sorted(out, key=lambda c: not c.ok)


def place(meta: ModelMeta, nodes: list[NodeView], ask: Ask) -> Candidate:
    """The placement to use, or PlacementError saying why there is none."""
    found = candidates(meta, nodes, ask)
    best = next((c for c in found if c.ok), None)
    if best is None:
        why = (
            found[0].reason
            if len(found) == 1
            else "; ".join(sorted({c.reason or "" for c in found})[:4])
        )
        raise PlacementError(409, "placement_impossible", f"cannot place {meta.model}: {why}")
    return best
