"""Stage 0 of a model split across nodes, as the engine runs it.

Stage 0 embeds a step's tokens, runs its own layers and hands the hidden states
to the next stage (`hop`, the node's peer sockets). The step is then out: the
model takes no new step until the last stage's tokens come back (the engine's
`finish_remote`). Later stages keep a KV cache per request; they free one when a
step names it in `drops`, so a request that ends at stage 0 is carried to them
by the model's next step (or a step sent just for that).
"""

from __future__ import annotations

import time
from collections.abc import Callable, KeysView
from dataclasses import dataclass
from typing import TYPE_CHECKING

from exo.broker import protocol as P
from exo.common.retry import STEP_RESEND_MIN_S, STEP_RESEND_X
from exo.nodes.engine.batch import Batch
from exo.nodes.engine.mlxenv import mx
from exo.nodes.engine.model import LoadedModel
from exo.nodes.engine.scheduler import StepPlan, Work

if TYPE_CHECKING:
    from exo.nodes.engine.forward import Chunk
    from exo.nodes.engine.request import Request

Hop = Callable[[LoadedModel, P.Act, mx.array], None]
# A step's log probabilities from the last stage, per request that asks (RESULT's)
StepLogprobs = dict[str, list[P.Logprob]]


@dataclass
class Remote:
    """A step out at the later stages."""

    step: int
    rows: list[Request]  # the decode rows, in batch order
    chunks: list[Request]  # requests that sent a prompt chunk
    plan: StepPlan
    work: list[Work]  # its chunks, for the cost model
    t0: float
    # What went, kept until the tokens come back: sent again when the route
    # changes or nothing came back in time (a link died under it).
    act: P.Act | None = None
    h: mx.array | None = None
    sent: float = 0.0  # perf_counter of the last send
    resends: int = 0


# A step out this long without its tokens has lost its later stages: its requests
# fail (sent again before that: common/retry.py, STEP_RESEND_X).
GIVE_UP_X = 100.0
GIVE_UP_MIN_S = 10.0


