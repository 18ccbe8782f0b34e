"""OpenBLAS's threads for decode-only steps (nodes/engine/threads.py), and the engine using them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from exo.nodes.engine.engine import Engine
from exo.nodes.engine.mlxenv import blas_max_threads, blas_threads_now, ints, mx
from exo.nodes.engine.model import load_model
from exo.nodes.engine.threads import (
    EARLY,
    OPTIONS,
    PAD_ROWS,
    SAMPLES,
    Option,
    ThreadChoice,
    contenders,
    distinct,
    for_step,
    pick,
)
from tests.helpers import sp

ONE, SPREAD, SPREAD8 = OPTIONS


def test_choices_alternate_until_each_has_its_samples_then_the_lower_median_wins() -> None:
    times: dict[Option, list[float]] = {}
    seen = []
    for _ in range(3 * SAMPLES):
        o = pick(times, OPTIONS)
        seen.append(o)
        times.setdefault(o, []).append({ONE: 0.12, SPREAD: 0.13, SPREAD8: 0.10}[o])
    assert seen == [ONE, SPREAD, SPREAD8] * SAMPLES
    assert pick(times, OPTIONS) == SPREAD8
    # one slow step (a join, a hiccup of the machine) does not decide it
    slow_once = [0.10] * (SAMPLES - 1) + [0.50]
    assert pick({ONE: slow_once, SPREAD: [0.12] * SAMPLES}, (ONE, SPREAD)) == ONE
    assert pick({ONE: [0.15] * SAMPLES, SPREAD: [0.30] + [0.12] * 4}, (ONE, SPREAD)) == SPREAD


def test_options_that_change_nothing_for_a_batch_size_are_tried_once() -> None:
    assert Option(1, PAD_ROWS) == ONE and [ONE.rows(n) for n in (1, 4, 5)] == [4, 4, 8]
    assert [SPREAD8.rows(n) for n in (3, 8, 13, 16)] == [8, 8, 16, 16]
    assert distinct(OPTIONS, 12) == OPTIONS
    assert distinct(OPTIONS, 16) == (ONE, SPREAD)  # 16 rows are a multiple of 8 already
    c = ThreadChoice()
    for _ in range(SAMPLES):
        for o in (ONE, SPREAD):
            assert c.pick(16) == o
            c.learn(16, o, 0.12 if o == ONE else 0.1)
    assert c.chosen == {16: SPREAD}


def test_an_option_far_slower_in_every_step_stops_being_tried_early() -> None:
    assert EARLY < SAMPLES
    slow = {ONE: [0.10] * EARLY, SPREAD: [0.16, 0.17], SPREAD8: [0.11, 0.10]}
    assert contenders(slow, OPTIONS) == (ONE, SPREAD8)
    # one spike is the machine's, not the option's: still tried
    spike = {ONE: [0.10] * EARLY, SPREAD: [0.50, 0.12], SPREAD8: [0.11, 0.10]}
    assert contenders(spike, OPTIONS) == OPTIONS
    assert contenders({ONE: [0.1], SPREAD: [0.9] * 3}, OPTIONS) == OPTIONS  # too few yet
    c = ThreadChoice()
    seen = []
    while 1 not in c.chosen:
        o = c.pick(1)
        seen.append(o)
        c.learn(1, o, 0.10 if o == ONE else 0.16)
    assert seen == [ONE, SPREAD, SPREAD8] * EARLY and c.chosen[1] == ONE


def test_a_choice_once_made_stays_for_that_batch_size_only() -> None:
    c = ThreadChoice()
    for _ in range(SAMPLES):
        for o in OPTIONS:
            assert c.pick(4) == o
            c.learn(4, o, 0.1 if o == SPREAD else 0.12)
    assert c.chosen == {4: SPREAD}
    # later steps grow slower with the streams' context: the choice holds
    for _ in range(10):
        c.learn(4, SPREAD, 1.0)
    assert c.pick(4) == SPREAD and c.chosen == {4: SPREAD}
    assert 5 not in c.chosen and c.pick(5) == SPREAD  # a size near it: as 4 until it settles
    assert c.pick(8) == ONE  # one further off is explored at once


def test_a_new_size_runs_as_its_nearest_chosen_neighbour_until_it_settles() -> None:
    c = ThreadChoice(settle=3)
    assert c.pick(4) == ONE  # nothing chosen yet: the first size is explored at once
    c.chosen.update({2: SPREAD, 8: ONE})
    # within NEAR (2) rows of a chosen size, the nearest's (the smaller on a tie)
    assert [c.pick(n) for n in (1, 3, 4, 6, 10)] == [SPREAD, SPREAD, SPREAD, ONE, ONE]
    c.chosen[8] = SPREAD8
    assert [c.pick(n) for n in (5, 6, 11)] == [ONE, SPREAD8, ONE]  # 5, 11: none near
    c.chosen[8] = ONE
    # a size that comes and goes (a prompt decoding beside the streams) is never explored
    for _ in range(2):
        assert c.pick(6) == ONE
        c.learn(6, ONE, 0.3)
    assert c.times == {} and c.pick(6) == ONE
    # once it has stayed `settle` steps, it is explored as the first size was
    c.learn(6, ONE, 0.3)
    seen = []
    for _ in range(3 * SAMPLES):
        o = c.pick(6)
        seen.append(o)
        c.learn(6, o, 0.10 if o == SPREAD8 else 0.12)
    assert seen == [ONE, SPREAD, SPREAD8] * SAMPLES
    assert c.chosen[6] == SPREAD8 and 6 not in c.seen


def test_a_step_pads_its_decode_rows_as_its_option_says_and_only_decodes() -> None:
    c = ThreadChoice()
    c.chosen.update({3: ONE, 5: SPREAD, 13: SPREAD8})
    assert for_step(c, 3, True, False, 2) == (ONE, PAD_ROWS)
    assert for_step(c, 5, True, False, 2) == (SPREAD, 1)
    assert for_step(c, 13, True, False, 2) == (SPREAD8, 8)
    assert for_step(c, 3, False, False, 2) == (SPREAD, 1)  # a prompt in the step: all threads
    # the lane holds OpenBLAS to one thread: left as it is, and decodes padded
    assert for_step(c, 5, True, True, 2) == (None, PAD_ROWS)
    assert for_step(None, 5, True, False, 1) == (None, PAD_ROWS)  # OpenBLAS with one thread
    assert for_step(None, 5, True, False, 0) == (None, 1)  # no OpenBLAS: nothing known


def test_the_engine_runs_decode_steps_with_the_chosen_threads(tiny_path: Path) -> None:
    engine = Engine(lane=False)
    engine.add_model(load_model("tiny", tiny_path))
    if blas_max_threads() < 2:  # nothing to choose between: the engine does not try
        assert engine.threads is None
        return
    assert engine.threads is not None
    params = {"max_tokens": 200, "temperature": 0, "ignore_eos": True}
    for i in range(2):
        engine.submit(f"s{i}", "tiny", "completion", [5 + i, 6, 7], sp(params))
    engine.step()  # both prefill in this step: all threads
    assert blas_threads_now() == blas_max_threads()
    used = []
    for _ in range(3 * SAMPLES):
        engine.step()
        used.append(blas_threads_now())
        if 2 in engine.threads.chosen:
            break
    # each in turn (one far slower in every step may drop out after EARLY turns)
    assert used[: 3 * EARLY] == [1, blas_max_threads(), blas_max_threads()] * EARLY
    assert set(engine.threads.chosen) == {2}
    o = engine.threads.chosen[2]
    assert engine.status()["blas_threads"] == {
        "2": {"threads": o.threads or blas_max_threads(), "rows": o.rows(2)}
    }
    engine.threads.chosen[2] = ONE
    engine.step()
    assert blas_threads_now() == 1
    # a step carrying a prompt gets every thread
    engine.submit("p", "tiny", "completion", list(range(3, 40)), sp({**params, "max_tokens": 2}))
    engine.step()
    assert [r for r, _ in engine.last_plan.prefill] == ["p"]
    assert blas_threads_now() == blas_max_threads()


@pytest.mark.parametrize("rows", [1, 3, 5])
def test_padded_decode_rows_give_the_same_logits(rows: int, smollm_path: Path) -> None:
    from mlx_lm.models.cache import KVCache

    from exo.nodes.engine.forward import fused_step

    lm = load_model("smollm", smollm_path)
    out = {}
    for pad_to in (1, 4, 8):
        caches = [KVCache() for _ in lm.model.layers]
        toks = [5 + i for i in range(rows)]
        logits = None
        for _ in range(3):  # a few steps, so the rows attend over keys of their own
            logits, _ = fused_step(lm.model, toks, [(rows, caches)], [], pad_to)
            assert logits is not None and logits.shape[0] == rows
            toks = ints(logits.argmax(-1))
        assert logits is not None
        out[pad_to] = logits
    assert mx.allclose(out[1], out[4], atol=1e-4).item()
    assert mx.allclose(out[1], out[8], atol=1e-4).item()


def test_a_decode_step_on_one_thread_pads_its_rows_to_four(
    tiny_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import exo.nodes.engine.forward as fw

    seen: list[int] = []
    orig = fw.step_forward

    def spy(*args: Any) -> Any:  # the engine imports step_forward at each step
        seen.append(args[5] if len(args) > 5 else 1)
        return orig(*args)

    monkeypatch.setattr(fw, "step_forward", spy)
    engine = Engine(lane=False)
    engine.add_model(load_model("tiny", tiny_path))
    params = {"max_tokens": 50, "temperature": 0, "ignore_eos": True}
    for i in range(3):
        engine.submit(f"s{i}", "tiny", "completion", [5 + i, 6, 7], sp(params))
    engine.step()
    assert engine.threads is not None  # OpenBLAS with 2 threads, as CI's machine has
    for o in OPTIONS:
        engine.threads.chosen[3] = o
        engine.step()
    assert seen[-3:] == [4, 1, 8] and seen[0] == 1  # the prompts' step is never padded
