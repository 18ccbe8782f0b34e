"""The engine's status, as the node reports it in every heartbeat."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from exo.nodes.engine.mlxenv import blas_max_threads
from exo.nodes.engine.request import Phase

if TYPE_CHECKING:
    from exo.nodes.engine.engine import Engine


def status(engine: Engine) -> dict[str, Any]:
    phases = Counter(r.phase for r in engine.requests.values())
    return {
        "running": phases[Phase.DECODING],
        "prefilling": phases[Phase.PREFILLING] + phases[Phase.IN_LANE],
        "queued": len(engine.queue),
        "kv_bytes": engine.kv_bytes(),
        "kv_reserved": sum(r.kv_reserved for r in engine.requests.values()),
        "kv_budget": engine.kv_budget,
        "kv_caps": {m: lm.kv_cap for m, lm in engine.models.items() if lm.kv_cap is not None},
        "loaded": sorted(engine.models),
        "steps": engine.steps,
        "step_s": engine.pace.t_decode,
        # batch size -> OpenBLAS's threads and the rows its matmuls see
        "blas_threads": {
            str(n): {"threads": o.threads or blas_max_threads(), "rows": o.rows(n)}
            for n, o in engine.threads.chosen.items()
        }
        if engine.threads
        else {},
        "prefill_cost": engine.pace.cost.theta,
        "lane": engine.watch.status() if engine.watch is not None else None,
        # cached prefixes: per model entries, tokens and bytes; hits and tokens reused
        "prefix_cache": engine.prefix.public(),
    }
