"""The engine's step loop: continuous batching, chunked prefill, admission, cancel."""

from __future__ import annotations

import select
from pathlib import Path

import pytest

from exo.nodes.engine.engine import Engine
from exo.nodes.engine.mlxenv import mx
from exo.nodes.engine.model import LoadedModel, load_model
from exo.nodes.engine.request import EngineError
from tests.helpers import sp

PROMPTS = [
    "What is the capital of France?",
    "Tell me a story about a long journey across the sea, with ships, sailors and storms. " * 3,
    "Hi",
    "List five fruits.",
]


@pytest.fixture(scope="module", params=["tiny", "smollm"])
def lm(request: pytest.FixtureRequest, tiny_path: Path, smollm_path: Path) -> LoadedModel:
    return load_model(request.param, tiny_path if request.param == "tiny" else smollm_path)


def alone(lm: LoadedModel, prompt: list[int], n: int, **params) -> list[int]:
    """mlx-lm's own greedy loop, the reference a batched request must equal."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    out = []
    for t, _ in generate_step(mx.array(prompt), lm.model, max_tokens=n, sampler=make_sampler(0.0)):
        if int(t) in lm.eos:
            break
        out.append(int(t))
    return out


def run(
    engine: Engine,
    arrivals: dict[int, list[tuple]],
    max_steps: int = 2000,
    beside: set[str] | None = None,
) -> tuple[dict[str, list[int]], list[dict]]:
    """Submit (rid, model, kind, payload, params) at the given steps; collect ids and
    per-step outputs; `beside` collects the requests that arrived while rows decoded."""
    ids: dict[str, list[int]] = {}
    steps: list[dict] = []
    for step in range(max_steps):
        for args in arrivals.get(step, []):
            if beside is not None and any(b.rids for b in engine.batches.values()):
                beside.add(args[0])
            rid, model, kind, payload, params = args
            engine.submit(rid, model, kind, payload, sp(params))
            ids[args[0]] = []
        outs = engine.step()
        plan = engine.last_plan
        steps.append(
            {
                "outs": {o.rid: o for o in outs},
                "decode": list(plan.decode),
                "prefill": list(plan.prefill),
                "spans": dict(plan.spans),
            }
        )
        for o in outs:
            ids[o.rid].extend(o.ids)
        if not outs and engine.lane is not None:
            engine.lane.wait(5.0)  # every prompt left is the lane's
        if step > max(arrivals) and not engine.requests and not engine.queue:
            return ids, steps
    raise AssertionError("engine did not finish")


def beside_streams(
    streams: int, at: int, prompt: list[int], params: dict, tokens: int
) -> dict[int, list[tuple]]:
    """Arrivals: `streams` short streams at step 0, then a "long" prompt at step `at`."""
    return {
        0: [(f"s{i}", "tiny", "completion", [5 + i, 6, 7], params) for i in range(streams)],
        at: [("long", "tiny", "completion", prompt, {**params, "max_tokens": tokens})],
    }


@pytest.mark.parametrize("path", ["fused", "lane", "plain"])
def test_staggered_concurrent_requests_equal_each_run_alone(
    lm: LoadedModel, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if path == "plain":  # mlx-lm's own forward, as for architectures the fused step lacks
        monkeypatch.setattr(lm, "fused", False)
    lane = path == "lane"
    engine = Engine(prefill_budget=16, lane=lane)
    engine.add_model(lm)
    assert engine.models[lm.model_id].fused == (path != "plain")
    lengths = [30, 25, 40, 20]
    arrivals: dict[int, list[tuple]] = {}
    for i, (text, n, at) in enumerate(zip(PROMPTS, lengths, [0, 3, 5, 9], strict=True)):
        arrivals.setdefault(at, []).append(
            (
                f"r{i}",
                lm.model_id,
                "chat",
                [{"role": "user", "content": text}],
                {"max_tokens": n, "temperature": 0},
            )
        )
    beside: set[str] = set()
    ids, _ = run(engine, arrivals, beside=beside)
    for i, (text, n) in enumerate(zip(PROMPTS, lengths, strict=True)):
        prompt = lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True
        )
        assert ids[f"r{i}"] == alone(lm, prompt, n), f"r{i}"
    assert engine.kv_bytes() == 0
    assert beside  # later arrivals came while others decoded
    if lane:
        # Those went to the lane; so may one that arrived alone and began in the
        # step, once rows joined: how many depends on the lane's pace.
        assert engine.lane is not None and engine.lane.prompts >= len(beside)


def test_a_long_prompt_is_chunked_while_every_stream_gets_a_token_each_step(
    tiny_path: Path,
) -> None:
    lm = load_model("tiny", tiny_path)
    engine = Engine(prefill_budget=32, lane=False)
    engine.add_model(lm)
    params = {"max_tokens": 200, "temperature": 0, "ignore_eos": True}
    long_prompt = list(range(3, 203))  # 200 tokens, budget 32 -> at least 7 steps of prefill
    arrivals = beside_streams(3, 4, long_prompt, params, 5)
    _, steps = run(engine, arrivals)
    prefill_steps = [s for s in steps if any(rid == "long" for rid, _ in s["prefill"])]
    assert len(prefill_steps) >= 200 // 32
    for s in prefill_steps:
        assert sum(n for _, n in s["prefill"]) + len(s["decode"]) <= 32
        # every running stream got exactly one token out in this very step
        assert {f"s{i}" for i in range(3)} <= set(s["outs"]), s


def test_a_seeded_request_is_reproducible_inside_a_batch(tiny_path: Path) -> None:
    lm = load_model("tiny", tiny_path)
    sampled = {"max_tokens": 20, "temperature": 1.0, "top_p": 0.9, "seed": 42, "ignore_eos": True}
    e1 = Engine()
    e1.add_model(lm)
    solo, _ = run(e1, {0: [("x", "tiny", "completion", [9, 10, 11], sampled)]})
    e2 = Engine()
    e2.add_model(lm)
    others = [
        (f"o{i}", "tiny", "completion", [20 + i], {"max_tokens": 30, "temperature": 1.0})
        for i in range(3)
    ]
    batched, _ = run(e2, {0: others, 2: [("x", "tiny", "completion", [9, 10, 11], sampled)]})
    assert batched["x"] == solo["x"]


def test_requests_beyond_the_kv_budget_wait_in_a_queue(tiny_path: Path) -> None:
    lm = load_model("tiny", tiny_path)
    from exo.nodes.engine.model import kv_bytes_per_token

    per_request = (3 + 20) * kv_bytes_per_token(lm.model)
    engine = Engine(kv_budget=int(per_request * 1.5))
    engine.add_model(lm)
    params = {"max_tokens": 20, "temperature": 0, "ignore_eos": True}
    engine.submit("a", "tiny", "completion", [5, 6, 7], sp(params))
    engine.submit("b", "tiny", "completion", [8, 9, 10], sp(params))
    assert engine.status()["queued"] == 1 and list(engine.requests) == ["a"]
    done: dict[str, int] = {}
    for _ in range(100):
        for o in engine.step():
            done[o.rid] = done.get(o.rid, 0) + len(o.ids)
        if not engine.requests and not engine.queue:
            break
    assert done == {"a": 20, "b": 20}
    with pytest.raises(EngineError) as e:
        engine.submit("huge", "tiny", "completion", [5], sp({"max_tokens": 900}))
    assert e.value.status == 400


def test_cancel_frees_the_kv_cache_at_any_stage(tiny_path: Path) -> None:
    lm = load_model("tiny", tiny_path)
    engine = Engine(prefill_budget=16)
    engine.add_model(lm)
    params = {"max_tokens": 100, "temperature": 0, "ignore_eos": True}
    engine.submit("dec", "tiny", "completion", [5, 6], sp(params))
    for _ in range(3):
        engine.step()
    engine.submit("pre", "tiny", "completion", list(range(3, 200)), sp(params))
    engine.step()
    assert engine.status()["running"] == 1 and engine.status()["prefilling"] == 1
    assert engine.kv_bytes() > 0
    assert engine.cancel("pre") and engine.cancel("dec")
    assert not engine.cancel("dec")
    assert engine.kv_bytes() == 0 and engine.status()["running"] == 0
    assert engine.step() == []


def test_a_forgotten_node_cancels_what_it_held_not_what_came_since(tiny_path: Path) -> None:
    """The broker forgot the node (restarted): the requests it gave before are
    nobody's, running or queued; one the restarted broker sent since, even before
    the node heard the news, goes on (it was once cancelled and never answered)."""
    import time

    from exo.nodes.engine.model import kv_bytes_per_token

    lm = load_model("tiny", tiny_path)
    engine = Engine(kv_budget=int((3 + 20) * kv_bytes_per_token(lm.model) * 1.5))
    engine.add_model(lm)
    params = sp({"max_tokens": 20, "temperature": 0, "ignore_eos": True})
    engine.submit("running", "tiny", "completion", [5, 6, 7], params)
    engine.submit("queued", "tiny", "completion", [8, 9, 10], params)
    engine.step()
    assert list(engine.requests) == ["running"] and engine.status()["queued"] == 1
    forgotten_at = time.perf_counter()
    engine.submit("since", "tiny", "completion", [4, 5, 6], params)
    assert sorted(engine.cancel_before(forgotten_at)) == ["queued", "running"]
    assert engine.holds("since") and not engine.holds("running")
    ids: list[int] = []
    for _ in range(100):
        ids += [t for o in engine.step() if o.rid == "since" for t in o.ids]
        if not engine.requests and not engine.queue:
            break
    assert len(ids) == 20


@pytest.fixture
def queue_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode steps queued one ahead, as on a GPU (off on MLX's CPU backend)."""
    monkeypatch.setattr("exo.nodes.engine.engine.QUEUE_AHEAD", True)


