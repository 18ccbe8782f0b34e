"""MLX memory limits when a node holds several stages of several models.

The limits follow from everything the node holds, recomputed on every load and
unload from the sum over all held stages, never from the model loaded last
(that breaks after loading a large model and then a small one):

- wired limit (Metal only; the CPU backend wires nothing): the weights of every
  held stage plus the KV budget, so none of it is paged out, capped below the
  machine's memory (MLX requires strictly less; we leave a quarter to the OS).
- cache limit (freed buffers MLX keeps for reuse): the KV budget, the memory the
  engine may use beyond the weights anyway. It does not depend on the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from exo.nodes.engine.mlxenv import mx

WIRED_SHARE = 0.75


@dataclass(frozen=True, slots=True)
class Limits:
    weights: int
    wired: int
    cache: int

    def public(self) -> dict[str, int]:
        return asdict(self)


def limits(stage_bytes: list[int], kv_budget: int, memory_total: int) -> Limits:
    weights = sum(stage_bytes)
    wired = min(weights + kv_budget, int(memory_total * WIRED_SHARE))
    return Limits(weights, wired, min(kv_budget, max(0, memory_total - weights)))


def apply(lim: Limits) -> None:
    mx.set_cache_limit(lim.cache)
    if mx.metal.is_available():
        mx.set_wired_limit(lim.wired)
