"""The prefix cache (nodes/engine/prefix.py): a request starts from the KV of
the longest prompt-and-answer it shares with one already run, and its tokens are
those it would have drawn without it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exo.nodes.engine.engine import Engine
from exo.nodes.engine.mlxenv import mx
from exo.nodes.engine.model import LoadedModel, kv_bytes_per_token, load_model
from exo.nodes.engine.prefix import PrefixCache, supports
from tests.helpers import sp
from tests.test_engine import run

SYSTEM = (
    "You are a careful assistant for a team that runs language models on a cluster of "
    "small machines. Answer briefly, name the machine you would use, and say why. " * 4
)
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module", params=["tiny", "smollm", "gemma3", "qwen3-q4"])
def lm(
    request: pytest.FixtureRequest, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> LoadedModel:
    """A llama, a real model, one with sliding-window layers, a 4-bit quantized one."""
    if request.param == "qwen3-q4":
        from exo.tools.tiny import make_tiny

        out = tmp_path_factory.mktemp("q4") / "qwen3-q4"
        return load_model("q4", make_tiny(out, arch="qwen3", hidden=128, bits=4))
    folder = {
        "tiny": "test--tiny-llama",
        "smollm": "HuggingFaceTB--SmolLM2-135M-Instruct",
        "gemma3": "test--tiny-gemma3_text",
    }[request.param]
    return load_model(request.param, models_dir / folder)


def engines(lm: LoadedModel, **kw: Any) -> tuple[Engine, Engine]:
    """(with the cache, without it), otherwise alike."""
    on, off = Engine(**kw), Engine(prefix_limit=0, **kw)
    on.add_model(lm)
    off.add_model(lm)
    return on, off


def chat(
    engine: Engine, lm: LoadedModel, rid: str, messages: list[dict], n: int
) -> tuple[list[int], str, dict[str, Any]]:
    """One request run to its end: its ids, its text and its usage."""
    req = engine.submit(rid, lm.model_id, "chat", messages, sp({**GREEDY, "max_tokens": n}))
    ids: list[int] = []
    text, usage = "", {}
    for _ in range(5000):
        for o in engine.step():
            ids += o.ids
            text += o.text
            usage = o.usage or usage
        if rid not in engine.requests and req not in engine.queue:
            return ids, text, usage
    raise AssertionError("did not finish")


# -- the cache alone ----------------------------------------------------------------------


def kv(n: int, fill: float = 1.0) -> list[tuple[mx.array, mx.array]]:
    return [(mx.full((1, 2, n, 4), fill), mx.full((1, 2, n, 4), -fill)) for _ in range(3)]


def test_the_longest_shared_prefix_is_found_and_never_the_whole_prompt() -> None:
    c = PrefixCache(limit=1 << 30, min_tokens=4)
    assert c.store("m", list(range(10)), kv(10), room=1 << 30)
    assert c.store("m", [*range(5), 50, 51, 52, 53, 54, 55], kv(11, 2.0), room=1 << 30)
    entry, n = c.lookup("m", [*range(8), 99])
    assert n == 8 and entry is not None and float(entry.kv[0][0][0, 0, 0, 0]) == 1.0
    # all of a prompt matched: all but its last token (its logits are needed)
    assert c.lookup("m", list(range(10)))[1] == 9
    assert c.lookup("m", [1, 2, 3, 4, 5]) == (None, 0)  # no shared start
    assert c.lookup("m", [0, 1, 2, 7]) == (None, 0)  # shorter than min_tokens
    assert c.lookup("other", list(range(10))) == (None, 0)


def test_an_entry_extended_by_a_longer_one_goes_and_a_covered_one_is_not_kept() -> None:
    c = PrefixCache(limit=1 << 30, min_tokens=4)
    c.store("m", list(range(6)), kv(6), room=1 << 30)
    c.store("m", list(range(12)), kv(12), room=1 << 30)  # the prompt, then its answer
    assert [len(e.tokens) for e in c.entries["m"]] == [12]
    assert not c.store("m", list(range(8)), kv(8), room=1 << 30)  # already served
    assert [len(e.tokens) for e in c.entries["m"]] == [12]


def test_least_recently_used_entries_go_first_within_the_limit_and_the_room() -> None:
    one = sum(int(k.nbytes + v.nbytes) for k, v in kv(10))
    c = PrefixCache(limit=int(one * 2.5), min_tokens=4)
    for i in range(3):
        c.store("m", [i, *range(100, 109)], kv(10), room=1 << 30)
    assert [int(e.tokens[0]) for e in c.entries["m"]] == [1, 2]  # 0 went
    c.lookup("m", [1, *range(100, 109), 7])  # 1 used: 2 is now the oldest
    c.store("m", [3, *range(100, 109)], kv(10), room=1 << 30)
    assert [int(e.tokens[0]) for e in c.entries["m"]] == [1, 3]
    assert not c.store("m", [4, *range(100, 109)], kv(10), room=one - 1)  # no room
    assert c.evict(0) == 2 * one and c.nbytes == 0 and c.stats.evicted == 4


def test_which_models_it_serves(tiny_path: Path) -> None:
    assert supports(lm := load_model("tiny", tiny_path))
    # stage 0 of a split model: it decides for the later stages
    lm.part = object()  # type: ignore[assignment]
    assert supports(lm)


# -- in the engine ------------------------------------------------------------------------


def test_a_chats_next_turns_start_from_the_last_and_answer_the_same(lm: LoadedModel) -> None:
    on, off = engines(lm, lane=False)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello!"}]
    before = 0
    for turn, ask in enumerate(["Which machine?", "Why that one?", "And for a long prompt?"]):
        got, text, usage = chat(on, lm, f"on{turn}", messages, 12)
        want, _, plain = chat(off, lm, f"off{turn}", messages, 12)
        assert got == want, f"turn {turn}"
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        assert plain["prompt_tokens_details"]["cached_tokens"] == 0
        if turn:
            # the previous turn's prompt and answer (but what the template renders
            # differently from what the model drew, the answer's end)
            assert cached >= before, (turn, cached, before)
        before = usage["prompt_tokens"]
        messages = [
            *messages,
            {"role": "assistant", "content": text},
            {"role": "user", "content": ask},
        ]
    stats = on.prefix.public()
    assert stats["hits"] >= 2 and stats["reused_tokens"] > 0
    assert stats["models"][lm.model_id]["entries"] >= 1
    assert on.kv_bytes() == 0  # (the cache is not a request's KV)


@pytest.mark.parametrize("lane", [False, True])
def test_callers_sharing_a_system_prompt_in_one_batch_draw_the_same_tokens(
    lm: LoadedModel, lane: bool
) -> None:
    on, off = engines(lm, prefill_budget=32, lane=lane)
    asks = ["What is 2+2?", "Name a fruit.", "Say hi.", "Count to five.", "A colour?"]
    arrivals: dict[int, list[tuple]] = {}
    for i, ask in enumerate(asks):
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}]
        arrivals.setdefault(i * 6, []).append(
            (f"r{i}", lm.model_id, "chat", msgs, {**GREEDY, "max_tokens": 16})
        )
    got, _ = run(on, arrivals)
    want, _ = run(off, arrivals)
    assert got == want
    assert on.prefix.stats.hits >= 3  # later callers started from the first's prompt


def test_prompts_sharing_only_part_of_a_prefix(lm: LoadedModel) -> None:
    base = lm.tokenizer.encode(SYSTEM, add_special_tokens=False)
    prompts = [base + [7, 8, 9] * 5, base[:60] + [11, 12] * 10, base[:60] + [11, 12] * 4 + [5]]
    # sequentially, each to its end, on both engines
    on, off = engines(lm, lane=False)
    for i, p in enumerate(prompts):
        params = {**GREEDY, "max_tokens": 10, "ignore_eos": True}
        ids_on, _ = run(on, {0: [(f"p{i}", lm.model_id, "completion", p, params)]})
        ids_off, _ = run(off, {0: [(f"p{i}", lm.model_id, "completion", p, params)]})
        assert ids_on == ids_off, i
    assert on.prefix.stats.hits == 2 and on.prefix.stats.reused >= 2 * 60


def test_cached_kv_gives_way_before_a_request_waits_and_none_outlives_its_model(
    tiny_path: Path,
) -> None:
    lm = load_model("tiny", tiny_path)
    per = kv_bytes_per_token(lm.model)
    # room for two requests' reservations; the cache may take it all when idle
    engine = Engine(kv_budget=2 * 120 * per, prefix_limit=2 * 120 * per, lane=False)
    engine.add_model(lm)
    params = {**GREEDY, "max_tokens": 40, "ignore_eos": True}
    rng = np.random.default_rng(0)
    for i in range(6):  # six different 80-token prompts: more than the cache holds
        prompt = [int(t) for t in rng.integers(5, 500, 80)]
        ids, _ = run(engine, {0: [(f"r{i}", "tiny", "completion", prompt, params)]})
        assert len(ids[f"r{i}"]) == 40
        assert engine.prefix.nbytes <= engine.kv_budget
    assert engine.prefix.stats.evicted > 0
    # two at once: both admitted at once (the cache gave its room), both finish
    a = [int(t) for t in rng.integers(5, 500, 70)]
    b = [int(t) for t in rng.integers(5, 500, 70)]
    ids, _ = run(
        engine,
        {0: [("a", "tiny", "completion", a, params), ("b", "tiny", "completion", b, params)]},
    )
    assert len(ids["a"]) == len(ids["b"]) == 40
    assert engine.prefix.nbytes > 0
    # the model reloaded: nothing cached from the old one is used
    engine.remove_model("tiny")
    assert engine.prefix.nbytes == 0
    engine.add_model(lm)
    hits = engine.prefix.stats.hits
    run(engine, {0: [("again", "tiny", "completion", b + [9], params)]})
    assert engine.prefix.stats.hits == hits


# -- across the cluster -------------------------------------------------------------------


def test_follow_up_turns_go_to_the_instance_that_cached_the_first(
    models_dir: Path, tmp_path: Path
) -> None:
    import threading

    import httpx

    from exo.tools.cluster import LocalCluster, wait_ready
    from tests.helpers import wait_until

    with LocalCluster.on_free_ports(models_dir, nodes=2, log_dir=tmp_path) as c:

        def nodes() -> dict[str, dict]:
            return {n["name"]: n for n in c.cluster_state()["nodes"]}

        for n in nodes().values():
            stages = [{"node": n["id"], "layers": [0, 4]}]
            r = httpx.post(
                f"{c.url}/v1/instances", json={"model": "test/tiny-llama", "stages": stages}
            )
            assert r.status_code == 201, r.text
            wait_ready(c.url, r.json()["id"], timeout=60)
        # A long stream takes the instance an idle cluster prefers...
        body = {
            "model": "test/tiny-llama",
            "prompt": "x",
            "max_tokens": 900,
            "ignore_eos": True,
            "stream": True,
        }
        busy = threading.Event()

        def stream() -> None:
            with httpx.stream("POST", f"{c.url}/v1/completions", json=body, timeout=60) as r:
                for _ in r.iter_lines():
                    if busy.is_set():
                        return  # (leaving cancels it)

        t = threading.Thread(target=stream)
        t.start()
        preferred = wait_until(
            lambda: next((k for k, n in nodes().items() if n["status"]["running"]), None)
        )
        # ...so the conversation's first turn goes to the other one.
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Which machine?"},
        ]
        chat_body = {"model": "test/tiny-llama", "max_tokens": 8, "temperature": 0}
        first = httpx.post(
            f"{c.url}/v1/chat/completions", json={**chat_body, "messages": messages}, timeout=60
        ).json()
        busy.set()
        t.join()
        wait_until(lambda: all(not n["status"]["running"] for n in nodes().values()))
        (other,) = [k for k in nodes() if k != preferred]
        answer = first["choices"][0]["message"]["content"]
        for ask in ("Why?", "And then?"):
            messages += [
                {"role": "assistant", "content": answer},
                {"role": "user", "content": ask},
            ]
            r = httpx.post(
                f"{c.url}/v1/chat/completions", json={**chat_body, "messages": messages}, timeout=60
            ).json()
            assert r["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, r["usage"]
            answer = r["choices"][0]["message"]["content"]
        wait_until(lambda: nodes()[other]["status"]["prefix_cache"]["hits"] == 2)
        assert nodes()[preferred]["status"]["prefix_cache"]["hits"] == 0


def test_memory_pressure_gives_the_cached_prefixes_back(models_dir: Path, tmp_path: Path) -> None:
    import httpx

    from exo.tools.cluster import LocalCluster
    from tests.helpers import wait_until

    psi = tmp_path / "memory.pressure"
    calm = "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    psi.write_text(calm + calm.replace("some", "full"))
    env = {"EXO_PSI_FILE": str(psi)}
    with LocalCluster.on_free_ports(models_dir, log_dir=tmp_path / "logs", env=env) as c:

        def cached() -> int:
            return int(c.cluster_state()["nodes"][0]["status"]["prefix_cache"]["bytes"])

        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
        body = {"model": "test/tiny-llama", "messages": messages, "max_tokens": 4}
        assert httpx.post(f"{c.url}/v1/chat/completions", json=body, timeout=60).is_success
        wait_until(lambda: cached() > 0)
        squeezed = calm.replace("avg10=0.00", "avg10=55.00")
        psi.write_text(squeezed + squeezed.replace("some", "full"))
        wait_until(lambda: cached() == 0, timeout=30)


def test_a_chat_on_two_stages_reuses_each_stages_part_and_answers_the_same(
    models_dir: Path, tmp_path: Path
) -> None:
    import httpx

    from exo.tools.cluster import LocalCluster, wait_ready

    lm = load_model("test/tiny-llama", models_dir / "test--tiny-llama")
    alone = Engine(prefix_limit=0, lane=False)
    alone.add_model(lm)
    with LocalCluster.on_free_ports(models_dir, nodes=2, log_dir=tmp_path) as c:
        ids = {n["name"]: n["id"] for n in c.cluster_state()["nodes"]}
        stages = [
            {"node": ids["node0"], "layers": [0, 2]},
            {"node": ids["node1"], "layers": [2, 4]},
        ]
        r = httpx.post(f"{c.url}/v1/instances", json={"model": lm.model_id, "stages": stages})
        assert r.status_code == 201, r.text
        wait_ready(c.url, r.json()["id"], timeout=60)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
        for turn, ask in enumerate(["Which?", "Why?", "Then?"]):
            body = {"model": lm.model_id, "messages": messages, "max_tokens": 10, "temperature": 0}
            got = httpx.post(f"{c.url}/v1/chat/completions", json=body, timeout=60).json()
            want_ids, want_text, _ = chat(alone, lm, f"t{turn}", messages, 10)
            assert got["choices"][0]["message"]["content"] == want_text, turn
            cached = got["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert (cached > 0) == (turn > 0), (turn, cached)
            messages = [
                *messages,
                {"role": "assistant", "content": want_text},
                {"role": "user", "content": ask},
            ]
        status = {n["name"]: n["status"] for n in c.cluster_state()["nodes"]}
        assert status["node0"]["prefix_cache"]["hits"] == 2
        assert status["node1"]["prefix_cache"]["stage_bytes"] > 0  # its layers' part


def test_callers_arriving_together_prefill_their_shared_prompt_once(lm: LoadedModel) -> None:
    on, off = engines(lm, lane=False, prefill_budget=64)
    arrivals = {
        0: [
            (
                f"c{i}",
                lm.model_id,
                "chat",
                [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ask}],
                {**GREEDY, "max_tokens": 6},
            )
            for i, ask in enumerate(["One?", "Two?", "Three?"])
        ]
    }
    got, _ = run(on, arrivals)
    want, _ = run(off, arrivals)
    assert got == want
    # the first prefilled the system prompt; the others waited for it, then reused it
    assert on.prefix.stats.hits == 2
    assert on.prefix.stats.reused >= 2 * len(lm.tokenizer.encode(SYSTEM)) * 0.9


def test_a_cache_that_fails_costs_its_entry_and_never_a_request(
    tiny_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = load_model("tiny", tiny_path)
    engine = Engine(lane=False)
    engine.add_model(lm)

    def broken(*a: Any, **k: Any) -> None:
        raise RuntimeError("no room at all")

    monkeypatch.setattr(engine.prefix, "store", broken)
    params = {**GREEDY, "max_tokens": 8, "ignore_eos": True}
    prompts = {i: [(f"r{i}", "tiny", "completion", list(range(5, 45)), params)] for i in (0, 1)}
    for step in prompts.values():
        ids, _ = run(engine, {0: step})
        assert len(next(iter(ids.values()))) == 8
    assert engine.prefix.stats.errors == 4  # each one's prompt and answer
    assert engine.kv_bytes() == 0 and not engine.requests
