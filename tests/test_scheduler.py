from exo.nodes.scheduler import Pending, plan


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
