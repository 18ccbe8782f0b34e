"""Model instances: what each is, and what it needs next (a pure function).

An instance is a model placed on an ordered list of nodes, each holding a layer
range. Its life: `downloading` while any stage's node lacks the weights (the
broker asks those nodes to fetch them), `loading` once every node has them and
has been told to load its stage, `ready` when every stage reports loaded. It is
`failed` when a stage's node leaves, a download fails, or a load fails.
Nothing loads until every node has its weights, and nothing waits on a timer:
the broker re-reads this each tick from what the nodes report. Stages nodes
report that the broker does not know (it restarted) are adopted as their
instance, already ready (`adoptable`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from exo.broker.hops import Hops
from exo.broker.placement import StageSpec
from exo.broker.registry import Peer
from exo.broker.reports import StageState


@dataclass
class Instance:
    id: str
    model: str
    stages: list[StageSpec]
    total: int  # the model's layers
    auto: bool = False  # placed on demand for a request, not by an operator
    state: str = "downloading"
    error: str | None = None
    loads_sent: bool = False
    downloads_asked: set[str] = field(default_factory=set)
    created: float = field(default_factory=time.time)
    history: list[str] = field(default_factory=list)  # states in the order they were entered
    # per stage: where it sends and whom it hears (protocol LOAD and ROUTE)
    routes: list[Hops] = field(default_factory=list)

    @property
    def nodes(self) -> list[str]:
        return [s.node for s in self.stages]

    @property
    def first_node(self) -> str:
        return self.stages[0].node

    def enter(self, state: str, error: str | None = None) -> bool:
        """Move to `state`; True if that is a change."""
        if state == self.state and self.history:
            return False
        self.state, self.error = state, error
        self.history.append(state)
        return True

    def public(self, nodes: dict[str, Peer] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "model": self.model,
            "state": self.state,
            "error": self.error,
            "stages": [s.public() for s in self.stages],
            "placed": "auto" if self.auto else "explicit",
            "created": int(self.created),
            "history": list(self.history),
            "routes": list(self.routes),
        }
        if nodes is not None and self.state == "downloading":
            out["downloads"] = downloads(self, nodes)
        return out


@dataclass
class Next:
    state: str
    error: str | None = None
    download: list[str] = field(default_factory=list)  # nodes to send DOWNLOAD
    load: bool = False  # send LOAD to every stage now
    lost: bool = False  # failed because a node holding a stage is gone


def downloads(inst: Instance, nodes: dict[str, Peer]) -> list[dict[str, Any]]:
    out = []
    for node_id in inst.nodes:
        node = nodes.get(node_id)
        for d in node.live.downloads if node else []:
            if d.model == inst.model and d.state != "done":
                out.append({**msgspec.structs.asdict(d), "node": node_id})
    return out


def advance(inst: Instance, nodes: dict[str, Peer]) -> Next:
    """What `inst` needs now, from the nodes' INFO (models on disk) and
    heartbeat status (downloads, stages)."""
    if inst.state == "failed":
        return Next("failed", inst.error)
    for node_id in inst.nodes:
        if node_id not in nodes:
            return Next(
                "failed", f"node {node_id} holding a stage of {inst.model} is gone", lost=True
            )
    if not inst.loads_sent:
        lacking = [n for n in inst.nodes if inst.model not in nodes[n].models]
        if not lacking:
            return Next("loading", load=True)
        ask = []
        for n in lacking:
            mine = [d for d in nodes[n].live.downloads if d.model == inst.model]
            if any(d.state == "failed" for d in mine) and n in inst.downloads_asked:
                err = next(d.error for d in mine if d.state == "failed")
                return Next("failed", f"node {n} could not download {inst.model}: {err}")
            if n not in inst.downloads_asked and not any(
                d.state in ("listing", "downloading") for d in mine
            ):
                ask.append(n)
        return Next("downloading", download=ask)
    states = [nodes[n].live.stages.get(inst.id) for n in inst.nodes]
    for n, st in zip(inst.nodes, states, strict=True):
        if st is not None and st.state == "failed":
            return Next("failed", f"node {n} could not load its stage: {st.error}")
    if all(st is not None and st.state == "ready" for st in states):
        return Next("ready")
    return Next("loading")


def adoptable(iid: str, held: list[tuple[str, StageState]]) -> Instance | None:
    """The instance `iid` rebuilt from the stages nodes report holding (peer id,
    stage status), when they are all ready, of one model, and cover its layers
    from the first to the last without a gap; else None. A restarted broker (or
    one a node came back to) adopts it as it is: nothing reloads."""
    stages, models, total = [], set(), set()
    routes: dict[str, Hops] = {}
    for node, st in held:
        if st.state != "ready" or len(st.layers) != 2 or not st.total:
            return None
        stages.append(StageSpec(node, st.layers[0], st.layers[1]))
        models.add(st.model)
        total.add(st.total)
        routes[node] = Hops()
        if st.next:
            routes[node]["next"] = st.next
        if st.stage0:
            routes[node]["stage0"] = st.stage0
    if len(models) != 1 or len(total) != 1 or "" in models:
        return None
    stages.sort(key=lambda s: s.start)
    edges = [0, *(s.end for s in stages)]
    if any(s.start != edges[k] or s.end <= s.start for k, s in enumerate(stages)):
        return None
    if edges[-1] != next(iter(total)):
        return None
    inst = Instance(iid, models.pop(), stages, total.pop(), auto=True, loads_sent=True)
    inst.routes = [routes[s.node] for s in stages]
    inst.enter("ready")
    return inst
