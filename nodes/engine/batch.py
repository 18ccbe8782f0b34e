"""A model's decode batch and its rows: shared by the engine (stage 0 or a
whole model) and by later pipeline stages, which follow stage 0's batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from exo.nodes.engine.mlxenv import LayerCache, mx
from exo.nodes.engine.rowcache import STEP, RowCache, spare_rows
from exo.nodes.engine.sampling import Sampler

GROW_MARGIN = 8  # tokens
# A batch may keep rows of very different lengths in separate attention groups
# (each with its own cache, rowcache.py): one long row padded into a group of short
# ones makes every row attend over its length (and copies the whole group to join).
# But a group costs its own attention ops in every layer of every step, where a
# padded key costs little (docs/NOTES.md). So a row starts a group only when joining
# the group it pads least would pad more keys than a group costs: chats arriving a
# few steps apart share one.
MAX_GROUPS = 3
SPLIT_KEYS = 2048  # padded keys (summed over the rows) worth a group of their own


@dataclass
class Rows:
    """Rows of a batch that share one cache per layer and attend together."""

    rids: list[str]
    cache: list[RowCache]  # per layer

    @property
    def length(self) -> int:
        return int(self.cache[0]._idx)

    def _need(self, per_step: int) -> int:
        """Columns for the steps it takes to grow every layer, plus a margin."""
        return self.length + -(-len(self.cache) // per_step) + GROW_MARGIN

    def grow_ahead(self, per_step: int) -> None:
        need, spare = self._need(per_step), spare_rows(len(self.rids))
        for c in [c for c in self.cache if c.short(need, spare)][:per_step]:
            c.grow_columns(need)
            c.grow_rows(spare)

    def join(self, rid: str, cache: list[LayerCache], coming: int = 0) -> None:
        for mine, c in zip(self.cache, cache, strict=True):
            mine.insert(c, coming)
        self.rids.append(rid)
        # A longer row moves the group's end: room for the next steps now, since
        # growing a layer per step could not keep up.
        need = self._need(1)
        for c in self.cache:
            c.grow_columns(need)

    def leave(self, rid: str) -> None:
        """`rid` goes; the last row takes its place (RowCache.remove)."""
        i = self.rids.index(rid)
        moved = [c.moving(i) for c in self.cache]
        mx.eval(moved)  # copied out before any buffer is written: see RowCache.remove
        for c, m in zip(self.cache, moved, strict=True):
            c.remove(i, m)
        self.rids[i] = self.rids[-1]
        self.rids.pop()
        # Once the rows that began at column 0 are gone, the rest attend to masked
        # columns at every step (a good part of a decode step's attention): one copy
        # drops them, as mlx-lm's cache drops its common left padding.
        if self.cache[0].dead_front() >= STEP:
            for c in self.cache:
                c.trim_front(c.dead_front())
        # Memory back once most rows are gone (16 rows of 2k keys are ~1.5 GB here):
        # one copy each time the rows halve, so a few per group's life.
        keep = len(self.rids) + spare_rows(len(self.rids))
        if self.cache[0].capacity > 2 * keep:
            for c in self.cache:
                c.shrink_rows(keep)


def padding(g: Rows, length: int) -> int:
    """Keys attended for nothing, per step, once a row of `length` joins `g`: a
    longer row pads every row already there; a shorter one is padded itself."""
    return len(g.rids) * (length - g.length) if length > g.length else g.length - length


@dataclass
class Batch:
    """The decode batch of one model: its rows, in groups of similar length when
    `split` (the fused step runs each group's attention on its own), else one."""

    split: bool = False
    groups: list[Rows] = field(default_factory=list)

    @property
    def rids(self) -> list[str]:
        """The rows in step order: group after group."""
        return [r for g in self.groups for r in g.rids]

    @property
    def cache(self) -> list[LayerCache] | None:
        """The one group's cache, for callers that run a single group."""
        assert len(self.groups) <= 1, "a split batch has a cache per group"
        return self.groups[0].cache if self.groups else None

    def dec_groups(self) -> list[tuple[int, list[LayerCache]]]:
        """(rows, per-layer caches) of each group, in step order."""
        return [(len(g.rids), g.cache) for g in self.groups]

    def join(self, rid: str, cache: list[LayerCache], coming: int = 0) -> None:
        """Add a request's prefilled per-layer KVCaches as a row. A row starting a
        group brings its prompt's buffers, uncopied (allocated with room to grow:
        engine.JOIN_ROOM); one joining a group is written into a spare row.
        `coming`: rows joining after it in the same step (a group that must grow
        makes room for them at once)."""
        home = self._home(max(1, int(cache[0].offset)))
        if home is None:
            self.groups.append(Rows([rid], [RowCache.of(c) for c in cache]))
        else:
            home.join(rid, cache, coming)

    def _home(self, length: int) -> Rows | None:
        """The group a row of `length` joins; None for a group of its own."""
        if not self.groups:
            return None
        near = min(self.groups, key=lambda g: padding(g, length))
        if not self.split or padding(near, length) <= SPLIT_KEYS or len(self.groups) >= MAX_GROUPS:
            return near
        return None

    def leave(self, rids: set[str]) -> None:
        """Rows go, each replaced by its group's last row: the order of the rows
        that stay changes (later pipeline stages map theirs to stage 0's)."""
        for g in self.groups:
            for rid in [r for r in g.rids if r in rids]:
                if len(g.rids) > 1:
                    g.leave(rid)
                else:
                    g.rids.clear()
        self.groups = [g for g in self.groups if g.rids]

    def grow_ahead(self, per_step: int = 1) -> None:
        """Lengthen the cache of `per_step` layers of each group once the keys left
        before it is full are fewer than its layers (plus a margin), and give them
        a spare row once none is left, so that every layer has grown by the time one
        must. Grown all at once, as BatchKVCache grows, every row of every layer is
        copied in one step: a freeze of the streams every 256 tokens."""
        for g in self.groups:
            g.grow_ahead(per_step)

    def nbytes(self) -> int:
        return sum(c.nbytes for g in self.groups for c in g.cache)

    def row_kv(self, rid: str) -> list[tuple[mx.array, mx.array]] | None:
        """Row `rid`'s keys and values in every layer, its tokens in order (views:
        copy them before the row leaves)."""
        for g in self.groups:
            if rid in g.rids:
                i = g.rids.index(rid)
                return [c.row(i) for c in g.cache]
        return None


class Row(Protocol):
    rid: str
    sampler: Sampler


R = TypeVar("R", bound=Row)


def sample_rows(rows: list[R], logits: mx.array) -> list[tuple[list[R], mx.array]]:
    """Greedy rows share one argmax over the batch; sampled rows draw with their own key."""
    greedy = [i for i, r in enumerate(rows) if r.sampler.temperature <= 0 and not r.sampler.own]
    out: list[tuple[list[R], mx.array]] = []
    if len(greedy) == len(rows):
        return [(rows, mx.argmax(logits, axis=-1))]
    chosen = set(greedy)
    if greedy:
        out.append(([rows[i] for i in greedy], mx.argmax(logits[mx.array(greedy)], axis=-1)))
    out.extend(([r], r.sampler(logits[i])[None]) for i, r in enumerate(rows) if i not in chosen)
    return out