def test_a_cancel_between_steps_leaves_the_queued_next_step_right_for_the_others(
    tiny_path: Path, queue_ahead: None
) -> None:
    """Pure decode steps are queued one ahead (async eval); a cancel in between
    must drop exactly that row from the queued step (and follow the rows that
    move: the batch's last row takes the cancelled one's place)."""
    lm = load_model("tiny", tiny_path)
    params = {"max_tokens": 40, "temperature": 0, "ignore_eos": True}
    engine = Engine()
    engine.add_model(lm)
    prompts = {"a": [5, 6], "b": [7, 8, 9], "c": [10], "d": [11, 12]}
    ids: dict[str, list[int]] = {rid: [] for rid in prompts}
    for rid, prompt in prompts.items():
        engine.submit(rid, "tiny", "completion", prompt, sp(params))
    for step in range(100):
        if step == 10:
            assert engine.prefetched  # a decode step is queued ahead
            engine.cancel("b")
            assert engine.batches["tiny"].rids == ["a", "d", "c"]
        for o in engine.step():
            ids[o.rid].extend(o.ids)
        if not engine.requests:
            break
    for rid in "acd":
        assert ids[rid] == alone(lm, prompts[rid], 40), rid
    assert len(ids["b"]) < 40 and ids["b"] == alone(lm, [7, 8, 9], 40)[: len(ids["b"])]
    assert engine.kv_bytes() == 0 and not engine.prefetched


