"""A step that raises stays with its requests: the node, its other models and the
requests it did not carry go on; a model that keeps failing is unloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from exo.nodes.engine import forward
from exo.nodes.engine.engine import Engine
from exo.nodes.engine.model import load_model
from exo.nodes.worker import FAILING_STEPS, Node
from tests.helpers import sp

MARK = 77  # a prompt holding this token makes the "bad" model's step raise
PROMPT = [1, 2, 3, 4, 5]
GREEDY = {"temperature": 0.0, "max_tokens": 24, "ignore_eos": True}


class Harness:
    """A real Node (its sockets bound, never connected) with two copies of the tiny
    model, "good" and "bad", whose step raises on MARK."""

    def __init__(self, tiny_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.engine = Engine(lane=False)
        self.node = Node("tcp://127.0.0.1:9", "t", tmp_path, engine=self.engine, weights_port=None)
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.node.send = lambda m: self.sent.append((m.type, msgspec.structs.asdict(m)))  # type: ignore[method-assign, assignment]
        self.good = load_model("good", tiny_path)
        self.bad = load_model("bad", tiny_path)
        self.engine.add_model(self.good)
        self.engine.add_model(self.bad)
        real = forward.step_forward

        def trap(model: Any, *args: Any, **kw: Any) -> Any:
            chunks = args[2]
            if model is self.bad.model and any(MARK in c.tokens for c in chunks):
                raise RuntimeError("marker token")
            return real(model, *args, **kw)

        monkeypatch.setattr(forward, "step_forward", trap)

    def submit(self, rid: str, model: str, prompt: list[int]) -> None:
        self.engine.submit(rid, model, "completion", prompt, sp(GREEDY))

    def ended(self, rid: str) -> dict[str, Any] | None:
        for t, f in self.sent:
            if f.get("rid") == rid and (t == "FAIL" or f.get("finish")):
                return {"type": t, **f}
        return None

    def tokens(self, rid: str) -> list[int]:
        return [i for t, f in self.sent if t == "TOKENS" and f["rid"] == rid for i in f["ids"]]

    def run(self, *rids: str, steps: int = 200) -> None:
        for _ in range(steps):
            if all(self.ended(r) for r in rids):
                return
            self.node.tick()
        raise AssertionError(f"{rids} did not end")

    def close(self) -> None:
        self.node.peers.close()
        self.node.prober.close()


@pytest.fixture()
def h(tiny_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    harness = Harness(tiny_path, tmp_path, monkeypatch)
    yield harness
    harness.close()


def test_a_raising_step_fails_its_models_requests_and_the_rest_finish_right(h: Harness) -> None:
    h.submit("ref", "good", PROMPT)
    h.run("ref")
    reference = h.tokens("ref")
    assert len(reference) == GREEDY["max_tokens"]

    h.submit("g1", "good", PROMPT)
    h.submit("b1", "bad", PROMPT)
    for _ in range(3):
        h.node.tick()
    assert h.tokens("g1") and h.tokens("b1")
    h.submit("b2", "bad", [*PROMPT, MARK])  # joins b1's batch: the step raises
    h.run("g1", "b1", "b2")
    for rid in ("b1", "b2"):
        end = h.ended(rid)
        assert end is not None and end["type"] == "FAIL", end
        assert end["code"] == "step_failed" and "marker token" in end["message"]
    assert h.ended("g1")["type"] == "TOKENS"
    assert h.tokens("g1") == reference  # and its tokens are the ones it gets alone
    # the node goes on serving both models
    h.submit("b3", "bad", PROMPT)
    h.submit("g2", "good", PROMPT)
    h.run("b3", "g2")
    assert h.tokens("b3") == reference and h.tokens("g2") == reference
    assert not h.engine.requests and "bad" in h.engine.models


def test_a_model_whose_steps_keep_failing_is_unloaded_with_the_reason(h: Harness) -> None:
    for i in range(FAILING_STEPS):
        h.submit(f"m{i}", "bad", [*PROMPT, MARK])
        h.run(f"m{i}")
        assert h.ended(f"m{i}")["code"] == "step_failed"
    assert "bad" not in h.engine.models and "good" in h.engine.models
    h.submit("g", "good", PROMPT)
    h.run("g")
    assert h.ended("g")["type"] == "TOKENS"


def test_a_fault_outside_any_models_part_fails_the_steps_requests_and_the_node_goes_on(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h.submit("a", "good", PROMPT)
    h.submit("b", "bad", PROMPT)
    for _ in range(3):
        h.node.tick()
    real = h.engine._complete
    calls = {"n": 0}

    def once(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("after the models ran")
        return real(*args)

    monkeypatch.setattr(h.engine, "_complete", once)
    h.node.tick()
    for rid in ("a", "b"):
        end = h.ended(rid)
        assert end is not None and end["code"] == "step_failed", end
        assert "after the models ran" in end["message"]
    assert not h.engine.requests and h.node.errors["step"] == 1
    h.submit("c", "good", PROMPT)
    h.run("c")
    assert h.ended("c")["type"] == "TOKENS"
