"""Which work the next engine step does: a pure function over plain data.

Decodes first: every request that has finished its prefill gets one token this
step, so a running stream is never held back. Then prompts waiting for prefill
get chunks, first come first served, within what is left of the per-step token
budget (each decode counts as one token). A prompt longer than the budget is
prefilled over several steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Pending:
    rid: str
    remaining: int  # prompt tokens not yet prefilled


@dataclass(slots=True)
class StepPlan:
    decode: list[str] = field(default_factory=list)
    prefill: list[tuple[str, int]] = field(default_factory=list)  # (rid, tokens this step)

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
