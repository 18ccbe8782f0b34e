"""Which work the next engine step does: a pure function over plain data.

Decodes first: every request that has finished its prefill gets one token this
step, so a running stream is never held back. Then prompts waiting for prefill
get chunks, first come first served, within what is left of the per-step token
budget (each decode counts as one token). A prompt longer than the budget is
prefilled over several steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (no MLX at run time: the plan is tested without a model)
    from exo.nodes.engine.mlxenv import mx
    from exo.nodes.engine.request import Request
    from exo.nodes.engine.threads import Option


@dataclass(frozen=True, slots=True)
class Pending:
    rid: str
    remaining: int  # prompt tokens not yet prefilled


@dataclass(slots=True)
class StepPlan:
    decode: list[str] = field(default_factory=list)
    prefill: list[tuple[str, int]] = field(default_factory=list)  # (rid, tokens this step)
    # rid -> [first, end) layers, for a chunk that goes through only part of the model
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


def plan(decoding: list[str], waiting: list[Pending], budget: int, min_chunk: int = 16) -> StepPlan:
    """`budget` tokens per step; a prefill always gets at least `min_chunk`
    tokens so a saturated batch cannot starve new prompts forever."""
    step = StepPlan(decode=list(decoding))
    left = budget - len(decoding)
    for p in waiting:
        if left <= 0 and step.prefill:
            break
        n = min(p.remaining, max(left, min_chunk if not step.prefill else 0))
        if n <= 0:
            break
        step.prefill.append((p.rid, n))
        left -= n
    return step


KEYS = 1000.0  # features count attention work in thousands of cached keys
# Chunk sizes tried when a prompt goes through a few layers per step: past 128
# tokens a layer's chunk costs more per token on a CPU (its activations leave the
# caches).
SIZES = (8, 16, 32, 64, 128)

# A prompt chunk in a step: (tokens, keys already cached, share of the model's
# layers it goes through this step).
Work = tuple[int, int, float]


def features(chunks: list[Work]) -> list[float]:
    """A step's prompt chunks as the cost model sees them: how many chunk-layers
    (each runs its own attention group), token-layers, and token-key-layers (each
    token attends to everything before it), all in units of the whole model."""
    return [
        sum(f for _, _, f in chunks),
        sum(f * n for n, _, f in chunks),
        sum(f * n * (ctx + n / 2) for n, ctx, f in chunks) / KEYS,
    ]


def matmuls(rows: list[float], t: int) -> float:
    """Seconds of a model's weight matmuls for `t` rows from its table (`rows[t]`),
    past the table's end by the slope of its upper half; 0 without a table."""
    if not rows:
        return 0.0
    top = len(rows) - 1
    if t <= top:
        return rows[t]
    slope = max(0.0, (rows[top] - rows[top // 2]) / max(1, top - top // 2))
    return rows[top] + slope * (t - top)


def rows_delta(rows: list[float], decodes: int, chunks: list[Work]) -> float:
    """What the chunks add to the decode rows' weight matmuls: at each layer every
    row present goes through them at once."""
    tokens = sum(n for n, _, _ in chunks)
    if not tokens:
        return 0.0
    share = sum(n * f for n, _, f in chunks) / tokens
    return share * (matmuls(rows, decodes + tokens) - matmuls(rows, decodes))


def nnls(x: list[list[float]], y: list[float], w: list[float]) -> list[float]:
    """Weighted least squares with every coefficient >= 0, for a handful of
    columns: the best of the unconstrained fits over each subset of columns.
    (Fitting freely and clamping afterwards is wrong when columns are nearly
    collinear: the kept coefficients no longer compensate.)"""
    import itertools

    import numpy as np

    xa, ya, wa = np.array(x), np.array(y), np.sqrt(np.array(w))
    k = xa.shape[1]
    best, best_err = [0.0] * k, float(np.sum((wa * ya) ** 2))
    for r in range(1, k + 1):
        for cols in itertools.combinations(range(k), r):
            sub = xa[:, cols] * wa[:, None]
            coef, *_ = np.linalg.lstsq(sub, wa * ya, rcond=None)
            if np.any(coef < 0):
                continue
            err = float(np.sum((sub @ coef - wa * ya) ** 2))
            if err < best_err:
                best_err, best = err, [0.0] * k
                for c, v in zip(cols, coef, strict=True):
                    best[c] = float(v)
    return best


@dataclass
class PrefillCost:
    """What prompt chunks add to a step that also decodes.

    Two parts. The weight matmuls see every token of the step as one row, and
    their cost is not smooth in the row count (OpenBLAS on this CPU: 16 rows cost
    less than 4, 20 rows half again as much as 16); each model's table of that
    cost is measured when it loads (forward.matmul_table) and passed in, so the
    chunk can be sized to land on a cheap row count. The rest (attention, per-group
    work) is learnt from the steps the engine runs: a * chunks + b * tokens +
    c * token-keys, non-negative least squares over the last `window` mixed steps.
    The chunk at most doubles from one step to the next (from at least `start`),
    so the learnt part is trusted only near sizes it has seen."""

    window: int = 32
    start: int = 16
    seen: list[tuple[list[float], float]] = field(default_factory=list)
    theta: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    misses: list[float] = field(default_factory=list)  # actual - predicted, recent steps
    last_tokens: int = 0

    def observe(self, rows: list[float], decodes: int, chunks: list[Work], extra: float) -> None:
        """`rows`: the model's matmul table; `decodes`: its decode rows in the step."""
        if len(self.seen) >= 4:  # misses of a model fitted on almost nothing say little
            self.misses.append(extra - self.predict(rows, decodes, chunks))
            del self.misses[: -self.window]
        self.seen.append((features(chunks), extra - rows_delta(rows, decodes, chunks)))
        del self.seen[: -self.window]
        self.last_tokens = round(sum(n * f for n, _, f in chunks))
        n = len(self.seen)
        self.theta = nnls(
            [f for f, _ in self.seen],
            [y for _, y in self.seen],
            [0.5 + 0.5 * i / max(1, n - 1) for i in range(n)],  # recent steps count more
        )

    def predict(self, rows: list[float], decodes: int, chunks: list[Work]) -> float:
        learnt = sum(t * f for t, f in zip(self.theta, features(chunks), strict=True))
        return rows_delta(rows, decodes, chunks) + learnt

    def margin(self, q: float = 0.9) -> float:
        """How far recent steps ran past the prediction, at quantile `q` (0 if none
        did): a step held under a bound must leave that much room."""
        if not self.misses:
            return 0.0
        xs = sorted(self.misses)
        return max(0.0, xs[min(len(xs) - 1, int(q * len(xs)))])

    def largest(
        self, rows: list[float], decodes: int, ctx: int, remaining: int, allowance: float, cap: int
    ) -> int:
        """The most tokens of a prompt with `ctx` keys cached that fit in
        `allowance` seconds beside `decodes` decode rows (at least 1)."""
        limit = max(1, min(remaining, cap, max(self.start, 2 * self.last_tokens)))
        for n in range(limit, 1, -1):
            if self.predict(rows, decodes, [(n, ctx, 1.0)]) <= allowance:
                return n
        return 1

    def split(
        self,
        rows: list[float],
        decodes: int,
        ctx: int,
        remaining: int,
        allowance: float,
        layers: int,
        inflight: tuple[int, int] | None = None,
    ) -> tuple[int, int]:
        """(tokens, layers) of a prompt with `ctx` keys cached to run this step
        beside `decodes` decode rows within `allowance` seconds, the most token-
        layers that fit (at least one layer). `inflight`: (tokens, layers done) of
        a chunk already part-way through the model, which must go on as it is.

        Going through a few layers per step lets a chunk be large (per token a
        64-token chunk costs a third of an 8-token one here: each chunk pays its
        attention group's fixed costs at every layer) while the step stays short."""
        if inflight is not None:
            sizes, top = [inflight[0]], layers - inflight[1]
        else:
            sizes = sorted({s for s in SIZES if s < remaining} | {min(remaining, max(SIZES))})
            top = layers
        trust = max(self.start, 2 * self.last_tokens) * layers
        best = (0, 0, sizes[0], 1)  # (token-layers, layers, tokens, layers)
        for n in sizes:
            for k in range(top, 0, -1):
                if (
                    n * k <= trust
                    and self.predict(rows, decodes, [(n, ctx, k / layers)]) <= allowance
                ):
                    best = max(best, (n * k, k, n, k))
                    break
        return best[2], best[3]


@dataclass
class Executed:
    """What a step's execution gives its commit and its observer."""

    sampled: list[tuple[list[Request], mx.array]] = field(default_factory=list)  # (lazy)
    joined: list[Request] = field(default_factory=list)  # prompts finished this step
    work: list[Work] = field(default_factory=list)  # its chunks, for the cost model
    work_model: str = ""  # whose chunks those are
    timed: bool = True  # whether its time says what its work cost
    dec_rows: int = 0
    pure: bool = False  # decodes only, all computed here
    option: Option | None = None  # the OpenBLAS threads chosen for it
