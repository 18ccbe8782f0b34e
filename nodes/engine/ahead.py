"""Queueing the next decode step before this one's tokens are read back, so
building its graph overlaps compute (as mlx-lm's generate_step does)."""

from __future__ import annotations

from dataclasses import dataclass

from exo.nodes.engine.batch import Batch, sample_rows
from exo.nodes.engine.mlxenv import ints, mx
from exo.nodes.engine.model import LoadedModel
from exo.nodes.engine.request import Request

# Queue the next decode step before this one's tokens are read back, so building
# its graph overlaps compute (as mlx-lm's generate_step does). Not on MLX's CPU
# backend: there a stream runs its tasks in order and an eval waits behind
# everything queued before it, and async_eval of a step's graph returned only
# once it was nearly computed: each step's tokens came back a step late, and the
# first step of each chain (after any join) took two steps' time (0.45 s vs 0.22).
QUEUE_AHEAD = mx.default_device() != mx.cpu


@dataclass
class Prefetched:
    """A decode step already queued: its rows and their (lazy) next tokens."""

    rids: list[str]
    toks: mx.array


def in_row_order(groups: list[tuple[list[Request], mx.array]], rids: list[str]) -> mx.array:
    """The tokens of `groups` (as sample_rows returns them) for `rids`, in that order."""
    at = {r.rid: i for i, r in enumerate(r for reqs, _ in groups for r in reqs)}
    flat = mx.concatenate([toks.reshape(-1) for _, toks in groups])
    return flat[mx.array([at[r] for r in rids])]


def queue_ahead(
    sampled: list[tuple[list[Request], mx.array]],
    models: dict[str, LoadedModel],
    batches: dict[str, Batch],
    requests: dict[str, Request],
) -> dict[str, Prefetched]:
    """The next decode step of every model whose whole batch was just sampled,
    queued (only for pure decode: a step with prefill work is planned afresh)."""
    from exo.nodes.engine.forward import fused_step, plain_step

    have = {r.rid for reqs, _ in sampled for r in reqs}
    out: dict[str, Prefetched] = {}
    for model_id, batch in batches.items():
        if not batch.rids or not have.issuperset(batch.rids):
            continue
        rows = [requests[r] for r in batch.rids]
        last = in_row_order(sampled, batch.rids)
        lm = models[model_id]
        logits: mx.array | None
        if lm.fused:
            logits, _ = fused_step(lm.model, last, batch.dec_groups(), [])
        else:
            assert lm.span is not None
            logits, _ = plain_step(lm.model, lm.span, ints(last), batch.dec_groups(), [])
        assert logits is not None
        toks = in_row_order(sample_rows(rows, logits), batch.rids)
        mx.async_eval(toks)
        out[model_id] = Prefetched(list(batch.rids), toks)
    return out
