"""The prefix cache: the keys and values of prompts (and answers) already run,
kept for the next request that starts with the same tokens.

A chat's turn N re-reads turns 1..N-1; an agent re-reads its system prompt and
tools on every call. Here a request admitted with a prompt whose first tokens
match an entry starts from a copy of that entry's KV and prefills only the rest
(`Book._admit`). Entries come from two moments of a request's life: its prompt
once prefilled (before its row joins the decode batch: callers sharing a system
prompt reuse it while the first one still streams), and its prompt and answer
when it finishes (the next turn of the chat). An entry whose tokens begin
another's is dropped: the longer one serves both.

Entries are copies (never views of a cache still written: MLX would copy the
whole buffer at the next write), live inside the node's KV budget, and go least
recently used first: to make room for a new entry within `limit`, and before any
request would wait for KV memory (`Book._admit`). Memory pressure halves it.

Which models it serves: all the engine runs. Sliding-window layers keep all
their keys here (the window is a mask: span.py), so a copy starts them as well.
For a model split across nodes stage 0 decides: its step header tells the later
stages which request starts from which entry (`reuse`), which request's keys to
keep as an entry (`keep`) and which entries to let go (`forget`); each stage
keeps its own layers' part under stage 0's key (pipeline/stage.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from exo.nodes.engine.mlxenv import LayerCache, mx

if TYPE_CHECKING:
    from exo.nodes.engine.model import LoadedModel

MIN_TOKENS = 16  # a shorter match saves less than the copy costs to arrange
MAX_DIGESTS = 64  # per entry: the longest prefixes of a conversation (its last turns)
REPORTED = 512  # digests a node reports per model, most recently used entries first
KV = list[tuple[mx.array, mx.array]]  # per layer: keys, values [1, heads, tokens, dim]


def supports(lm: LoadedModel) -> bool:
    """Whether `lm`'s requests can start from a cached prefix (see the module)."""
    from mlx_lm.models.cache import KVCache

    from exo.nodes.engine.span import new_cache

    return all(type(c) is KVCache for c in new_cache(lm.layers))


def copied(kv: KV) -> KV:
    """A copy of `kv`, evaluated (never a view of a buffer still written)."""
    out = [(mx.contiguous(k), mx.contiguous(v)) for k, v in kv]
    mx.eval(out)
    return out


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


@dataclass(eq=False)  # (by identity: its tokens are arrays)
class Entry:
    tokens: np.ndarray  # int32, one per cached position
    kv: KV
    nbytes: int
    key: str = ""  # its name at a split model's later stages
    digests: list[str] = field(default_factory=list)  # what the broker routes on
    used: float = field(default_factory=time.monotonic)


@dataclass
class Stats:
    hits: int = 0  # requests that started from an entry
    misses: int = 0  # requests of a served model that found none
    queried: int = 0  # prompt tokens looked up, summed
    reused: int = 0  # prompt tokens not prefilled, summed
    stored: int = 0
    evicted: int = 0
    errors: int = 0  # entries that could not be kept (a bug: logged)


