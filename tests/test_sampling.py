from typing import cast

from exo.nodes.engine.mlxenv import mx
from exo.nodes.engine.sampling import Sampler, SamplingParams, StopMatcher


def test_stop_string_split_across_tokens_is_never_emitted() -> None:
    m = StopMatcher(["END"])
    out = []
    for piece in ["hello E", "N", "D and more"]:
        text, hit = m.feed(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "hello "
    assert hit


def test_held_back_prefix_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    m = StopMatcher(["END"])
    assert m.feed("hello E") == ("hello ", False)
    assert m.feed("X") == ("EX", False)
    assert m.flush() == ""


def test_no_stops_passes_text_through() -> None:
    assert StopMatcher([]).feed("abc") == ("abc", False)


def test_greedy_is_argmax() -> None:
    logits = mx.array([0.1, 3.0, 0.2])
    assert Sampler(SamplingParams(temperature=0)).__call__(logits).item() == 1


def test_seeded_sampling_is_reproducible_and_seeds_differ() -> None:
    logits = mx.random.normal((500,))

    def draw(seed: int) -> list[int]:
        s = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [cast(int, s(logits).item()) for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = mx.log(mx.array([0.6, 0.3, 0.05, 0.05]))
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=1))
    seen = {s(logits).item() for _ in range(200)}
    assert seen == {0, 1}


def test_penalties_bias_top_k_and_min_p_change_what_is_sampled() -> None:
    logits = mx.array([0.0, 3.0, 2.5, 1.0, -1.0])
    biased = Sampler(SamplingParams(temperature=0, logit_bias={4: 100.0}))
    assert biased.own and biased(logits).item() == 4
    pen = Sampler(SamplingParams(temperature=0, frequency_penalty=2.0))
    assert pen(logits).item() == 1
    pen.accept(1)  # 3.0 - 2 = 1.0 < 2.5
    assert pen(logits).item() == 2
    rep = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0))
    rep.accept(1)  # 3.0 / 2 = 1.5 < 2.5
    assert rep(logits).item() == 2
    for seed in range(5):  # top_k 1 and min_p 1: only the best token can be drawn
        assert Sampler(SamplingParams(temperature=1.0, top_k=1, seed=seed))(logits).item() == 1
        assert Sampler(SamplingParams(temperature=1.0, min_p=1.0, seed=seed))(logits).item() == 1
