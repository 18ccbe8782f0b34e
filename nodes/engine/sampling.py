"""Per-request sampling and stop handling.

Each request carries its own parameters and its own random key, so a seeded
request gives the same tokens whatever else runs beside it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from exo.common.sampling import SamplingParams
from exo.nodes.engine.mlxenv import floats, ints, mx

if TYPE_CHECKING:
    from exo.nodes.engine.grammar import Constraint
    from exo.nodes.engine.model import LoadedModel

__all__ = ["Sampler", "SamplingParams", "StopMatcher", "sampler_for"]


class Sampler:
    def __init__(self, params: SamplingParams, constraint: Constraint | None = None) -> None:
        # grammar.Constraint: the tokens a structured output allows (None: any)
        self.constraint = constraint
        self.params = params
        self.temperature = params.temperature
        self.top_p = params.top_p
        p = params
        # Per-row work before sampling: never one argmax for the whole batch.
        self.own = constraint is not None or p.logprobs is not None or bool(
            p.top_k or p.min_p or p.presence_penalty or p.frequency_penalty
            or p.repetition_penalty != 1.0 or p.logit_bias
        )  # fmt: skip
        self.seen: dict[int, int] = {}  # generated token -> times, for the penalties
        self.pending: mx.array | None = None  # the model's log probabilities, this step
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        # OpenAI's seeds are signed 64-bit; MLX's keys take unsigned ones.
        self.key = mx.random.key(seed % (1 << 64))

    def __call__(self, logits: mx.array) -> mx.array:
        """logits: [vocab] (last position) -> token id as a 0-d array."""
        logits = logits.astype(mx.float32)
        if self.params.logprobs is not None:  # the model's own, as vLLM reports them
            self.pending = logits - mx.logsumexp(logits, axis=-1)
        logits = self.adjusted(logits)
        if self.constraint is not None:
            logits = self.constraint.apply(logits)
        if self.temperature <= 0:
            return mx.argmax(logits, axis=-1)
        self.key, sub = mx.random.split(self.key)
        logits = logits / self.temperature
        p = self.params
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = mx.sort(logits)[-p.top_k]
            logits = mx.where(logits >= kth, logits, -mx.inf)
        if p.min_p > 0:
            probs = mx.softmax(logits, axis=-1)
            logits = mx.where(probs >= p.min_p * probs.max(), logits, -mx.inf)
        if self.top_p < 1.0:
            probs = mx.softmax(logits, axis=-1)
            order = mx.argsort(-probs, axis=-1)
            sorted_probs = probs[order]
            cum = mx.cumsum(sorted_probs, axis=-1)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            keep_sorted = (cum - sorted_probs) < self.top_p
            keep = mx.zeros_like(keep_sorted).at[order].add(keep_sorted)
            logits = mx.where(keep, logits, -mx.inf)
        return mx.random.categorical(logits, key=sub)

    def adjusted(self, logits: mx.array) -> mx.array:
        """The logit bias and the penalties, over what this request generated."""
        p = self.params
        if p.logit_bias:
            ids = [t for t in p.logit_bias if t < logits.shape[-1]]
            if ids:
                bias = mx.array([p.logit_bias[t] for t in ids], dtype=mx.float32)
                logits = logits.at[mx.array(ids)].add(bias)
        if self.seen and (p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1):
            seen = mx.array(list(self.seen))
            counts = mx.array(list(self.seen.values()), dtype=mx.float32)
            got = logits[seen]
            if p.repetition_penalty != 1:
                got = mx.where(got > 0, got / p.repetition_penalty, got * p.repetition_penalty)
            got = got - p.presence_penalty - p.frequency_penalty * counts
            logits = logits.at[seen].add(got - logits[seen])
        return logits

    def accept(self, token: int) -> None:
        """The token this request got: its grammar moves on, the penalties count it."""
        if self.constraint is not None:
            self.constraint.accept(token)
        self.seen[token] = self.seen.get(token, 0) + 1
        if self.pending is not None:
            lp, self.pending = self.pending, None
            n = self.params.logprobs or 0
            top = ints(mx.argsort(-lp)[:n]) if n else []
            values = floats(lp[mx.array([token, *top])])
            self.logprobs.append((token, values[0], list(zip(top, values[1:], strict=True))))

    def take_logprobs(self) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """(token, its log probability, the likeliest tokens') since the last take."""
        out, self.logprobs = self.logprobs, []
        return out


def sampler_for(lm: LoadedModel, params: SamplingParams) -> Sampler:
    """A request's sampler, held to its schema when it has one."""
    from exo.nodes.engine.grammar import Constraint

    if params.grammar:
        return Sampler(params, Constraint(lm, lark=params.grammar))
    schema = params.json_schema
    return Sampler(params, Constraint(lm, schema) if schema else None)


class StopMatcher:
    """Finds stop strings in streamed text without ever emitting part of one.

    `feed` returns the text that is safe to emit now and whether a stop string
    was hit; text that could be the start of a stop string is held back until
    the next token decides it."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
