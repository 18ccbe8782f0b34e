"""Per-request sampling and stop handling.

Each request carries its own parameters and its own random key, so a seeded
request gives the same tokens whatever else runs beside it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from exo.nodes.engine.mlxenv import mx


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    @classmethod
    def from_wire(cls, p: dict) -> SamplingParams:
        """The parameters a GENERATE carries, or ValueError naming the bad one. The API
        checks them first; a node checks again, as nothing on the wire is trusted."""
        stop = p.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        seed = p.get("seed")
        out = cls(
            max_tokens=_number(p, "max_tokens", 256, int, 1, 1 << 31),
            temperature=_number(p, "temperature", 1.0, float, 0.0, 2.0),
            top_p=_number(p, "top_p", 1.0, float, 1e-9, 1.0),
            seed=None if seed is None else _number(p, "seed", 0, int, -(1 << 63), (1 << 64) - 1),
            stop=stop,
            ignore_eos=p.get("ignore_eos", False) is True,
        )
        if (
            not isinstance(stop, list)
            or len(stop) > MAX_STOPS
            or not all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in stop)
        ):
            raise ValueError(f"stop: at most {MAX_STOPS} strings of {MAX_STOP_CHARS} characters")
        return out


MAX_STOPS = 16
MAX_STOP_CHARS = 1024


def _number(p: dict, name: str, default: float, kind: type, lo: float, hi: float) -> Any:
    v = p.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and v != int(v)):
        raise ValueError(f"{name} must be a number")
    v = kind(v)
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be within [{lo}, {hi}]")
    return v


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.temperature = params.temperature
        self.top_p = params.top_p
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        # OpenAI's seeds are signed 64-bit; MLX's keys take unsigned ones.
        self.key = mx.random.key(seed % (1 << 64))

    def __call__(self, logits: mx.array) -> mx.array:
        """logits: [vocab] (last position) -> token id as a 0-d array."""
        if self.temperature <= 0:
            return mx.argmax(logits, axis=-1)
        self.key, sub = mx.random.split(self.key)
        logits = logits.astype(mx.float32) / self.temperature
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
