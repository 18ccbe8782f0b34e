"""The broker's model instances: placing them, walking each through its life
(downloading -> loading -> ready | failed) from what the nodes report, and
telling the stages where to send their traffic. The decisions are pure
functions (placement.py, instances.py, topology.py); this is where they act.

A restart loses nothing that took long to build: the stages nodes still hold
are adopted as their instances (no reload), the instances an operator placed
come back from the journal (journal.py), and stages no instance owns once the
nodes had BROKER_WARMUP_S to report are unloaded.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from exo.broker import protocol as P
from exo.broker.hops import Topology, hops, weights_source
from exo.broker.instances import Instance, adoptable, advance
from exo.broker.journal import Journal
from exo.broker.placement import (
    Ask,
    ModelMeta,
    NodeView,
    PlacementError,
    StageSpec,
    candidates,
    place,
)
from exo.broker.registry import InFlight, Peer, Registry
from exo.broker.reports import StageState
from exo.broker.routing import Refusal, no_holder
from exo.broker.versions import answer_versions
from exo.common.retry import BROKER_WARMUP_S, LOSSES

log = logging.getLogger(__name__)


Name = Annotated[str, Meta(max_length=256)]
Layer = Annotated[int, Meta(ge=0, le=100_000)]


class StageIn(msgspec.Struct, forbid_unknown_fields=True):
    node: Name
    layers: tuple[Layer, Layer]


class PlaceSpec(msgspec.Struct, forbid_unknown_fields=True):
    """INSTANCES' spec for place and preview (the API's PlaceRequest, checked again)."""

    model: Name = ""
    nodes: Annotated[list[Name], Meta(max_length=1024)] | None = None
    stages: Annotated[list[StageIn], Meta(max_length=1024)] | None = None
    min_nodes: Annotated[int, Meta(ge=1, le=1024)] | None = None
    max_nodes: Annotated[int, Meta(ge=1, le=1024)] | None = None


class Deployer:
    """Instances: placing, loading, rerouting and ending them. Built from the
    registry it reads, a function that sends a node or frontend a message, and
    one that gives the cluster's topology."""

    def __init__(
        self,
        reg: Registry,
        send: Callable[[bytes, P.Msg], bool],
        topology: Callable[[], Topology],
        journal: Journal | None = None,
    ) -> None:
        self.reg, self.send, self.topology = reg, send, topology
        self.instances: dict[str, Instance] = {}
        self.journal = journal or Journal(None)
        self.started = time.monotonic()
        # explicit instances from the journal, until their nodes report them or the
        # warm-up ends
        self.restored: dict[str, Instance] = {i.id: i for i in self.journal.load()}
        self.unloads: dict[tuple[str, str], float] = {}  # (instance, node) -> UNLOAD sent
        # instances this broker ended: their stages, still reported for a heartbeat or
        # two (or by a node back from a silence), are unloaded, never adopted
        self.ended: set[str] = set()
        # called when an instance becomes ready: requests waiting for it go
        self.on_ready: Callable[[], None] = lambda: None
        # called for each request in flight on an instance that ends: placed again
        # or failed (Requests.lost)
        self.lost: Callable[[InFlight, int, str, str], None] = lambda r, status, code, why: (
            self.fail(r.frontend, r.rid, status, code, why)
        )

    def fail(self, identity: bytes, rid: str, status: int, code: str, message: str) -> None:
        self.send(identity, P.Fail(rid=rid, status=status, code=code, message=message))

    def meta(self, model: str) -> ModelMeta | None:
        for n in self.reg.nodes():
            m = n.facts.model_meta.get(model)
            if model in n.models and m and m.layers:
                return ModelMeta(model, m.layers, m.bytes, m.type, m.split)
        return None

    def views(self, meta: ModelMeta) -> list[NodeView]:
        """What each node can give a new stage of `meta.model`."""
        out = []
        live = [i for i in self.instances.values() if i.state != "failed"]
        for n in self.reg.nodes():
            # Stages placed here but not loaded yet are not in its available memory.
            promised = sum(
                (self.meta(i.model) or ModelMeta(i.model, i.total, 0)).stage_bytes(s.start, s.end)
                for i in live
                if i.state != "ready"
                for s in i.stages
                if s.node == n.peer_id
            )
            out.append(
                NodeView(
                    n.peer_id,
                    n.name,
                    available=n.facts.memory_available,
                    level=n.facts.memory_pressure.level,
                    has_model=meta.model in n.models,
                    promised=promised,
                    holds_model=any(i.model == meta.model and n.peer_id in i.nodes for i in live),
                    answer=answer_versions(n.facts.versions),
                )
            )
        return out

    def provide(self, model: str) -> Refusal | None:
        """Make sure an instance of `model` is on its way: None if one is (or was just
        placed automatically), else why none can be."""
        if any(
            i.model == model and i.state in ("downloading", "loading")
            for i in self.instances.values()
        ):
            return None
        if self.warming():
            # Its nodes may not have registered yet, or may hold one to adopt: no
            # refusal and no placement until the warm-up is over.
            return None
        nodes = self.reg.nodes()
        if not any(model in n.models for n in nodes):
            return no_holder(nodes, model, self.reg.seen_models)
        meta = self.meta(model)
        if meta is None:
            return Refusal(503, "model_unreadable", f"no node could read the config of {model}")
        try:
            chosen = place(meta, self.views(meta), Ask())
        except PlacementError as e:
            return Refusal(e.status, e.code, e.message)
        self.create(meta, chosen.stages, auto=True)
        return None

    def create(self, meta: ModelMeta, stages: list[StageSpec], auto: bool) -> Instance:
        inst = Instance(f"inst-{uuid.uuid4().hex[:8]}", meta.model, stages, meta.layers, auto)
        inst.enter("downloading")
        self.instances[inst.id] = inst
        log.info(
            "instance %s of %s placed (%s): %s",
            inst.id,
            meta.model,
            "auto" if auto else "explicit",
            ", ".join(f"{s.node}[{s.start}:{s.end})" for s in stages),
        )
        self.tend()
        return inst

    def warming(self) -> bool:
        """Just started: nodes may not have registered, or reported their stages, yet."""
        return time.monotonic() - self.started < BROKER_WARMUP_S

    def adopt(self, nodes: dict[str, Peer]) -> None:
        """Stages the nodes report that no live instance here owns: adopted as their
        instance when complete and ready; unloaded once the warm-up is over (unless
        still loading)."""
        held: dict[str, list[tuple[str, StageState]]] = {}
        for n in nodes.values():
            for iid, st in n.live.stages.items():
                known = self.instances.get(iid)
                if known is None or known.state == "failed":
                    held.setdefault(iid, []).append((n.peer_id, st))
        now = time.monotonic()
        for iid, stages in held.items():
            seen = iid in self.instances or iid in self.ended
            inst = adoptable(iid, stages) if not seen else None
            if inst is not None:
                was = self.restored.pop(iid, None)
                if was is not None:
                    inst.auto, inst.created = False, was.created
                self.instances[iid] = inst
                log.info(
                    "instance %s of %s adopted from its nodes' stages: %s",
                    iid,
                    inst.model,
                    ", ".join(f"{s.node}[{s.start}:{s.end})" for s in inst.stages),
                )
                self.on_ready()
                continue
            if self.warming() or any(st.state == "loading" for _, st in stages):
                continue
            for node, _ in stages:
                if now - self.unloads.get((iid, node), 0.0) > 2.0:
                    self.unloads[(iid, node)] = now
                    log.info("node %s holds a stage of unknown instance %s: unloaded", node, iid)
                    self.send(nodes[node].identity, P.Unload(instance=iid))
        if len(self.unloads) > 4096:
            self.unloads.clear()
        if len(self.ended) > 65536:
            self.ended.clear()

    def restore(self, nodes: dict[str, Peer]) -> None:
        """After the warm-up, journalled instances not adopted: placed again as they
        were when their nodes are here (loaded where they are not), else forgotten."""
        if self.warming() or not self.restored:
            return
        for iid, inst in self.restored.items():
            missing = [n for n in inst.nodes if n not in nodes]
            if missing:
                log.warning("instance %s not restored: node %s did not come back", iid, missing[0])
                continue
            inst.enter("downloading")
            self.instances[iid] = inst
            log.info("instance %s of %s restored from the journal", iid, inst.model)
        self.restored.clear()

    def tend(self, view: Topology | None = None) -> None:
        nodes = self.reg.by_id()
        view = view or self.topology()
        self.adopt(nodes)
        self.restore(nodes)
        for inst in list(self.instances.values()):
            nxt = advance(inst, nodes)
            for n in nxt.download:
                self.send(
                    nodes[n].identity,
                    P.Download(
                        model=inst.model,
                        revision="main",
                        source=weights_source(inst.model, nodes[n], self.reg.nodes(), view),
                    ),
                )
                inst.downloads_asked.add(n)
                log.info("instance %s: node %s downloads %s", inst.id, n, inst.model)
            if nxt.load:
                self.load(inst, nodes, view)
            else:
                self.reroute(inst, nodes, view)
            if not inst.enter(nxt.state, nxt.error):
                continue
            log.info(
                "instance %s: %s%s", inst.id, nxt.state, f" ({nxt.error})" if nxt.error else ""
            )
            if nxt.state == "ready":
                self.on_ready()
            elif nxt.state == "failed":
                code = "node_lost" if nxt.lost else "instance_failed"
                self.end(inst, 503, code, nxt.error or "instance failed")
        self.journal.save(self.instances.values())

    def load(self, inst: Instance, nodes: dict[str, Peer], view: Topology) -> None:
        """Tell every stage to load, with the peer endpoints it sends to."""
        inst.routes = hops(inst.nodes, nodes, view)
        later = [(s.end - s.start, nodes[s.node].live.kv_budget) for s in inst.stages[1:]]
        for k, (spec, route) in enumerate(zip(inst.stages, inst.routes, strict=True)):
            self.send(
                nodes[spec.node].identity,
                P.Load(
                    instance=inst.id,
                    model=inst.model,
                    start=spec.start,
                    end=spec.end,
                    total=inst.total,
                    stage=k,
                    kv_budgets=later if k == 0 and later else None,
                    **route,
                ),
            )
        inst.loads_sent = True

    def reroute(self, inst: Instance, nodes: dict[str, Peer], view: Topology) -> None:
        """When a better link comes up (or the one in use goes down), the stages send
        their next steps over the new one: nothing in flight is failed for it."""
        if not inst.loads_sent or inst.state == "failed" or len(inst.stages) < 2:
            return
        if any(n not in nodes for n in inst.nodes):
            return
        new = hops(inst.nodes, nodes, view)
        for k, (spec, old, route) in enumerate(zip(inst.stages, inst.routes, new, strict=True)):
            if route != old:
                log.info("instance %s: stage on %s now sends to %s", inst.id, spec.node, route)
                # Unsent (the node away, its link down): tried again at the next tend.
                if self.send(nodes[spec.node].identity, P.Route(instance=inst.id, **route)):
                    inst.routes[k] = route

    def resend_routes(self, node: str) -> None:
        """A node back after a silence: the routes of its stages, which it may have
        missed while away."""
        peer = self.reg.by_id().get(node)
        for inst in self.instances.values():
            if peer is None or not inst.loads_sent or inst.state == "failed":
                continue
            for spec, route in zip(inst.stages, inst.routes, strict=False):
                if spec.node == node and route:
                    self.send(peer.identity, P.Route(instance=inst.id, **route))

    def end(self, inst: Instance, status: int, code: str, message: str) -> None:
        """Its requests end with a clear error, its nodes drop it; an instance placed
        on demand is forgotten (the next request places a new one)."""
        self.ended.add(inst.id)
        for r in [r for r in self.reg.requests.values() if r.instance == inst.id]:
            del self.reg.requests[r.rid]
            self.lost(r, status, code, f"instance {inst.id}: {message}")
        if inst.state == "failed" and code not in LOSSES:
            # Requests waiting for it learn why now, rather than wait for their deadline
            # (after a loss they wait for another placement, or learn there is none).
            for rid, waiting in list(self.reg.parked.items()):
                if waiting.submit.model == inst.model:
                    del self.reg.parked[rid]
                    self.fail(waiting.frontend, rid, status, code, f"instance {inst.id}: {message}")
        nodes = self.reg.by_id()
        for n in inst.nodes:
            if n in nodes:
                self.send(nodes[n].identity, P.Unload(instance=inst.id))
        if inst.auto or inst.state != "failed":
            self.instances.pop(inst.id, None)

    def op(
        self, op: str, spec: dict[str, Any], iid: str | None
    ) -> dict[str, Any] | list[dict[str, Any]] | PlacementError:
        nodes = self.reg.by_id()
        if op == "list":
            return [i.public(nodes) for i in self.instances.values()]
        if op == "delete":
            inst = self.instances.get(str(iid))
            if inst is None:
                return PlacementError(404, "instance_not_found", f"no instance '{iid}'")
            self.end(inst, 503, "instance_deleted", "deleted")
            self.instances.pop(inst.id, None)
            self.journal.save(self.instances.values())
            return {"id": inst.id, "deleted": True}
        if op not in ("place", "preview"):
            return PlacementError(400, "invalid_op", f"unknown instances op {op!r}")
        try:
            want = msgspec.convert(spec, PlaceSpec, strict=True)
        except msgspec.ValidationError as e:
            return PlacementError(400, "invalid_placement", f"malformed placement: {e}")
        model = want.model
        meta = self.meta(model)
        if meta is None:
            return PlacementError(
                404, "model_not_found", f"no connected node holds the model '{model}'"
            )
        try:
            ask = Ask(
                nodes=tuple(want.nodes or ()),
                stages=tuple((s.node, s.layers[0], s.layers[1]) for s in want.stages or ()),
                min_nodes=want.min_nodes or 1,
                max_nodes=want.max_nodes,
            )
            if op == "preview":
                found = candidates(meta, self.views(meta), ask)
                return {
                    "model": model,
                    "layers": meta.layers,
                    "bytes": meta.bytes,
                    "candidates": [c.public() for c in found],
                }
            chosen = place(meta, self.views(meta), ask)
        except PlacementError as e:
            return e
        except ValueError as e:
            return PlacementError(400, "invalid_placement", f"malformed placement: {e}")
        return self.create(meta, chosen.stages, auto=False).public(nodes)