def test_measured_budget_keeps_streams_stepping_and_remeasures_them(tiny_path: Path) -> None:
    """No fixed budget: chunks are sized from the measured step costs. Every
    stream still gets a token each step, and while the prompt prefills a
    decode-only step comes at least every DECODE_EVERY + 1 steps, so the
    baseline the allowance is a share of stays measured."""
    from exo.nodes.engine.pacing import DECODE_EVERY

    lm = load_model("tiny", tiny_path)
    engine = Engine(max_stall=1.1, lane=False)  # small chunks: many steps of prefill
    engine.add_model(lm)
    assert len(engine.pace.tables["tiny"]) == 65  # the matmul cost table, measured at load
    params = {"max_tokens": 400, "temperature": 0, "ignore_eos": True}
    long_prompt = [3 + i % 200 for i in range(600)]
    arrivals = beside_streams(3, 6, long_prompt, params, 2)
    _, steps = run(engine, arrivals)
    first = next(i for i, s in enumerate(steps) if any(r == "long" for r, _ in s["prefill"]))
    last = max(i for i, s in enumerate(steps) if any(r == "long" for r, _ in s["prefill"]))
    window = steps[first : last + 1]
    # every prompt token went through every layer once, whether a chunk took one
    # step or went a few layers per step
    layers = lm.layers
    done = sum(
        n * (lambda a, b: b - a)(*s["spans"].get(r, (0, layers)))
        for s in window
        for r, n in s["prefill"]
        if r == "long"
    )
    assert done == len(long_prompt) * layers
    assert len([s for s in window if s["prefill"]]) > 2 * DECODE_EVERY, len(window)
    for s in window:
        assert {f"s{i}" for i in range(3)} <= set(s["outs"]), s
    runs, current = [], 0
    for s in window:
        current = current + 1 if s["prefill"] else 0
        runs.append(current)
    assert max(runs) <= DECODE_EVERY + 1
    assert any(not s["prefill"] for s in window)


def test_a_prompt_cache_is_allocated_once_for_the_whole_prompt(tiny_path: Path) -> None:
    lm = load_model("tiny", tiny_path)
    engine = Engine(idle_budget=64)
    engine.add_model(lm)
    req = engine.submit(
        "r", "tiny", "completion", [3 + i % 200 for i in range(600)], sp({"max_tokens": 1})
    )
    engine.step()
    assert req.cache is not None and 0 < req.prefilled < 600
    assert req.cache[0].keys.shape[2] == 768  # 600 rounded up to the cache's 256 steps


def test_a_chunk_split_across_layers_gives_the_logits_of_one_pass(smollm_path: Path) -> None:
    from mlx_lm.models.cache import make_prompt_cache

    from exo.nodes.engine.forward import Chunk, fused_step

    lm = load_model("smollm", smollm_path)
    prompt = list(range(100, 190))
    whole, split = make_prompt_cache(lm.model), make_prompt_cache(lm.model)
    _, (ref,) = fused_step(lm.model, [], [], [Chunk(prompt, whole, True)])
    h = None
    for first, end in [(0, 7), (7, 8), (8, 20), (20, 30)]:
        _, (h,) = fused_step(lm.model, [], [], [Chunk(prompt, split, end == 30, first, end, h)])
        assert h is not None
        mx.eval(h)
        # layers past the span have not seen the chunk yet
        assert [c.offset for c in split] == [90] * end + [0] * (30 - end)
    assert ref is not None and h is not None and h.shape == ref.shape
    assert mx.allclose(h, ref, atol=1e-3).item()