class PrefixCache:
    def __init__(self, limit: int, min_tokens: int = MIN_TOKENS) -> None:
        self.limit = limit  # bytes; 0: off
        self.min_tokens = min_tokens
        self.entries: dict[str, list[Entry]] = {}  # model id -> its entries
        self.stats = Stats()
        self.keys = 0  # entries made: each one's key
        # model id -> keys of entries gone since asked (a split model's later stages
        # let theirs go too: Stage0 carries them)
        self.gone: dict[str, list[str]] = {}

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for es in self.entries.values() for e in es)

    # -- finding -------------------------------------------------------------------

    def _longest(self, model_id: str, prompt: list[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `prompt`, and that length: at
        most all of the prompt but its last token (whose logits the request needs);
        (None, 0) below min_tokens."""
        want = np.asarray(prompt, dtype=np.int32)
        best, n = None, 0
        for e in self.entries.get(model_id, []):
            m = min(common_prefix(e.tokens, want), len(prompt) - 1)
            if m > n:
                best, n = e, m
        return (best, n) if best is not None and n >= self.min_tokens else (None, 0)

    def lookup(self, model_id: str, prompt: list[int]) -> tuple[Entry | None, int]:
        """`_longest`, counted in the stats and touched for LRU."""
        if not self.limit:
            return None, 0
        self.stats.queried += len(prompt)
        best, n = self._longest(model_id, prompt)
        if best is None:
            self.stats.misses += 1
            return None, 0
        best.used = time.monotonic()
        self.stats.hits += 1
        self.stats.reused += n
        return best, n

    def peek(self, model_id: str, prompt: list[int]) -> int:
        """How much of `prompt` a lookup would find now (nothing counted or touched)."""
        return self._longest(model_id, prompt)[1]

    @staticmethod
    def fill(cache: list[LayerCache], entry: Entry, n: int) -> None:
        """Write the entry's first `n` positions into a request's fresh caches."""
        for c, (k, v) in zip(cache, entry.kv, strict=True):
            c.update_and_fetch(k[:, :, :n, :], v[:, :, :n, :])
        # Evaluated here, on the engine's thread: the prefill lane's thread cannot
        # evaluate work queued on this thread's stream.
        mx.eval([c.state for c in cache])

    # -- keeping -------------------------------------------------------------------

    def store(
        self, model_id: str, tokens: list[int], kv: KV, room: int, digests: list[str] | None = None
    ) -> Entry | None:
        """Keep a copy of `kv` (the KV of `tokens`, in order), within `limit` and
        `room` (the KV budget not reserved by requests): older entries go first.
        The new entry; None when it is too short, already held, or cannot fit."""
        if not self.limit or len(tokens) < self.min_tokens:
            return None
        toks = np.asarray(tokens, dtype=np.int32)
        mine = self.entries.setdefault(model_id, [])
        for e in mine:
            if len(e.tokens) >= len(toks) and common_prefix(e.tokens, toks) == len(toks):
                e.used = time.monotonic()  # a longer entry already serves these tokens
                e.digests = list(dict.fromkeys([*e.digests, *(digests or [])]))[-MAX_DIGESTS:]
                return None
        size = sum(int(k.nbytes + v.nbytes) for k, v in kv)
        cap = min(self.limit, room)
        if size > cap:
            return None
        # Entries this one extends serve nothing it does not (their digests move to it).
        gone = [e for e in mine if common_prefix(e.tokens, toks) == len(e.tokens)]
        mine[:] = [e for e in mine if e not in gone]
        self.gone.setdefault(model_id, []).extend(e.key for e in gone)
        self.evict(cap - size)
        kept = list(dict.fromkeys(d for e in gone for d in e.digests))
        kept = list(dict.fromkeys([*kept, *(digests or [])]))[-MAX_DIGESTS:]
        self.keys += 1
        entry = Entry(toks, copied(kv), size, str(self.keys), kept)
        self.entries.setdefault(model_id, []).append(entry)
        self.stats.stored += 1
        return entry

    def evict(self, keep: int) -> int:
        """Drop least recently used entries until at most `keep` bytes remain;
        returns the bytes freed."""
        freed = 0
        while self.nbytes > keep:
            model, i = min(
                ((m, i) for m, es in self.entries.items() for i in range(len(es))),
                key=lambda mi: self.entries[mi[0]][mi[1]].used,
            )
            gone = self.entries[model].pop(i)
            self.gone.setdefault(model, []).append(gone.key)
            freed += gone.nbytes
            self.stats.evicted += 1
        for m in [m for m, es in self.entries.items() if not es]:
            del self.entries[m]
        return freed

    def drop(self, model_id: str) -> None:
        """A model unloaded or loaded anew: its entries describe weights gone."""
        self.entries.pop(model_id, None)
        self.gone.pop(model_id, None)

    def digests(self, model_id: str) -> list[str]:
        newest = sorted(self.entries.get(model_id, []), key=lambda e: -e.used)
        return list(dict.fromkeys(d for e in newest for d in reversed(e.digests)))[:REPORTED]

    def public(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "bytes": self.nbytes,
            "models": {
                m: {
                    "entries": len(es),
                    "tokens": sum(len(e.tokens) for e in es),
                    "bytes": sum(e.nbytes for e in es),
                }
                for m, es in self.entries.items()
            },
            # per model, for the broker's routing (common/digests.py)
            "digests": {m: self.digests(m) for m in self.entries},
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "queried_tokens": self.stats.queried,
            "reused_tokens": self.stats.reused,
            "stored": self.stats.stored,
            "evicted": self.stats.evicted,
            "errors": self.stats.errors,
        }
