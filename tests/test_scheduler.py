import pytest

from exo.nodes.engine.scheduler import Pending, plan


def test_decodes_come_first_and_prefill_fills_the_rest_of_the_budget() -> None:
    step = plan(["a", "b"], [Pending("c", 1000)], budget=64)
    assert step.decode == ["a", "b"]
    assert step.prefill == [("c", 62)]


def test_a_long_prompt_is_split_over_steps() -> None:
    remaining, steps = 300, 0
    while remaining:
        step = plan([], [Pending("c", remaining)], budget=128)
        remaining -= step.prefill[0][1]
        steps += 1
    assert steps == 3


def test_several_waiting_prompts_share_the_budget_in_order() -> None:
    step = plan([], [Pending("x", 10), Pending("y", 100), Pending("z", 5)], budget=64)
    assert step.prefill == [("x", 10), ("y", 54)]


def test_a_full_batch_still_gives_prefill_a_minimum_chunk() -> None:
    step = plan([f"r{i}" for i in range(70)], [Pending("new", 500)], budget=64, min_chunk=16)
    assert len(step.decode) == 70
    assert step.prefill == [("new", 16)]


def test_nothing_to_do_is_an_empty_plan() -> None:
    assert plan([], [], budget=64).empty


def test_nnls_recovers_non_negative_costs_and_never_goes_negative() -> None:
    from exo.nodes.engine.scheduler import nnls

    x = [[1.0, n, n * c / 1000] for n, c in [(2, 0), (8, 100), (4, 900), (16, 1500), (3, 2000)]]
    y = [0.01 + 0.002 * r[1] + 0.004 * r[2] for r in x]
    assert nnls(x, y, [1.0] * len(y)) == pytest.approx([0.01, 0.002, 0.004], rel=1e-6)
    # a fit that wants a negative coefficient gets zero there, and the rest refit
    theta = nnls([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]], [0.3, 0.2, 0.1], [1.0] * 3)
    assert theta[1] == 0 and theta[0] == pytest.approx(0.2)


def test_the_chunk_lands_on_a_cheap_row_count() -> None:
    """With OpenBLAS here 16 rows of matmuls cost less than 8: beside 4 decodes
    the chunk is sized to 12 tokens, not the 4 a smooth model would allow."""
    from exo.nodes.engine.scheduler import PrefillCost

    rows = [0.0] + [0.080] * 8 + [0.125] * 7 + [0.074] + [0.110] * 16 + [0.113]
    cost = PrefillCost()
    assert cost.largest(rows, decodes=4, ctx=0, remaining=500, allowance=0.02, cap=1024) == 12
    # those 12 make the step cheaper than the decodes alone: they fit in no allowance
    assert cost.largest(rows, 4, 0, 500, allowance=0.0, cap=1024) == 12
    # without the dip, only the flat part of the table fits
    flat = [0.0] + [0.080] * 8 + [0.125] * 25
    assert cost.largest(flat, 4, 0, 500, allowance=0.02, cap=1024) == 4
    # and the prompt's own remainder caps it
    assert cost.largest(rows, 4, 0, 3, allowance=0.02, cap=1024) == 3


def test_the_learnt_part_shrinks_chunks_as_the_prompt_fills_its_cache() -> None:
    from exo.nodes.engine.scheduler import PrefillCost

    cost = PrefillCost()
    truth = [0.01, 0.001, 0.02]  # per chunk, per token, per token per 1000 keys
    for n, ctx in [(2, 0), (4, 2), (8, 6), (16, 14), (8, 300), (4, 900), (6, 1200), (3, 1500)]:
        feats = [1, n, n * (ctx + n / 2) / 1000]
        cost.observe([], 4, [(n, ctx, 1.0)], sum(t * f for t, f in zip(truth, feats, strict=True)))
    early = cost.largest([], 4, 0, 2000, allowance=0.06, cap=1024)
    late = cost.largest([], 4, 1800, 2000, allowance=0.06, cap=1024)
    assert early > late >= 1
    assert (
        cost.predict([], 4, [(late, 1800, 1.0)])
        <= 0.06
        < cost.predict([], 4, [(late + 1, 1800, 1.0)])
    )


def test_the_chunk_grows_at_most_twofold_past_the_start() -> None:
    from exo.nodes.engine.scheduler import PrefillCost

    cost = PrefillCost(start=16)
    assert cost.largest([], 4, 0, 2000, allowance=1.0, cap=1024) == 16  # nothing learnt yet
    cost.observe([], 4, [(40, 0, 1.0)], 0.01)
    assert cost.largest([], 4, 40, 2000, allowance=1.0, cap=1024) == 80


def test_a_long_prompt_goes_a_few_layers_per_step_in_larger_chunks() -> None:
    """Each chunk pays fixed costs at every layer: beside decodes, a 32-token chunk
    through 5 of 30 layers does 2.7x the work of a whole pass of 2 tokens per step."""
    from exo.nodes.engine.scheduler import PrefillCost

    cost = PrefillCost(last_tokens=10_000)  # trusted everywhere
    cost.theta = [0.03, 0.003, 0.004]  # per chunk, per token, per token per 1000 keys
    whole = cost.largest([], 4, ctx=1800, remaining=2000, allowance=0.06, cap=1024)
    n, k = cost.split([], 4, ctx=1800, remaining=2000, allowance=0.06, layers=30)
    assert (whole, n, k) == (2, 32, 5)
    assert cost.predict([], 4, [(n, 1800, k / 30)]) <= 0.06
    assert cost.predict([], 4, [(n, 1800, (k + 1) / 30)]) > 0.06
    # a chunk part-way through goes on with its tokens, at most to the last layer
    assert cost.split([], 4, 1800, 2000, 0.06, 30, inflight=(16, 27)) == (16, 3)
    assert cost.split([], 4, 1800, 2000, 0.06, 30, inflight=(128, 3)) == (128, 1)
    # nothing fits: the smallest chunk still moves one layer
    assert cost.split([], 4, 1800, 2000, 0.0, 30) == (8, 1)
    # a short remainder goes whole when it fits
    assert cost.split([], 4, 0, 3, 0.06, 30) == (3, 30)


def test_the_layer_split_grows_at_most_twofold_past_the_start() -> None:
    from exo.nodes.engine.scheduler import PrefillCost

    cost = PrefillCost(start=16)
    n, k = cost.split([], 4, 0, 2000, allowance=1.0, layers=30)
    assert n * k == 16 * 30  # nothing learnt yet: the start's token-layers
    cost.observe([], 4, [(64, 0, 7 / 30)], 0.01)
    n, k = cost.split([], 4, 64, 2000, allowance=1.0, layers=30)
    assert n * k <= 2 * 64 * 7 and n * k > 64 * 7


def test_the_margin_is_how_far_steps_lately_ran_past_the_prediction() -> None:
    from exo.nodes.engine.scheduler import PrefillCost

    cost = PrefillCost()
    for i in range(4):  # fitted exactly on 0.01 per token: no miss
        cost.observe([], 4, [(10 + i, 0, 1.0)], 0.001 * (10 + i))
    assert cost.margin() == 0.0
    for i in range(20):  # then one step in ten runs 30 ms over
        n = 10 + i % 5
        cost.observe([], 4, [(n, 0, 1.0)], 0.001 * n + (0.03 if i % 10 == 9 else 0.0))
    assert 0.0 < cost.margin() <= 0.03
    assert cost.margin(q=0.5) < 0.005