def test_a_prompt_going_a_layer_per_step_beside_streams_equals_it_run_alone(
    tiny_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunk sizes and layer spans are the cost model's choice; here it is
    made to take one layer per step, to check the outputs and the step structure."""
    lm = load_model("tiny", tiny_path)
    engine = Engine(lane=False)
    engine.add_model(lm)

    def one_layer(*args: object, inflight: tuple[int, int] | None = None) -> tuple[int, int]:
        return (inflight[0] if inflight else min(24, int(args[3]))), 1

    monkeypatch.setattr(engine.pace.cost, "split", one_layer)
    params = {"max_tokens": 60, "temperature": 0, "ignore_eos": True}
    long_prompt = [3 + i % 200 for i in range(100)]
    arrivals = beside_streams(3, 4, long_prompt, params, 8)
    ids, steps = run(engine, arrivals)
    assert ids["long"] == alone(lm, long_prompt, 8)
    for i in range(3):
        assert ids[f"s{i}"] == alone(lm, [5 + i, 6, 7], 60)
    spans = [s["spans"]["long"] for s in steps if "long" in s["spans"]]
    # 100 tokens in chunks of 24 (the last 4), each through 4 layers one at a time
    assert spans == [(k, k + 1) for k in range(4)] * 5
    for s in steps:
        if "long" in s["spans"]:
            assert {f"s{i}" for i in range(3)} <= set(s["outs"]), s


def test_a_cancel_mid_chunk_frees_its_cache_and_state(tiny_path: Path) -> None:
    lm = load_model("tiny", tiny_path)
    engine = Engine(lane=False)
    engine.add_model(lm)
    engine.pace.cost.split = lambda *a, inflight=None: (inflight[0] if inflight else 16, 1)  # type: ignore[method-assign]
    params = {"max_tokens": 100, "temperature": 0, "ignore_eos": True}
    engine.submit("s", "tiny", "completion", [5, 6, 7], sp(params))
    for _ in range(3):
        engine.step()
    long = engine.submit("long", "tiny", "completion", list(range(3, 203)), sp(params))
    while not long.inflight:
        engine.step()
    assert long.h is not None and long.through and long.prefilled == 0
    assert engine.cancel("long")
    assert long.h is None and long.cache is None and "long" not in engine.requests
    engine.step()
    assert engine.status()["prefilling"] == 0


def test_the_batch_cache_grows_a_layer_per_step_ahead_of_need(tiny_path: Path) -> None:
    """No step copies every layer's cache at once (a freeze every 256 tokens);
    the outputs of rows that cross the cache's size stay those of each alone."""
    lm = load_model("tiny", tiny_path)
    engine = Engine(prefill_budget=512)
    engine.add_model(lm)
    params = {"max_tokens": 40, "temperature": 0, "ignore_eos": True}
    prompts = {"a": [3 + i % 100 for i in range(230)], "b": [7 + i % 50 for i in range(200)]}
    for rid, p in prompts.items():
        engine.submit(rid, "tiny", "completion", p, sp(params))
    ids: dict[str, list[int]] = {"a": [], "b": []}
    sizes: list[list[int]] = []
    while engine.requests:
        for o in engine.step():
            ids[o.rid].extend(o.ids)
        cache = engine.batches["tiny"].cache
        if cache is not None:
            sizes.append([c.keys.shape[2] for c in cache])
    for prev, cur in zip(sizes, sizes[1:], strict=False):
        assert sum(b > a for a, b in zip(prev, cur, strict=True)) <= 1, (prev, cur)
    assert max(max(s) for s in sizes) > 256  # it did grow
    for rid, p in prompts.items():
        assert ids[rid] == alone(lm, p, 40)


def test_short_prompts_arriving_together_beside_streams_start_in_one_step(
    tiny_path: Path,
) -> None:
    """Layer-wise prefill is for a prompt too long for one step; prompts that fit
    whole share a step as before (8 new streams must not start one per step)."""
    lm = load_model("tiny", tiny_path)
    # A stall bound no measured step reaches: what is checked is that prompts that
    # fit whole are taken together, not how the machine's timing sizes a step (a
    # loaded machine measured costs that fitted only 2 of the 4).
    engine = Engine(lane=False, max_stall=1000.0)
    engine.add_model(lm)
    params = {"max_tokens": 30, "temperature": 0, "ignore_eos": True}
    arrivals = {
        0: [(f"s{i}", "tiny", "completion", [5 + i, 6, 7], params) for i in range(3)],
        8: [(f"n{i}", "tiny", "completion", [9 + i, 10, 11], params) for i in range(4)],
    }
    ids, steps = run(engine, arrivals)
    first = next(s for s in steps if any(r.startswith("n") for r, _ in s["prefill"]))
    assert sorted(r for r, _ in first["prefill"]) == [f"n{i}" for i in range(4)]
    assert not first["spans"] and len(first["decode"]) == 3
    for i in range(4):
        assert ids[f"n{i}"] == alone(lm, [9 + i, 10, 11], 30)


def test_rows_of_very_different_lengths_decode_in_separate_groups(tiny_path: Path) -> None:
    """A long row padded into a group of short ones would make each of them attend
    over its length (and the join would copy them all to it); a row a little longer
    than the short ones shares their group (a group costs more than a few keys)."""
    lm = load_model("tiny", tiny_path)
    # No lane: whether it lands "long" and "mid" before the short rows finish is a
    # race (lost when earlier tests left OpenBLAS slower); the groups are the point.
    engine = Engine(prefill_budget=512, lane=False)
    engine.add_model(lm)
    params = {"max_tokens": 30, "temperature": 0, "ignore_eos": True}
    prompts = {
        "s0": [5, 6, 7],
        "s1": [6, 7, 8, 9],
        "s2": [7, 8],
        "long": [3 + i % 100 for i in range(900)],  # would pad 3 rows by ~900 keys each
        "mid": [4 + i % 90 for i in range(40)],
    }
    ids: dict[str, list[int]] = {r: [] for r in prompts}
    batch = engine.batches["tiny"]
    layouts = []
    for rid, p in prompts.items():
        engine.submit(rid, "tiny", "completion", p, sp(params))
    while engine.requests:
        for o in engine.step():
            ids[o.rid].extend(o.ids)
        layouts.append([list(g.rids) for g in batch.groups])
    assert [{"s0", "s1", "s2", "mid"}, {"long"}] in [[set(g) for g in lay] for lay in layouts]
    for rid, p in prompts.items():
        assert ids[rid] == alone(lm, p, 30)
    assert batch.groups == [] and engine.kv_bytes() == 0


def test_a_row_joins_the_group_nearest_its_length() -> None:
    from mlx_lm.models.cache import KVCache

    from exo.nodes.engine.batch import MAX_GROUPS, Batch

    def cache(n: int) -> list[KVCache]:
        c = KVCache()
        c.update_and_fetch(mx.zeros((1, 2, n, 4)), mx.zeros((1, 2, n, 4)))
        return [c, c]

    batch = Batch(split=True)
    caches = {}
    # b pads a by 5 keys: one group. c would pad a and b by ~3k each: a group of its
    # own. d, shorter than c, pads only itself (500 keys): joins c. e would pad c and
    # d by 3k each: a third group.
    for rid, n in [("a", 10), ("b", 15), ("c", 3000), ("d", 2500), ("e", 6000)]:
        caches[rid] = cache(n)
        batch.join(rid, caches[rid])
    assert len(batch.groups) == MAX_GROUPS == 3
    # a row starting a group brings its own buffers, not a copy of them
    assert batch.groups[2].cache[0].keys is caches["e"][0].keys
    batch.join("f", cache(9000))
    # f is worth a group (it would pad e by 3k keys) but no new one is allowed: it
    # joins the group it pads least
    assert [g.rids for g in batch.groups] == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert batch.rids == ["a", "b", "c", "d", "e", "f"]  # step order: group after group
    batch.leave({"e"})
    assert [g.rids for g in batch.groups] == [["a", "b"], ["c", "d"], ["f"]]
    whole = Batch()  # not split: one group whatever the lengths
    for rid, n in [("a", 10), ("c", 3000)]:
        whole.join(rid, cache(n))
    assert len(whole.groups) == 1 and whole.cache is not None


def test_a_prompt_arriving_while_decodes_are_queued_ahead_starts_a_step_later(
    tiny_path: Path, queue_ahead: None
) -> None:
    """The queued decode step is already computed: running the prompt's chunk beside
    it would be a second pass over the weights in that step."""
    lm = load_model("tiny", tiny_path)
    engine = Engine(prefill_budget=32, lane=False)
    engine.add_model(lm)
    params = {"max_tokens": 20, "temperature": 0, "ignore_eos": True}
    for i in range(3):
        engine.submit(f"s{i}", "tiny", "completion", [5 + i, 6, 7], sp(params))
    for _ in range(4):
        engine.step()
    assert engine.prefetched
    engine.submit("new", "tiny", "completion", [9, 10, 11], sp(params))
    outs = engine.step()
    assert engine.last_plan.prefill == [] and {o.rid for o in outs} == {"s0", "s1", "s2"}
    outs = engine.step()
    assert engine.last_plan.prefill == [("new", 3)] and len(engine.last_plan.decode) == 3
    ids = [t for o in outs if o.rid == "new" for t in o.ids]
    while engine.requests:
        ids += [t for o in engine.step() if o.rid == "new" for t in o.ids]
    assert ids == alone(lm, [9, 10, 11], 20)


def test_no_step_is_queued_ahead_on_the_cpu_backend(tiny_path: Path) -> None:
    from exo.nodes.engine import engine as eng

    assert (mx.default_device() != mx.cpu) == eng.QUEUE_AHEAD
    lm = load_model("tiny", tiny_path)
    engine = Engine(prefill_budget=32)
    engine.add_model(lm)
    engine.submit("s", "tiny", "completion", [5, 6, 7], sp({"max_tokens": 5, "temperature": 0}))
    for _ in range(3):
        engine.step()
        assert bool(engine.prefetched) == eng.QUEUE_AHEAD


def test_a_prompt_beside_streams_prefills_in_the_lane_while_each_stream_gets_a_token_each_step(
    lm: LoadedModel,
) -> None:
    engine = Engine(lane=True)
    engine.add_model(lm)
    assert engine.lane is not None
    engine.lane.chunk = 16
    params = {"max_tokens": 400, "temperature": 0, "ignore_eos": True}
    long_prompt = list(range(3, 83))  # 80 tokens in chunks of 16: 5 passes of the lane
    arrivals = {
        0: [(f"s{i}", lm.model_id, "completion", [5 + i, 6, 7], params) for i in range(3)],
        4: [("long", lm.model_id, "completion", long_prompt, {**params, "max_tokens": 6})],
    }
    ids, steps = run(engine, arrivals)
    assert ids["long"] == alone(lm, long_prompt, 6)
    assert engine.lane.passes == 5
    first = next(i for i, s in enumerate(steps) if "long" in s["outs"])
    for s in steps[4:first]:
        # the step never carried the prompt, and every stream got its token
        assert s["prefill"] == [] and set(s["decode"]) == {"s0", "s1", "s2"}
        assert {"s0", "s1", "s2"} <= set(s["outs"]), s
    assert engine.lane.idle() and not engine.lane.single_blas  # OpenBLAS has its threads back


STREAM = {"max_tokens": 400, "temperature": 0, "ignore_eos": True}


def tiny_lane_engine(tiny_path: Path, streams: int, chunk: int | None = None) -> Engine:
    """The tiny model's engine with a lane, `streams` rows decoding (a step in)."""
    engine = Engine(lane=True)
    engine.add_model(load_model("tiny", tiny_path))
    assert engine.lane is not None
    if chunk:
        engine.lane.chunk = chunk
    for i in range(streams):
        engine.submit(f"s{i}", "tiny", "completion", [5 + i, 6], sp(STREAM))
    engine.step()
    return engine


def test_a_cancel_in_the_lane_frees_the_prompt_and_the_streams_go_on(tiny_path: Path) -> None:
    engine = tiny_lane_engine(tiny_path, 2, chunk=8)
    assert engine.lane is not None
    engine.submit("long", "tiny", "completion", list(range(3, 203)), sp(STREAM))
    engine.step()
    assert engine.requests["long"].in_lane and "long" in engine.lane
    assert engine.cancel("long")
    assert "long" not in engine.requests and "long" not in engine.lane
    for _ in range(50):
        if engine.lane.idle():
            break
        outs = engine.step()
        assert {o.rid for o in outs} == {"s0", "s1"}
        engine.lane.wait(0.1)
    assert engine.lane.idle() and engine.lane.passes < 200 // 8  # dropped part-way
    assert not any(o.rid == "long" for o in engine.step())
    assert engine.kv_bytes() == engine.batches["tiny"].nbytes()  # only the streams' cache


def test_a_paused_lane_holds_its_prompt_and_the_streams_go_on(tiny_path: Path) -> None:
    import time

    engine = tiny_lane_engine(tiny_path, 2, chunk=8)
    assert engine.lane is not None
    long_prompt = list(range(3, 83))  # 10 passes of 8
    engine.submit("long", "tiny", "completion", long_prompt, sp({**STREAM, "max_tokens": 4}))
    engine.lane.pause()
    engine.step()  # hands the prompt to the lane
    held = []
    for _ in range(3):
        for _ in range(5):
            assert {o.rid for o in engine.step()} == {"s0", "s1"}
            time.sleep(0.02)
        held.append(engine.lane.passes)
    # A pass already in its last layer may finish; none after it.
    assert held[0] <= 1 and held[0] == held[1] == held[2]
    assert engine.requests["long"].in_lane and engine.requests["long"].prefilled <= 8
    engine.lane.resume()
    ids: list[int] = []
    for _ in range(500):
        ids += [t for o in engine.step() if o.rid == "long" for t in o.ids]
        if "long" not in engine.requests:
            break
        engine.lane.wait(0.05)
    assert engine.lane.passes == 10
    assert ids == alone(engine.models["tiny"], long_prompt, 4)


def test_the_lanes_threads_give_the_core_to_the_step_loops(tiny_path: Path) -> None:
    import threading

    from exo.nodes.engine import lane as lane_mod

    def nices() -> dict[int, int]:
        out = {}
        for t in Path("/proc/self/task").iterdir():
            stat = (t / "stat").read_text()
            out[int(t.name)] = int(stat[stat.rindex(")") + 2 :].split()[16])
        return out

    engine = tiny_lane_engine(tiny_path, 1)
    assert engine.lane is not None
    engine.submit("long", "tiny", "completion", list(range(3, 40)), sp(STREAM))
    engine.step()
    engine.lane.wait(5.0)
    assert engine.lane.prompts == 1
    engine.lane.hurry()  # the floor thread starts at its first hurry
    engine.lane.wait(1.0)
    n = nices()
    polite, floor = engine.lane._threads[False], engine.lane._threads[True]
    assert lane_mod.NICE > 0 and n[polite.native_id] == lane_mod.NICE
    # its MLX stream's worker too; the step loop's threads keep theirs, and so does
    # the thread the lane's pass moves to when it falls behind its floor
    assert sum(1 for v in n.values() if v == lane_mod.NICE) >= 2
    assert n[threading.get_native_id()] == 0 and n[floor.native_id] == 0


def test_a_prompt_the_lane_fails_on_fails_alone(
    tiny_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exo.nodes.engine.lane import Lane

    def broken(self: Lane, p: object, urgent: bool) -> bool:
        raise RuntimeError("boom")

    monkeypatch.setattr(Lane, "_layers", broken)
    engine = tiny_lane_engine(tiny_path, 1)
    assert engine.lane is not None
    engine.submit("bad", "tiny", "completion", list(range(3, 40)), sp(STREAM))
    engine.step()
    engine.lane.wait(5.0)
    # the node's loop sleeps on the lane's wakeup: readable once a result lands,
    # drained when the engine takes it
    assert select.select([engine.lane.wakeup], [], [], 0)[0]
    outs = engine.step()
    assert not select.select([engine.lane.wakeup], [], [], 0)[0]
    assert [o.rid for o in outs] == ["s0"]
    assert engine.take_failed() == [
        ("bad", "prefill_error", "the prompt's prefill failed on this node")
    ]
    assert engine.take_failed() == []
    assert "bad" not in engine.requests


def test_a_long_prompts_chunks_through_numpy_equal_mlx_lm_alone_and_in_the_lane(
    lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks past attention.CHUNK_MIN go through numpy (attend_chunk): prefilled in
    the step when alone and in the lane beside streams, the prompt's tokens are
    mlx-lm's own (one unchunked prefill, MLX's attention)."""
    from exo.nodes.engine import attention
    from exo.tools.streams import long_prompt

    calls = []
    numpy_chunk = attention.attend_chunk

    def counted(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
        calls.append(q.shape[2])
        return numpy_chunk(q, k, v, scale)

    monkeypatch.setattr(attention, "attend_chunk", counted)
    prompt = long_prompt(lm.tokenizer, 600)
    want = alone(lm, prompt, 8)
    engine = Engine(lane=True, prefix_limit=0)  # (the same prompt twice: prefilled twice)
    engine.add_model(lm)
    assert engine.lane is not None
    params = {"max_tokens": 8, "temperature": 0}
    ids, _ = run(engine, {0: [("a", lm.model_id, "completion", prompt, params)]})
    assert ids["a"] == want and calls and engine.lane.prompts == 0
    calls.clear()
    short = {**STREAM, "max_tokens": 24}
    streams = [(f"s{i}", lm.model_id, "completion", [5 + i, 6, 7], short) for i in range(2)]
    ids, _ = run(engine, {0: streams, 2: [("b", lm.model_id, "completion", prompt, params)]})
    assert ids["b"] == want and calls and engine.lane.prompts == 1


def test_prompts_joining_in_one_step_grow_the_batch_once(
    tiny_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from exo.nodes.engine.rowcache import RowCache

    grew: list[int] = []
    orig = RowCache.grow_rows

    def spy(self: RowCache, spare: int | None = None) -> None:
        before = self.capacity
        orig(self, spare)
        if self.capacity > before:
            grew.append(self.capacity)

    monkeypatch.setattr(RowCache, "grow_rows", spy)
    engine = Engine(lane=False)
    engine.add_model(load_model("tiny", tiny_path))
    layers = len(engine.models["tiny"].model.model.layers)
    params = {"max_tokens": 3, "temperature": 0, "ignore_eos": True}
    for i in range(12):
        engine.submit(f"r{i}", "tiny", "completion", [5 + i, 6, 7], sp(params))
    engine.step()  # all twelve prefill and join in this step
    assert len(engine.batches["tiny"].rids) == 12
    assert len(grew) == layers and min(grew) >= 12  # one growth per layer, room for all


def test_special_tokens_never_reach_the_text(smollm_path: Path) -> None:
    """A chat marker the model emits (here forced by logit_bias, past EOS) is a token
    in the ids, never `<|im_start|>` in the text."""
    lm = load_model("smollm", smollm_path)
    marker = lm.tokenizer._tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert marker in lm.hidden and not lm.eos & {marker}
    params = {"max_tokens": 3, "temperature": 0, "ignore_eos": True, "logit_bias": {marker: 100}}
    engine = Engine()
    engine.add_model(lm)
    prompt = lm.tokenizer.encode("Hello")
    ids, steps = run(engine, {0: [("x", "smollm", "completion", prompt, params)]})
    text = "".join(s["outs"]["x"].text for s in steps if "x" in s["outs"])
    assert ids["x"] == [marker] * 3
    assert text == ""


@pytest.mark.parametrize("model", ["tiny", "smollm", "gemma"])
def test_an_echoed_prompt_is_scored_as_one_forward_pass_scores_it(
    model: str, tiny_path: Path, smollm_path: Path, models_dir: Path
) -> None:
    """echo + logprobs + max_tokens 0 (how lm-eval-harness scores text): every prompt
    token's log probability, its chunks beside a stream, equal to one mlx-lm pass;
    fused (llama) and mlx-lm's own forward (gemma)."""
    from exo.nodes.store.store import ModelStore

    path = {"tiny": tiny_path, "smollm": smollm_path}.get(model)
    lm = load_model(model, path or ModelStore(models_dir).path("test/tiny-gemma3_text"))
    prompt = lm.tokenizer.encode(PROMPTS[1])[:70]
    engine = Engine(idle_budget=16, prefill_budget=16, lane=False)  # chunks of 16
    engine.add_model(lm)
    scored = {"max_tokens": 0, "echo": True, "logprobs": 2, "temperature": 0}
    stream = {"max_tokens": 30, "temperature": 0, "ignore_eos": True}
    ids, steps = run(
        engine,
        {
            0: [("s", model, "completion", [5, 6, 7], stream)],
            2: [("x", model, "completion", prompt, scored)],
        },
    )
    outs = [s["outs"]["x"] for s in steps if "x" in s["outs"]]
    assert len(outs) == 1 and ids["x"] == [] and outs[0].finish == "length"
    assert outs[0].usage["completion_tokens"] == 0
    assert outs[0].text == lm.tokenizer.decode([t for t in prompt if t not in lm.hidden])
    entries = outs[0].logprobs
    assert len(entries) == len(prompt) and entries[0]["logprob"] is None
    logits = lm.model(mx.array([prompt]))[0].astype(mx.float32)
    ref = (logits - mx.logsumexp(logits, axis=-1, keepdims=True)).tolist()
    for k in range(1, len(prompt)):
        e, row = entries[k], ref[k - 1]
        assert e["token"] == lm.tokenizer.decode([prompt[k]])
        assert abs(e["logprob"] - row[prompt[k]]) < 2e-3, k
        assert [t["logprob"] for t in e["top_logprobs"]] == sorted(
            (t["logprob"] for t in e["top_logprobs"]), reverse=True
        )
        assert abs(e["top_logprobs"][0]["logprob"] - max(row)) < 2e-3, k


@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_tool_calls_false_keeps_the_first_call(parallel: bool, models_dir: Path) -> None:
    """A model that answers with two calls: both, or with parallel_tool_calls false
    (Anthropic's disable_parallel_tool_use) the first only."""
    import json

    from exo.nodes.store.store import ModelStore
    from tests.conftest import TINY_TOOLS

    lm = load_model("tools", ModelStore(models_dir).path(TINY_TOOLS))
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    payload = {"messages": [{"role": "user", "content": "x"}], "tools": [tool]}
    params = {"max_tokens": 200, "parallel_tool_calls": parallel}
    engine = Engine()
    engine.add_model(lm)
    req = engine.submit("r", "tools", "chat", payload, sp(params))
    call = '<tool_call>\n{"name": "f", "arguments": {"a": %d}}\n</tool_call>\n'
    answer = lm.tokenizer.encode(call % 1 + call % 2, add_special_tokens=False)
    outs = [req.emit(t) for t in [*answer, next(iter(lm.eos))]]
    assert outs[-1].finish == "tool_calls"
    calls = outs[-1].tool_calls or []
    got = [json.loads(c["function"]["arguments"]) for c in calls]
    assert got == ([{"a": 1}, {"a": 2}] if parallel else [{"a": 1}])
