"""The pipeline stages this node hosts: one object per stage, keyed by instance id.

A hosted stage is a layer range of one instance of a model. Stage 0 runs in the
engine (it schedules, embeds and sends each step on: stage0.py); a later stage
follows stage 0 step by step (`StageRunner`, stage.py). Either way its next hop
is the next stage's peer endpoint, and a later stage's way back is stage 0's:
the last stage sends tokens there, any stage its STAGE_ERROR. The broker tells
each stage where those are (LOAD) and where they move to when a better link
comes up (ROUTE).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from exo.broker import protocol as P
from exo.nodes.engine.engine import Engine
from exo.nodes.engine.mlxenv import mx
from exo.nodes.engine.model import LoadedModel, Part, load_model
from exo.nodes.engine.request import EngineError, Output
from exo.nodes.pipeline.peers import PeerSockets
from exo.nodes.pipeline.stage import StageRunner, malformed
from exo.nodes.store.store import ModelStore

log = logging.getLogger(__name__)


@dataclass
class HostedStage:
    instance: str
    model: str
    part: Part
    state: str = "loading"  # loading | ready | failed
    error: str | None = None
    lm: LoadedModel | None = None  # once loaded
    runner: StageRunner | None = None  # a later stage (stage 0 runs in the engine)
    next: str | None = None  # the next stage's peer endpoint (all but the last)
    stage0: str | None = None  # stage 0's peer endpoint (every later stage)
    # A later stage's answer to its last step (ACT on, or RESULT back), kept: the
    # same step again (stage 0 resent it: a link died under it) gets it again.
    last_out: tuple[P.Msg, mx.array | None] | None = None
    resent: int = 0  # steps sent again (stage 0) or answered again (later stages)
    loaded_at: float | None = None  # time.time() when it became ready
    # the peer keys of the nodes whose messages this stage takes (protocol LOAD)
    senders: set[str] = field(default_factory=set)

    def public(self) -> dict[str, Any]:
        """What the broker reads to tell an instance loading from ready, and where
        its traffic goes."""
        d: dict[str, Any] = {
            "state": self.state,
            "model": self.model,
            "layers": self.part.public(),
            "total": self.part.total,
        }
        if self.error:
            d["error"] = self.error
        d.update(next=self.next, stage0=self.stage0, resent=self.resent, loaded_at=self.loaded_at)
        return d


class Hosting:
    def __init__(
        self,
        name: str,
        engine: Engine,
        peers: PeerSockets,
        store: ModelStore,
        send: Callable[[P.Msg], None],
        emit: Callable[[list[Output]], None],
        stage_timeout: float,
        changed: Callable[[], None],
    ) -> None:
        self.name, self.engine, self.peers, self.store = name, engine, peers, store
        self.send, self.emit, self.changed = send, emit, changed
        self.stage_timeout = stage_timeout
        self.stages: dict[str, HostedStage] = {}
        self.loading: str | None = None  # the model being loaded now
        engine.stage0.hop = self.hop

    def runners(self) -> Iterator[StageRunner]:
        return (s.runner for s in self.stages.values() if s.runner is not None)

    def public(self) -> dict[str, dict[str, Any]]:
        return {iid: s.public() for iid, s in self.stages.items()}

    # -- loading and unloading --------------------------------------------------------

    def load(self, msg: P.Load) -> None:
        part = Part(msg.start, msg.end, msg.total)
        held = self.stages.get(msg.instance)
        if (
            held is not None
            and held.state == "ready"
            and (held.model, held.part) == (msg.model, part)
        ):
            # Already here (a restarted broker restoring its instances): kept, re-routed.
            held.next, held.stage0 = msg.next or held.next, msg.stage0 or held.stage0
            self.let_in(held, msg.senders)
            self.changed()
            return
        stage = HostedStage(msg.instance, msg.model, part, next=msg.next, stage0=msg.stage0)
        self.stages[msg.instance] = stage
        self.let_in(stage, msg.senders)
        self.changed()  # the broker sees "loading" while we load
        path = self.store.scan().get(msg.model)
        if path is None:
            stage.state, stage.error = "failed", f"{msg.model} is not on node {self.name}"
            return
        self.loading = msg.model
        try:
            lm = load_model(msg.model, path, part)
        except Exception as e:
            log.exception("loading %s %s failed", msg.model, part)
            stage.state, stage.error = "failed", f"loading {msg.model} failed: {e}"
            return
        finally:
            self.loading = None
        lm.instance, stage.lm = msg.instance, lm
        if part.first:
            # Later stages hold KV for every request this stage admits: keep each
            # within its node's budget, in this stage's units (bytes scale with layers).
            caps = [
                int(budget * part.end / max(1, layers))
                for layers, budget in msg.kv_budgets or []
                if budget
            ]
            lm.kv_cap = min(caps) if caps else None
            self.engine.add_model(lm)
        else:
            stage.runner = StageRunner(lm)
        stage.state, stage.loaded_at = "ready", time.time()
        self.changed()
        log.info("instance %s: stage %s of %s ready", msg.instance, part.public(), msg.model)

    def let_in(self, stage: HostedStage, senders: list[str] | None) -> None:
        """The nodes `stage` takes messages from (None: unchanged)."""
        if senders is not None:
            stage.senders = set(senders)
        self.allow_senders()

    def allow_senders(self) -> None:
        """The peer ROUTER lets in the senders of the stages held now."""
        self.peers.allow({k for s in self.stages.values() for k in s.senders})

    def from_its_senders(self, stage: HostedStage, sender: str | None, what: str) -> bool:
        """Whether a peer message for `stage` came from a node of its instance
        (always so in an insecure cluster); if not it is dropped and counted: a
        member of the cluster that is not this instance's stage cannot end or
        feed its requests."""
        if self.peers.key is None or sender in stage.senders:
            return True
        self.peers.dropped["not_its_stage"] += 1
        log.warning("instance %s: a %s from a node not of its stages dropped", stage.instance, what)
        return False

    def unload(self, iid: str) -> None:
        stage = self.stages.pop(iid, None)
        self.allow_senders()
        lm = self.engine.models.get(stage.model) if stage is not None else None
        if lm is not None and lm.instance == iid:
            gone = self.engine.remove_model(lm.model_id)
            log.info("instance %s unloaded; %d requests ended with it", iid, len(gone))
        self.changed()
        mx.clear_cache()

    def unload_all(self) -> None:
        for iid in list(self.stages):
            self.unload(iid)

    def fail_model(self, model_id: str, why: str) -> None:
        """Its stages report failed with `why` (the broker fails their instances)."""
        for iid, stage in list(self.stages.items()):
            if stage.model == model_id:
                self.unload(iid)
                stage.state, stage.error = "failed", why
                self.stages[iid] = stage

    def route(self, msg: P.Route) -> None:
        # Steps go out one at a time (stage 0 waits for each step's tokens), so
        # switching between two of them reorders nothing.
        stage = self.stages.get(msg.instance)
        if stage is None:
            return
        moved = bool(msg.next and stage.next and msg.next != stage.next)
        if msg.next and stage.next:
            stage.next = msg.next
        if msg.stage0 and stage.stage0:
            stage.stage0 = msg.stage0
        self.let_in(stage, msg.senders)
        lm = stage.lm
        first = lm is not None and lm.part is not None and lm.part.first
        # The step out may have gone down with the old link: again, on the new.
        if moved and first and lm is not None and self.engine.stage0.resend(lm.model_id, lm):
            stage.resent += 1
            log.info("instance %s: step out sent again over %s", msg.instance, stage.next)

    # -- steps between stages -----------------------------------------------------------

    def hop(self, lm: LoadedModel, act: P.Act, h: mx.array) -> None:
        stage = self.stages.get(lm.instance)
        if stage is None or stage.next is None:
            raise EngineError(503, "stage_lost", f"instance {lm.instance} has no next stage here")
        self.peers.send(stage.next, act, h)

    def on_peer(self) -> None:
        got = self.peers.recv()
        if got is None:
            return
        msg, h, sender = got
        if isinstance(msg, P.Act):
            self.on_act(msg, h, sender)
            return
        if not isinstance(msg, P.Result | P.StageError):
            self.peers.dropped["wrong_type"] += 1
            return
        stage = self.stages.get(msg.instance)
        if stage is None or self.engine.models.get(stage.model) is None:
            return
        if not self.from_its_senders(stage, sender, msg.type):
            return
        if isinstance(msg, P.Result):
            try:
                outs = self.engine.finish_remote(stage.model, msg.step, msg.ids, msg.logprobs)
                self.emit(outs)
            except EngineError as e:
                self.fail_requests(stage.model, e.message)
        else:
            self.fail_requests(stage.model, msg.message)

    def on_act(self, msg: P.Act, h: mx.array | None, sender: str | None = None) -> None:
        iid = msg.instance
        stage = self.stages.get(iid)
        runner = stage.runner if stage is not None else None
        if stage is None or runner is None or h is None:
            log.warning("a step for instance %s, which this node does not hold", iid)
            return
        if not self.from_its_senders(stage, sender, "step"):
            return
        problem = malformed(msg, tuple(h.shape), runner.width)
        if problem is not None:
            self.peers.dropped["bad_act"] += 1
            log.warning("instance %s: ACT dropped: %s", iid, problem)
            return
        if msg.step == runner.last_step and stage.last_out is not None:
            # Stage 0 sent it again: what this stage sent on may have been lost.
            stage.resent += 1
            out_msg, tensor = stage.last_out
            to = stage.next if isinstance(out_msg, P.Act) else stage.stage0
            if to:
                self.peers.send(to, out_msg, tensor)
            return
        if msg.step <= runner.last_step:
            # A step stage 0 gave up on, arriving late over a link that came back.
            log.warning("instance %s: stale step %s dropped", iid, msg.step)
            return
        try:
            out = runner.run(msg, h)
        except Exception as e:  # a stage that cannot run its step fails the instance's requests
            log.exception("instance %s: step %s failed", iid, msg.step)
            if stage.stage0:
                self.peers.send(
                    stage.stage0, P.StageError(instance=iid, message=f"{self.name}: {e}")
                )
            return
        if isinstance(out, list):
            result = P.Result(instance=iid, step=msg.step, ids=out, logprobs=runner.logprobs)
            stage.last_out = (result, None)
            if stage.stage0:
                self.peers.send(stage.stage0, result)
        else:
            act = msgspec.structs.replace(msg, shape=list(out.shape))
            stage.last_out = (act, out)
            if stage.next:
                self.peers.send(stage.next, act, out)

    def check_stalled(self) -> None:
        """A step out past its resend time goes again (a link that died under it:
        the broker's ROUTE may not have come yet); one the later stages never
        answer within the stage timeout fails its requests instead of leaving
        them hanging until their deadline."""
        for model_id, _ in self.engine.stage0.due(time.perf_counter()):
            lm = self.engine.models[model_id]
            stage = self.stages.get(lm.instance)
            if self.engine.stage0.resend(model_id, lm) and stage is not None:
                stage.resent += 1
        for model_id, w in self.engine.stage0.stalled(self.stage_timeout):
            lm = self.engine.models[model_id]
            stage = self.stages.get(lm.instance)
            age = time.perf_counter() - w.t0
            if age < self.stage_timeout and stage and stage.next and not self.link_up(stage.next):
                continue  # its link is down here: the broker's new route is coming
            why = (
                f"stage after {self.name} did not answer step {w.step} within "
                f"{age:.0f}s (next hop {stage.next if stage else None})"
            )
            log.error("instance %s: %s", lm.instance, why)
            self.fail_requests(model_id, why, 504, "stage_timeout")

    def link_up(self, endpoint: str) -> bool:
        """Whether this machine's interface toward `endpoint` is up (its network
        holds the endpoint's address); True when none is known."""
        import ipaddress

        from exo.nodes.machine.interfaces import interfaces

        try:
            ip = ipaddress.ip_address(endpoint.removeprefix("tcp://").rsplit(":", 1)[0])
            for i in interfaces():
                if any(ip in ipaddress.ip_network(n, strict=False) for n in i.networks):
                    return i.up
        except ValueError:
            pass
        return True

    def fail_requests(
        self, model_id: str, why: str, status: int = 500, code: str = "stage_error"
    ) -> None:
        for rid in self.engine.fail_remote(model_id):
            self.send(P.Fail(rid=rid, status=status, code=code, message=why))
