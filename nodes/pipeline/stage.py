"""A later pipeline stage: hidden states in, this node's layers, hidden states
(or, on the last stage, sampled tokens) out.

Stage 0 runs the scheduler; a later stage follows it step by step. Each step's
header says which requests decode (in stage 0's row order) and which send a
prompt chunk, so this stage keeps the same batch and per-request caches as
stage 0 without deciding anything: rows that left stage 0's batch leave here,
requests whose prompt finished join here. The rows may sit in another order here
(a row leaving takes its group's last row into its place, and stage 0 may have
interleaved leaves and joins that reach this stage together): the step reorders
its hidden states, a few rows of numbers, instead of the caches. Requests that
end are named in the next header's `drops`, so a cancel frees this stage's
memory within one step of stage 0 seeing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from exo.broker import protocol as P
from exo.nodes.engine.batch import Batch, sample_rows
from exo.nodes.engine.mlxenv import LayerCache, ints, mx
from exo.nodes.engine.model import LoadedModel
from exo.nodes.engine.prefix import KV, Entry, PrefixCache, copied
from exo.nodes.engine.sampling import Sampler, sampler_for
from exo.nodes.pipeline.stage0 import StepLogprobs

EMPTY = np.zeros(0, dtype=np.int32)


class StageError(Exception):
    pass


@dataclass
class SamplerRow:
    rid: str
    sampler: Sampler


@dataclass
class StageRunner:
    lm: LoadedModel
    batch: Batch = field(default_factory=Batch)
    caches: dict[str, list[LayerCache]] = field(default_factory=dict)  # requests still prefilling
    samplers: dict[str, Sampler] = field(default_factory=dict)  # last stage only
    # this stage's part of stage 0's prefix cache entries, by stage 0's key
    entries: dict[str, KV] = field(default_factory=dict)
    steps: int = 0
    last_step: int = 0  # stage 0's number of the last step run here
    # the last step's log probabilities, per request that asks (last stage only)
    logprobs: StepLogprobs = field(default_factory=dict)

    @property
    def width(self) -> int:
        """The hidden states' width, which every ACT to this stage carries."""
        from exo.nodes.engine.layout import embedding_dims

        return int(embedding_dims(self.lm.model.model.embed_tokens))

    @property
    def last(self) -> bool:
        return self.lm.part is None or self.lm.part.last

    def drop(self, rid: str) -> None:
        self.caches.pop(rid, None)
        self.samplers.pop(rid, None)
        self.batch.leave({rid})

    def follow(self, decode: list[str]) -> tuple[list[int], list[int]]:
        """Make this stage's batch hold the rows stage 0 decoded this step. ->
        where each of this batch's rows sits in `decode`, and the way back."""
        self.batch.leave(set(self.batch.rids) - set(decode))
        new = [rid for rid in decode if rid not in self.batch.rids]
        for i, rid in enumerate(new):
            cache = self.caches.pop(rid, None)
            if cache is None:
                raise StageError(f"request {rid} decodes before its prompt reached this stage")
            self.batch.join(rid, cache, coming=len(new) - i - 1)
        here = {r: i for i, r in enumerate(self.batch.rids)}
        if len(here) != len(decode):
            raise StageError(f"batch differs from stage 0's: {self.batch.rids} vs {decode}")
        at = {r: i for i, r in enumerate(decode)}
        return [at[r] for r in self.batch.rids], [here[r] for r in decode]

    def run(self, header: P.Act, h: mx.array) -> mx.array | list[int]:
        """One step: the next stage's input, or on the last stage the tokens."""
        from exo.nodes.engine.forward import Chunk, groups_of, logits_of, sampled_rows, through
        from exo.nodes.engine.span import new_cache

        lm = self.lm
        assert lm.span is not None

        self.steps += 1
        self.last_step = header.step
        self.logprobs = {}
        # The prefix cache's orders first: keys kept before their rows leave,
        # entries started from before they are let go.
        for rid, key, n in header.keep:
            self.keep(rid, key, n)
        for rid, params in header.new.items():
            self.caches[rid] = new_cache(lm.layers)
            if rid in header.reuse:
                key, n = header.reuse[rid]
                if key not in self.entries:
                    raise StageError(f"request {rid} starts from a cached prefix this stage lacks")
                PrefixCache.fill(self.caches[rid], Entry(EMPTY, self.entries[key], 0), n)
            if self.last:
                self.samplers[rid] = sampler_for(lm, params)
        for key in header.forget:
            self.entries.pop(key, None)
        for rid in header.drops:
            self.drop(rid)
        decode = list(header.decode)
        to_mine, back = self.follow(decode)
        self.batch.grow_ahead()
        chunks = []
        for rid, n, wants_logits in header.chunks:
            if rid not in self.caches:
                raise StageError(f"a prompt chunk of {rid}, which this stage does not hold")
            chunks.append((rid, Chunk([0] * n, self.caches[rid], bool(wants_logits))))
        groups = groups_of(self.batch.dec_groups(), [c for _, c in chunks])
        if not groups:  # a step that only carries drops
            return h if not self.last else []
        h = _rows(h, to_mine)
        h = _rows(through(lm.model, lm.span, lm.fused, h, groups), back)
        states = [c.state for _, ch in chunks for c in ch.cache]
        if not self.last:
            mx.eval(h, states)
            return h
        rows, wanted = sampled_rows(len(decode), [(len(c.tokens), c.logits) for _, c in chunks])
        if not rows:
            mx.eval(states)
            return []
        logits = logits_of(lm.model, h, rows, None if lm.fused else lm.span)
        names = decode + [rid for (rid, _), w in zip(chunks, wanted, strict=True) if w is not None]
        sampled = sample_rows([SamplerRow(r, self.samplers[r]) for r in names], logits)
        mx.eval([t for _, t in sampled], states)
        at = {r.rid: t for reqs, toks in sampled for r, t in zip(reqs, ints(toks), strict=True)}
        for r in names:
            self.samplers[r].accept(at[r])
        self.logprobs = {
            r: self.samplers[r].take_logprobs()
            for r in names
            if self.samplers[r].params.logprobs is not None
        }
        return [at[r] for r in names]

    def keep(self, rid: str, key: str, n: int) -> None:
        """Keep this stage's keys of `rid`'s first `n` tokens as entry `key`."""
        cache = self.caches.get(rid)
        if cache is not None:
            kv = [(c.keys[..., :n, :], c.values[..., :n, :]) for c in cache]
        else:
            row = self.batch.row_kv(rid)
            if row is None:
                raise StageError(f"keep {rid}'s keys: this stage does not hold it")
            kv = [(k[..., :n, :], v[..., :n, :]) for k, v in row]
        if int(kv[0][0].shape[2]) != n:
            raise StageError(f"keep {n} keys of {rid}: this stage holds {kv[0][0].shape[2]}")
        self.entries[key] = copied(kv)

    def prefix_bytes(self) -> int:
        return sum(int(k.nbytes + v.nbytes) for kv in self.entries.values() for k, v in kv)

    def kv_bytes(self) -> int:
        return self.batch.nbytes() + sum(
            c.nbytes for cache in self.caches.values() for c in cache if c.keys is not None
        )


def malformed(header: P.Act, shape: tuple[int, ...], width: int) -> str | None:
    """Why an ACT's hidden states cannot be the step its header describes (None:
    they can; the header's own fields are typed where it is decoded). Checked
    before anything runs: such a frame is dropped and counted, and fails no one's
    request."""
    rows = len(header.decode) + sum(n for _, n, _ in header.chunks)
    if tuple(shape) != (rows, width):
        return f"hidden states {tuple(shape)} for {rows} rows of width {width}"
    return None


def _rows(h: mx.array, order: list[int]) -> mx.array:
    """h's first len(order) rows (the decodes) in `order`, the rest as they are."""
    if order == list(range(len(order))):
        return h
    return mx.concatenate([h[mx.array(order)], h[len(order) :]])
