"""Pipeline stages in one process: stage 0's engine hands each step to the later
stages (StageRunner) directly, so the split itself is checked without sockets;
test_pipeline.py runs the same over real node processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from exo.broker import protocol as P
from exo.nodes.engine.engine import Engine
from exo.nodes.engine.mlxenv import mx
from exo.nodes.engine.model import LoadedModel, Part, load_model, model_meta
from exo.nodes.pipeline.stage import StageRunner
from tests.helpers import sp

PROMPTS = [
    "What is the capital of France?",
    "Tell me a story about a long journey across the sea, with ships, sailors and storms. " * 3,
    "Hi",
    "List five fruits.",
]


@dataclass
class Pipeline:
    engine: Engine
    runners: list[StageRunner]
    results: list[tuple[int, list[int]]] = field(default_factory=list)

    def hop(self, lm: LoadedModel, header: P.Act, h: mx.array) -> None:
        x: mx.array | list[int] = h
        for r in self.runners:
            assert isinstance(x, mx.array)
            x = r.run(header, x)
        assert isinstance(x, list)
        self.results.append((header.step, x))

    def step(self) -> list[Any]:
        """An engine step, and the tokens of the steps the later stages answered."""
        outs = self.engine.step()
        while self.results:
            n, toks = self.results.pop(0)
            outs += self.engine.finish_remote("m", n, toks)
        return outs


def pipeline(path: Path, bounds: list[int]) -> Pipeline:
    engine = Engine(prefill_budget=12, idle_budget=16, kv_budget=1 << 30)
    if len(bounds) == 2:
        engine.add_model(load_model("m", path))
        return Pipeline(engine, [])
    parts = [Part(a, b, bounds[-1]) for a, b in zip(bounds, bounds[1:], strict=False)]
    engine.add_model(load_model("m", path, parts[0]))
    p = Pipeline(engine, [StageRunner(load_model("m", path, part)) for part in parts[1:]])
    engine.stage0.hop = p.hop
    return p


def drive(p: Pipeline, arrivals: dict[int, list[str]], cancel: dict[int, str] | None = None):
    """Submit requests at the given steps (and cancel some); collect every request's ids."""
    ids: dict[str, list[int]] = {}
    for step in range(3000):
        for i, rid in enumerate(arrivals.get(step, [])):
            prompt = PROMPTS[int(rid[1:]) % len(PROMPTS)]
            params = {"max_tokens": 8 + i, "temperature": 0}
            p.engine.submit(rid, "m", "completion", prompt, sp(params))
            ids[rid] = []
        if cancel and step in cancel:
            p.engine.cancel(cancel[step])
        outs = p.step()
        for o in outs:
            ids[o.rid].extend(o.ids)
        e = p.engine
        if not outs and e.lane is not None:
            # A prompt in the lane (one stage: it arrived beside decoding rows) lands
            # at the lane's pace, not the loop's: spinning here starved it (nice 19).
            e.lane.wait(5.0)
        if step > max(arrivals) and not (e.requests or e.queue or any(e.stage0.drops.values())):
            return ids
    raise AssertionError("requests did not finish")


