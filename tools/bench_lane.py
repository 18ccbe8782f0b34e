"""`exo-tools bench lane`: what the prefill lane costs the streams decoding beside it.

Streams decode in the node's engine, run here in this process as exo-node runs it
(its memory limits, huge pages), while a long prompt is in the lane. The lane is
held and let go in alternating blocks of steps, so the streams' steps with it
working and with it held come from the same minutes: this machine's speed drifts
by 10-20% over tens of seconds, more than the effect, and runs one after the
other cannot tell them apart. Held, the lane keeps OpenBLAS at one thread as
when it works, so the ratio is the lane's work alone; the steps before the
prompt (OpenBLAS's threads all in use) are shown beside it.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from exo.common.sampling import SamplingParams

if TYPE_CHECKING:
    from exo.nodes.engine.engine import Engine
    from exo.nodes.engine.lane import Lane


def _steps(engine: Engine, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        engine.step()
        out.append(time.perf_counter() - t)
    return out


def run(
    model_path: Path,
    model_id: str,
    streams: int = 4,
    long_n: int = 2048,
    blocks: int = 16,
    block_steps: int = 7,
) -> dict[str, Any]:
    import psutil

    from exo.nodes.engine.engine import Engine
    from exo.nodes.engine.model import load_model
    from exo.nodes.machine import memory
    from exo.tools.streams import long_prompt

    lm = load_model(model_id, model_path)
    engine = Engine()  # the lane where exo-node would have one
    engine.add_model(lm)
    lane = engine.lane
    if lane is None:
        raise RuntimeError("no prefill lane here (it runs on MLX's CPU backend with 2+ cores)")
    memory.apply(memory.limits([lm.nbytes], engine.kv_budget, psutil.virtual_memory().total))
    # the streams decode throughout: as long as the model's context allows
    params = SamplingParams(max_tokens=lm.context - 64, temperature=0, ignore_eos=True)
    for i in range(streams):
        ids = lm.tokenizer.encode(f"Story number {i}:")
        engine.submit(f"s{i}", model_id, "completion", ids, params)
    _steps(engine, 10)  # the streams join and settle
    before = _steps(engine, 12)
    lane.pause()
    long = long_prompt(lm.tokenizer, long_n)
    engine.submit(
        "long", model_id, "completion", long, msgspec.structs.replace(params, max_tokens=16)
    )
    engine.step()  # hands it to the lane
    held, working, work_s, prefilled = _blocks(engine, lane, blocks, block_steps, long_n)
    engine.close()
    if not working or not held:
        raise RuntimeError("the long prompt left the lane before a block of each kind")
    base, off, on_ = (statistics.median(x) for x in (before, held, working))
    return {
        "streams": streams,
        "long_tokens": long_n,
        "step_before_s": base,
        "step_held_s": off,
        "step_working_s": on_,
        "working_over_held": on_ / off,
        "held_over_before": off / base,
        "max_working_over_before": max(working) / base,
        "max_held_over_before": max(held) / base,
        "steps_working": len(working),
        "steps_held": len(held),
        "lane_tokens_per_s": prefilled / work_s if work_s else 0.0,
    }


def _blocks(
    engine: Engine, lane: Lane, blocks: int, block_steps: int, long_n: int
) -> tuple[list[float], list[float], float, int]:
    """Blocks of steps with the lane held and working in turn, until the long prompt
    lands: (held step times, working step times, working seconds, tokens prefilled)."""
    held: list[float] = []
    working: list[float] = []
    work_s = 0.0
    prefilled = 0
    for b in range(blocks):
        on = b % 2 == 1
        if on:
            lane.resume()
        else:
            lane.pause()
        t0 = time.perf_counter()
        # A block's first step may still see the other state (the layer in hand).
        (working if on else held).extend(_steps(engine, block_steps)[1:])
        if on:
            work_s += time.perf_counter() - t0
        req = engine.requests.get("long")
        prefilled = req.prefilled if req is not None else long_n
        if req is None or not req.in_lane:
            break  # landed: the rest would not be the lane's
    return held, working, work_s, prefilled


def report(r: dict[str, Any]) -> None:
    ms = 1e3
    print(f"{r['streams']} streams decoding, a {r['long_tokens']}-token prompt in the lane")
    print(f"{'':34}{'median step ms':>16}{'max / before':>14}")
    print(f"{'before the prompt (all BLAS threads)':34}{r['step_before_s'] * ms:16.0f}{'':>14}")
    print(
        f"{'lane held':34}{r['step_held_s'] * ms:16.0f}{r['max_held_over_before']:14.2f}"
        f"   ({r['steps_held']} steps)"
    )
    print(
        f"{'lane working':34}{r['step_working_s'] * ms:16.0f}"
        f"{r['max_working_over_before']:14.2f}   ({r['steps_working']} steps)"
    )
    print(
        f"working / held {r['working_over_held']:.2f}, held / before {r['held_over_before']:.2f}; "
        f"the lane prefilled {r['lane_tokens_per_s']:.0f} tokens/s while working"
    )
