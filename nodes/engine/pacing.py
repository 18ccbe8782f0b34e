"""How much prefill a step beside running streams may carry.

The engine asks `Pacer.plan` for each step. Decodes come first; a prompt
waiting for prefill gets what the stall bound leaves: the step may take at most
`max_stall` times the decode-only step the streams had before the prompt came.
The pacer measures decode-only steps (one every DECODE_EVERY + 1 while a prompt
prefills), teaches the cost model (`scheduler.PrefillCost`) what prompt chunks
add, and sizes the next chunk from it: a long prompt goes a few layers per step
in large chunks, short prompts go whole, several in one step.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from exo.nodes.engine.scheduler import Pending, PrefillCost, StepPlan, Work, plan

if TYPE_CHECKING:
    from exo.nodes.engine.model import LoadedModel

# While streams decode, the prefill work in a step is sized from measurement so
# the step takes at most max_stall times a decode-only step: the streams' inter-
# token latency rises by at most that much while a long prompt prefills (see
# BENCHMARKS.md, bench stall). The cost of a prefill token differs by 20x
# between a 2-core CPU and an M-series GPU, so no fixed token count fits both.
DEFAULT_MAX_STALL = 1.5
# With nothing decoding a prompt goes in chunks of this size: on MLX's CPU backend
# 256-token chunks prefill a long prompt faster than one whole pass.
DEFAULT_IDLE_BUDGET = 256
MIN_CHUNK = 2
MAX_CHUNK = 1024
DECODE_TIMES = 5  # decode-only steps whose median is the decode step time
DECODE_EVERY = 8  # mixed steps between two decode-only ones (see Pacer.plan)
# However long the streams' own step grows while a prompt prefills, the prompt
# gets at least this share of the stall allowance, so it cannot starve.
FLOOR = 0.5


class Prompt(Protocol):
    """A request waiting for prefill, as the pacer sees it."""

    rid: str
    lm: LoadedModel
    prefilled: int
    inflight: int  # tokens of a chunk part-way through the model (0: none)
    through: int  # layers that chunk has been through

    @property
    def to_prefill(self) -> int: ...


class Pacer:
    """The stall bound's bookkeeping and the plan of each step."""

    def __init__(
        self,
        prefill_budget: int | None = None,
        idle_budget: int = DEFAULT_IDLE_BUDGET,
        max_stall: float = DEFAULT_MAX_STALL,
    ) -> None:
        self.prefill_budget = prefill_budget  # fixed tokens per step; None: sized by max_stall
        self.idle_budget = idle_budget
        self.max_stall = max_stall
        self.cost = PrefillCost()  # what prompt chunks add to a decode step
        self.tables: dict[str, list[float]] = {}  # model -> matmul seconds by row count
        self.fused: dict[str, bool] = {}  # model -> whether its step is fused
        # Recent decode-only step times by decode rows (a stale time for another batch
        # size would make the cost model blame the prompt for the new rows' decodes),
        # and the one for this step's batch.
        self.decode_times: dict[int, deque[float]] = {}
        self.t_decode: float | None = None
        # (decode rows, t_decode) when the prompt now prefilling came, or the batch last
        # changed size
        self.t_ref: tuple[int, float] | None = None
        self.predicted = 0.0  # what the cost model expected the last mixed step to add
        self.mixed = 0  # steps with both decodes and prefill since the last decode-only one

    def add_model(self, model_id: str, fused: bool, table: list[float]) -> None:
        self.fused[model_id], self.tables[model_id] = fused, table

    def remove_model(self, model_id: str) -> None:
        self.fused.pop(model_id, None)
        self.tables.pop(model_id, None)

    def plan(
        self, decoding: list[str], waiting: Sequence[Prompt], rows: dict[str, int]
    ) -> StepPlan:
        """The next step: `decoding`, the rows of every decode batch; `waiting`, the
        prompts not yet prefilled, first come first; `rows`, decode rows by model."""
        self.t_decode = self.decode_time(len(decoding))
        if not waiting or not decoding or self.t_decode is None:
            self.t_ref = None
        elif self.t_ref is None or self.t_ref[0] != len(decoding):
            self.t_ref = (len(decoding), self.t_decode)
        if decoding and waiting and self.prefill_budget is None:
            self.mixed += 1
            if self.t_decode is None or self.mixed > DECODE_EVERY:
                # A decode-only step now and then keeps the streams' own step time
                # measured: it grows with their context while a long prompt prefills,
                # and the prefill allowance is a share of it.
                self.mixed = 0
                waiting = []
        if waiting and self._splits(waiting[0], bool(decoding)):
            step = self._layer_plan(decoding, waiting[0], rows)
            if step.spans or waiting[0].inflight:
                return step
            # The first prompt goes whole this step: the token budget below lets the
            # prompts behind it start in the same step (many short prompts at once).
        budget = self.budget(len(decoding), waiting, rows)
        return plan(
            decoding, [Pending(r.rid, r.to_prefill) for r in waiting], budget, min_chunk=MIN_CHUNK
        )

    def decode_time(self, rows: int) -> float | None:
        """A decode-only step of `rows` rows: the median of the last few measured (one
        slow step on a shared machine must not move the baseline of a whole
        prefill); None until one is."""
        times = self.decode_times.get(rows)
        return statistics.median(times) if times else None

    def _splits(self, req: Prompt, decoding: bool) -> bool:
        """Whether `req`'s prompt goes through the model a few layers per step."""
        if req.inflight:
            return True
        return (
            decoding
            and self.prefill_budget is None
            and self.t_decode is not None
            and req.lm.part is None
            and self.fused[req.lm.model_id]
        )

    def allowance(self) -> float:
        """Seconds of prefill work a step beside decodes may carry: up to max_stall
        times the decode step the streams had before the prompt came, less what the
        cost model has lately underestimated by. The streams' own step grows with
        their context meanwhile, and that growth is theirs to keep."""
        assert self.t_decode is not None
        ref = self.t_ref[1] if self.t_ref else self.t_decode
        floor = FLOOR * (self.max_stall - 1.0) * self.t_decode
        return max(floor, self.max_stall * ref - self.t_decode - self.cost.margin())

    def _layer_plan(self, decoding: list[str], req: Prompt, rows: dict[str, int]) -> StepPlan:
        """One chunk of `req`'s prompt, through as many layers as the allowance holds."""
        model = req.lm.model_id
        layers = req.lm.layers
        inflight = (req.inflight, req.through) if req.inflight else None
        if not decoding:
            assert inflight is not None
            n, k = req.inflight, layers - req.through
        else:
            n, k = self.cost.split(
                self.tables.get(model, []),
                rows.get(model, 0),
                req.prefilled,
                req.to_prefill,
                self.allowance(),
                layers,
                inflight=inflight,
            )
        span = (req.through, req.through + k)
        return StepPlan(
            list(decoding), [(req.rid, n)], {} if span == (0, layers) else {req.rid: span}
        )

    def budget(self, decodes: int, waiting: Sequence[Prompt], rows: dict[str, int]) -> int:
        """Tokens this step may carry (each decode counts as one), sized for the
        prompts waiting for prefill as if they were one chunk of the first."""
        if not decodes:
            return self.idle_budget
        if self.prefill_budget is not None:
            return self.prefill_budget
        if self.t_decode is None or not waiting:
            return decodes + MIN_CHUNK
        first = waiting[0]
        model = first.lm.model_id
        n = self.cost.largest(
            self.tables.get(model, []),
            rows.get(model, 0),
            first.prefilled,
            sum(r.to_prefill for r in waiting),
            self.allowance(),
            MAX_CHUNK,
        )
        return decodes + n

    def learn(self, plan: StepPlan, work: list[Work], model: str, seconds: float) -> None:
        """Step times: decode-only ones set the baseline, mixed ones teach the
        cost model what `work` (chunks of `model`'s prompts) added to it."""
        decodes = len(plan.decode)
        if decodes and not work:
            times = self.decode_times.setdefault(decodes, deque(maxlen=DECODE_TIMES))
            times.append(seconds)
        elif decodes and work:
            base = self.decode_time(decodes)
            if base is not None:
                table = self.tables.get(model, [])
                self.predicted = self.cost.predict(table, decodes, work)
                self.cost.observe(table, decodes, work, seconds - base)