@pytest.mark.parametrize("model", ["tiny", "smollm"])
def test_one_two_three_stages_give_the_same_tokens(
    model: str, tiny_path: Path, smollm_path: Path
) -> None:
    path = tiny_path if model == "tiny" else smollm_path
    n = model_meta(path)["layers"]
    # Staggered arrivals and a prefill budget of 12: batching and chunked prefill both at work.
    arrivals = {0: ["r0", "r1"], 3: ["r2"], 7: ["r3"]}
    outs = [drive(pipeline(path, b), arrivals) for b in ([0, n], [0, n // 2, n], [0, 1, 2, n])]
    assert outs[0] == outs[1] == outs[2]
    assert sum(len(v) for v in outs[0].values()) >= 16  # not trivially equal


def test_a_cancel_frees_every_stage(tiny_path: Path) -> None:
    p = pipeline(tiny_path, [0, 1, 3, 4])
    # r1's long prompt is cancelled part-way through its chunked prefill.
    ids = drive(p, {0: ["r0", "r1"]}, cancel={2: "r1"})
    assert ids["r1"] == [] and len(ids["r0"]) > 0
    for r in p.runners:
        assert r.kv_bytes() == 0 and not r.caches and not r.batch.rids and not r.samplers


def test_a_stage_holds_only_its_layers(tiny_path: Path) -> None:
    whole = load_model("m", tiny_path)
    middle = load_model("m", tiny_path, Part(1, 3, 4))
    assert middle.layers == 2
    assert middle.nbytes < whole.nbytes / 2  # no embedding, no head, half the layers


def test_stage_zero_admits_only_what_every_later_stage_can_hold(tiny_path: Path) -> None:
    from exo.nodes.engine.model import kv_bytes_per_token
    from exo.nodes.engine.request import EngineError

    p = pipeline(tiny_path, [0, 2, 4])
    head = p.engine.models["m"]
    per_token = kv_bytes_per_token(head.model)
    head.kv_cap = 40 * per_token  # a later stage's budget, in stage 0's units
    with pytest.raises(EngineError) as e:
        p.engine.submit("big", "m", "completion", "hello there", sp({"max_tokens": 100}))
    assert e.value.code == "kv_budget_exceeded" and "tightest stage" in e.value.message
    # Two that fit alone but not together: the second waits for the first.
    params = {"max_tokens": 20, "temperature": 0, "ignore_eos": True}
    p.engine.submit("r0", "m", "completion", "Hi", sp(params))
    p.engine.submit("r1", "m", "completion", "Hi", sp(params))
    assert list(p.engine.requests) == ["r0"] and [r.rid for r in p.engine.queue] == ["r1"]
    done: dict[str, int] = {}
    for _ in range(500):
        outs = p.step()
        for o in outs:
            done[o.rid] = done.get(o.rid, 0) + len(o.ids)
        assert len(p.engine.requests) <= 1
        if not p.engine.requests and not p.engine.queue:
            break
    assert done == {"r0": 20, "r1": 20}


def test_a_stage_whose_rows_sit_in_another_order_gives_each_row_its_own_tokens(
    tiny_path: Path,
) -> None:
    """A row leaving takes its group's last row into its place, so a stage that
    sees stage 0's leaves and joins in another sequence holds its rows in another
    order. Stage 0: [a b c d], a leaves -> [d b c], x joins -> [d b c x], b is
    cancelled -> [d x c]. The stage, told all at once: a and b leave -> [d c], x
    joins -> [d c x]. Each row must still get the tokens of its own cache."""
    n = model_meta(tiny_path)["layers"]
    part = Part(n // 2, n, n)
    wide = load_model("m", tiny_path).model.args.hidden_size
    mx.random.seed(3)
    prompt = {rid: mx.random.normal((3 + i, wide)) for i, rid in enumerate("abcdx")}
    dec = {rid: mx.random.normal((2, wide)) for rid in "abcdx"}

    def tokens(runner: StageRunner, i: int, decode: list[str], drops: list[str]) -> dict:
        header = P.Act(instance="i", step=5 + i, decode=decode, chunks=[], shape=[], drops=drops)
        out = runner.run(header, mx.concatenate([dec[r][i : i + 1] for r in decode]))
        assert isinstance(out, list)
        return dict(zip(decode, out, strict=True))

    runs = []
    for told in (["d", "x", "c"], ["d", "c", "x"]):  # stage 0's order; this stage's own
        runner = StageRunner(load_model("m", tiny_path, part))
        for step, rid in enumerate("abcdx"):
            header = P.Act(
                instance="i",
                step=step,
                decode=[],
                chunks=[(rid, prompt[rid].shape[0], True)],
                shape=[],
                new={rid: sp({"temperature": 0})},
            )
            runner.run(header, prompt[rid])
        first = tokens(runner, 0, ["a", "b", "c", "d"], [])
        assert runner.batch.rids == ["a", "b", "c", "d"]
        second = tokens(runner, 1, told, ["a", "b"])
        assert runner.batch.rids == ["d", "c", "x"]  # its own order, whatever it was told
        runs.append((first, second))
    assert runs[0] == runs[1]


def test_structured_output_holds_on_the_last_stage_of_a_split(tiny_path: Path) -> None:
    """The last stage samples, so it holds the grammar (grammar.py): the text stage
    0 assembles from its tokens parses and follows the schema."""
    import json

    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["n"],
        "additionalProperties": False,
    }
    p = pipeline(tiny_path, [0, 2, 4])
    params = {"max_tokens": 60, "temperature": 1.0, "seed": 5, "json_schema": json.dumps(schema)}
    p.engine.submit("j", "m", "completion", "Number:", sp(params))
    text, finish = "", None
    for _ in range(500):
        outs = p.step()
        for o in outs:
            text += o.text
            finish = o.finish or finish
        if finish:
            break
    assert finish == "stop", text
    got = json.loads(text)
    assert set(got) == {"n"} and 0 <= got["n"] <= 99