class Stage0:
    """The steps a node's pipeline heads have out, and the drops they owe."""

    def __init__(self) -> None:
        self.hop: Hop | None = None
        self.out: dict[str, Remote] = {}  # model id -> its step at the later stages
        self.drops: dict[str, list[str]] = {}  # model id -> requests to free there
        self.round_trip: dict[str, float] = {}  # model id -> a step's, smoothed
        self.resent = 0
        # the prefix cache's orders for the later stages, by model, until a step
        # carries them (P.Act's reuse, keep, forget)
        self.reuses: dict[str, dict[str, tuple[str, int]]] = {}
        self.keeps: dict[str, list[tuple[str, str, int]]] = {}
        self.forgets: dict[str, list[str]] = {}

    def busy(self) -> KeysView[str]:
        """Models whose step is out: they take no new one."""
        return self.out.keys()

    def drop(self, model_id: str, rid: str) -> None:
        self.drops.setdefault(model_id, []).append(rid)
        self.reuses.get(model_id, {}).pop(rid, None)  # (ended before its first chunk)

    def cache_reuse(self, model_id: str, rid: str, key: str, n: int) -> None:
        self.reuses.setdefault(model_id, {})[rid] = (key, n)

    def cache_keep(self, model_id: str, rid: str, key: str, n: int) -> None:
        self.keeps.setdefault(model_id, []).append((rid, key, n))

    def cache_forget(self, model_id: str, keys: list[str]) -> None:
        if keys:
            self.forgets.setdefault(model_id, []).extend(keys)

    def owed(self) -> set[str]:
        """Models with drops to carry and no step out to carry them."""
        return {m for m, d in self.drops.items() if d} - self.out.keys()

    def send(
        self,
        lm: LoadedModel,
        batch: Batch,
        rows: list[Request],
        chunks: list[tuple[Request, Chunk]],
        step: int,
        t0: float,
    ) -> None:
        """Embed, run this node's layers, hand the hidden states on. `chunks`:
        (request, forward.Chunk) pairs; the requests' progress counts them sent."""
        from exo.nodes.engine.forward import groups_of, no_rows, through

        assert self.hop is not None, "a pipeline stage needs the node's peer sockets"
        assert lm.span is not None
        tokens = [r.last for r in rows] + [t for _, c in chunks for t in c.tokens]
        groups = groups_of(batch.dec_groups(), [c for _, c in chunks])
        if groups:
            h = through(lm.model, lm.span, lm.fused, mx.array(tokens), groups)
            mx.eval(h, [c.state for _, ch in chunks for c in ch.cache])
        else:
            h = no_rows(lm.model)
        work = [(len(c.tokens), r.prefilled, 1.0) for r, c in chunks]
        header = P.Act(
            instance=lm.instance,
            step=step,
            decode=list(batch.rids),
            chunks=[(r.rid, len(c.tokens), bool(c.logits)) for r, c in chunks],
            shape=list(h.shape),
            # (a request's first chunk: nothing of it sent yet, cached or not)
            new={r.rid: r.params for r, _ in chunks if r.prefilled == r.cached},
            drops=self.drops.pop(lm.model_id, []),
        )
        reuses = self.reuses.get(lm.model_id, {})
        header.reuse = {rid: reuses.pop(rid) for rid in header.new if rid in reuses}
        header.keep = self.keeps.pop(lm.model_id, [])
        header.forget = self.forgets.pop(lm.model_id, [])
        self.hop(lm, header, h)
        for req, chunk in chunks:
            req.prefilled += len(chunk.tokens)
        plan = StepPlan([r.rid for r in rows], [(r.rid, len(c.tokens)) for r, c in chunks])
        self.out[lm.model_id] = Remote(
            step, rows, [r for r, _ in chunks], plan, work, t0, header, h, time.perf_counter()
        )

    def back(self, model_id: str, step: int) -> Remote | None:
        """The step `step` of `model_id` come back; None if nobody waits for it."""
        w = self.out.get(model_id)
        if w is None or w.step != step:
            return None
        del self.out[model_id]
        if not w.resends:  # (a resent step's time says nothing of the next one's)
            took = time.perf_counter() - w.t0
            was = self.round_trip.get(model_id, took)
            self.round_trip[model_id] = 0.8 * was + 0.2 * took
        return w

    def due(self, now: float) -> list[tuple[str, Remote]]:
        """Steps out past their resend time (common/retry.py: STEP_RESEND_X round trips)."""
        return [
            (m, w)
            for m, w in self.out.items()
            if w.act is not None
            and now - w.sent > max(STEP_RESEND_MIN_S, STEP_RESEND_X * self.round_trip.get(m, 0.0))
        ]

    def resend(self, model_id: str, lm: LoadedModel) -> bool:
        """Send the step out again (the later stages drop what they already ran
        and answer it from what they kept)."""
        w = self.out.get(model_id)
        if w is None or w.act is None or w.h is None or self.hop is None:
            return False
        w.sent, w.resends = time.perf_counter(), w.resends + 1
        self.resent += 1
        self.hop(lm, w.act, w.h)
        return True

    def stalled(self, cap: float) -> list[tuple[str, Remote]]:
        """Steps out past their stage timeout: GIVE_UP_X times the round trip steps
        lately took, at least GIVE_UP_MIN_S, at most `cap`."""
        now = time.perf_counter()
        return [
            (m, w)
            for m, w in self.out.items()
            if now - w.t0 > min(cap, max(GIVE_UP_MIN_S, GIVE_UP_X * self.round_trip.get(m, cap)))
        ]

    def abandon(self, model_id: str) -> None:
        """The later stages failed: nobody will answer the step out."""
        self.out.pop(model_id, None)

    def forget(self, model_id: str) -> None:
        self.abandon(model_id)
        for d in (self.drops, self.reuses, self.keeps, self.forgets):
            d.pop(model_id, None)
