"""A model's decode batch and its rows: shared by the engine (stage 0 or a
whole model) and by later pipeline stages, which follow stage 0's batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from exo.nodes.mlxenv import mx
from exo.nodes.sampling import Sampler

GROW_MARGIN = 8  # tokens


@dataclass
class Batch:
    """The decode batch of one model: its rows and their shared left-padded cache."""

    rids: list[str] = field(default_factory=list)
    cache: list[Any] | None = None

    def join(self, rid: str, cache: list[Any]) -> None:
        from mlx_lm.models.cache import BatchKVCache

        new = [BatchKVCache.merge([c]) for c in cache]
        if self.cache is None:
            self.cache = new
        else:
            for mine, theirs in zip(self.cache, new, strict=True):
                mine.extend(theirs)
        self.rids.append(rid)
        # Room to grow ahead from the first step on (the join copies every layer anyway).
        self.grow_ahead(per_step=len(self.cache))

    def leave(self, rids: set[str]) -> None:
        keep = [i for i, r in enumerate(self.rids) if r not in rids]
        if len(keep) == len(self.rids):
            return
        self.rids = [self.rids[i] for i in keep]
        if not keep:
            self.cache = None
        else:
            assert self.cache is not None
            for c in self.cache:
                c.filter(mx.array(keep))

    def grow_ahead(self, per_step: int = 1) -> None:
        """Lengthen the cache of `per_step` layers once the keys left before it is
        full are fewer than its layers (plus a margin), so that every layer has
        grown by the time one must. BatchKVCache grows by itself, copying every
        row of every layer in one step: with 4 rows at 1k keys that step took
        0.3 s here, twice a decode step, a freeze every 256 tokens."""
        if self.cache is None or self.cache[0].keys is None:
            return
        need = self.cache[0]._idx + -(-len(self.cache) // per_step) + GROW_MARGIN
        for c in [c for c in self.cache if c.keys.shape[2] < need][:per_step]:
            for name in ("keys", "values"):
                a = getattr(c, name)
                more = mx.zeros((*a.shape[:2], c.step, a.shape[3]), a.dtype)
                setattr(c, name, mx.concatenate([a, more], axis=2))

    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache) if self.cache else 0


class Row(Protocol):
    rid: str
    sampler: Sampler


R = TypeVar("R", bound=Row)


def sample_rows(rows: list[R], logits: mx.array) -> list[tuple[list[R], mx.array]]:
    """Greedy rows share one argmax over the batch; sampled rows draw with their own key."""
    greedy = [i for i, r in enumerate(rows) if r.sampler.temperature <= 0]
    out: list[tuple[list[R], mx.array]] = []
    if len(greedy) == len(rows):
        return [(rows, mx.argmax(logits, axis=-1))]
    if greedy:
        out.append(([rows[i] for i in greedy], mx.argmax(logits[mx.array(greedy)], axis=-1)))
    out.extend(
        ([r], r.sampler(logits[i])[None]) for i, r in enumerate(rows) if r.sampler.temperature > 0
    )
    return out
