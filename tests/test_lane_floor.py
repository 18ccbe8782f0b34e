"""The prefill lane's progress guarantee: a prompt beside running streams prefills
and joins while they still run, whatever else wants the cores. Counted in the
engine's steps, never seconds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exo.nodes.engine import engine as engine_mod
from exo.nodes.engine.engine import Engine
from exo.nodes.engine.model import load_model
from exo.nodes.engine.threads import ALL, Option
from exo.nodes.engine.watch import FLOOR_STEPS, Watch
from tests.helpers import sp

STREAM = {"temperature": 0.0, "max_tokens": 8000, "ignore_eos": True}
PROMPT = [(i * 7) % 5000 + 10 for i in range(300)]  # two passes of the lane


@pytest.fixture()
def busy() -> Iterator[None]:
    """A busy nice-0 process on every core: what a compile job does to a node."""
    from exo.tools.streams import hog

    hogs = [hog() for _ in range(2)]
    try:
        yield
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def all_threads(*args: Any) -> tuple[Option, int]:
    """The thread choice in its greediest state: every step on every OpenBLAS thread."""
    return Option(ALL, 1), 1


@pytest.mark.parametrize("pressure", ["busy process", "step loop on every BLAS thread"])
def test_a_prompt_beside_streams_prefills_while_they_run_under_contention(
    smollm_path: Path, pressure: str, request: pytest.FixtureRequest, monkeypatch: Any
) -> None:
    engine = Engine(lane=True)
    assert engine.lane is not None
    engine.add_model(load_model("smol", smollm_path))
    streams = [f"s{i}" for i in range(4)]
    for i, rid in enumerate(streams):
        engine.submit(rid, "smol", "completion", [1 + i, 2, 3], sp(STREAM))
    while len(engine.batches["smol"].rids) < 4:
        engine.step()
    if pressure == "busy process":
        request.getfixturevalue("busy")
    else:
        monkeypatch.setattr(engine_mod, "for_step", all_threads)
    engine.submit("long", "smol", "completion", PROMPT, sp({**STREAM, "max_tokens": 1}))
    steps, first_pass, landed = 0, None, None
    while landed is None and steps < 400:
        outs = engine.step()
        steps += 1
        if first_pass is None and engine.lane.passes:
            first_pass = steps
        if any(o.rid == "long" for o in outs):
            landed = steps
    assert landed is not None, (steps, engine.lane.layers, engine.watch.status())
    # the streams still ran, every one of them, when the prompt's token came
    assert set(streams) <= set(engine.batches["smol"].rids)
    layers = len(engine.models["smol"].model.model.layers)
    # Its first pass: at most FLOOR_STEPS steps of waiting for each layer at worst,
    # and in practice far less once the pass runs at the step loop's priority.
    assert first_pass is not None and first_pass <= FLOOR_STEPS * layers, engine.watch.status()
    print(f"{pressure}: first pass after {first_pass} steps, token after {landed}; ", end="")
    print(engine.watch.status())
    for rid in streams:
        engine.cancel(rid)
    engine.close()


class FakeLane:
    """What Watch reads of a lane: layers done, work in hand, urgency."""

    def __init__(self) -> None:
        self.layers = 0
        self.urgent = False
        self.hurried = 0
        self.work = True
        self.best_rate = 0.0
        self.rate = 0.0
        self.chunk = 256
        self.passes = 0
        self.paused = False
        self.prompts: list[dict[str, Any]] = []

    def idle(self) -> bool:
        return not self.work

    def hurry(self) -> None:
        self.urgent, self.hurried = True, self.hurried + 1

    def progress(self) -> list[dict[str, Any]]:
        return self.prompts


def test_the_floor_hurries_a_lane_that_finishes_no_layer_in_floor_steps() -> None:
    lane = FakeLane()
    watch = Watch(lane)  # type: ignore[arg-type]
    for _ in range(FLOOR_STEPS - 1):
        watch.check()
        lane.layers += 1  # a layer every step: on its pace
    assert not lane.urgent
    for _ in range(FLOOR_STEPS):
        watch.check()
    assert not lane.urgent
    watch.check()
    assert lane.urgent and lane.hurried == 1
    lane.work = False
    watch.check()
    assert watch.steps == 0


def test_a_prompt_behind_its_ttft_pace_makes_the_streams_give() -> None:
    lane = FakeLane()
    lane.best_rate = 30 * 1000.0  # token-layers/s: 1,000 tokens/s through 30 layers
    watch = Watch(lane, max_ttft_ratio=3.0)  # type: ignore[arg-type]
    # a full pass of 256 tokens alone: 0.256 s; x3 for each pass had, plus one
    lane.prompts = [{"rid": "p", "done": 0, "total": 2000, "waited_s": 0.7, "layers": 30}]
    assert not watch.check() and watch.status()["gives"] is None
    lane.prompts[0]["waited_s"] = 0.8
    assert not watch.check() and lane.urgent  # behind: first the lane is hurried
    assert watch.check() and watch.status()["gives"] == "max_stall"  # still: streams give
    lane.prompts[0].update(done=1024, waited_s=3.5)  # 5 passes: 3.84 s allowed
    assert not watch.check() and watch.status()["gives"] is None
    # a short prompt is held to a whole pass, not to its few tokens' share of one
    lane.prompts = [{"rid": "s", "done": 0, "total": 5, "waited_s": 0.7, "layers": 30}]
    assert not watch.check()
    lane.best_rate = 0.0  # nothing measured yet: no pace to hold it to
    lane.prompts[0]["waited_s"] = 100.0
    assert not watch.check()


def test_a_pass_hurried_mid_way_after_a_cancel_lands_its_other_prompts_right(
    tiny_path: Path,
) -> None:
    """Two prompts share a pass; one is cancelled while the lane is held between
    layers, then the pass moves to the nice-0 thread: the other lands with the
    tokens it gets alone."""
    stream = {"max_tokens": 400, "temperature": 0, "ignore_eos": True}
    engine = Engine(lane=True)
    engine.add_model(load_model("tiny", tiny_path))
    lane = engine.lane
    assert lane is not None
    alone = Engine(lane=False)
    alone.add_model(load_model("tiny", tiny_path))
    alone.submit("ref", "tiny", "completion", list(range(3, 40)), sp({**stream, "max_tokens": 4}))
    want: list[int] = []
    while alone.requests or not want:
        want += [i for o in alone.step() for i in o.ids]
    engine.submit("s0", "tiny", "completion", [5, 6], sp(stream))
    engine.step()
    lane.pause()  # held before its next layer
    engine.submit("a", "tiny", "completion", list(range(3, 40)), sp({**stream, "max_tokens": 4}))
    engine.submit("b", "tiny", "completion", list(range(50, 90)), sp({**stream, "max_tokens": 4}))
    engine.step()  # both go to the lane, in one pass
    assert engine.cancel("b")
    lane.hurry()
    lane.resume()
    got: list[int] = []
    for _ in range(500):
        outs = engine.step()
        got += [i for o in outs if o.rid == "a" for i in o.ids]
        if "a" not in engine.requests and got:
            break
        if not outs:
            lane.wait(1.0)
    assert got == want and lane.hurried == 1
    engine.cancel("s0")
    engine.close()
