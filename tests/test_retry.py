"""common/retry.py's rules, each with the fault injected: nodes that die or fail
before and after a request's first token, deadlines, a broker restarted under
waiting requests, messages sent twice, a broker that comes up after its nodes.

Most use fake nodes on real sockets (what they answer, and when they die, is
the test's to say); the last ones kill real node and broker processes. The
other rules' tests live with their code: downloads in test_download.py (5xx,
429, a cut connection, a stall), cancels until acknowledged in test_cancel.py,
steps sent again between stages in test_failover.py, a broker's other
addresses in test_failover.py."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from exo.broker import protocol as P
from exo.broker.deploy import Deployer
from exo.broker.registry import InFlight, Registry
from exo.broker.requests import Requests
from exo.common import retry
from exo.common.sampling import SamplingParams
from exo.tools.cluster import LocalCluster
from tests.helpers import sp, wait_until

FAKE = "fake/model"
TINY = "test/tiny-llama"


class FakeNode:
    """A node on a real socket holding FAKE: it loads whatever it is asked to,
    heartbeats, and hands each GENERATE to `on_generate` (on its own thread, which
    owns the socket: answer with `send`). `kill` is its process dying."""

    def __init__(
        self, c: LocalCluster, name: str, on_generate: Callable[[FakeNode, P.Generate], None]
    ) -> None:
        self.name, self.on_generate = name, on_generate
        self.sock = c.as_member(zmq.Context.instance().socket(zmq.DEALER))
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(c.broker_addr)
        self.send(
            P.Hello(
                role="node",
                peer_id=name,
                name=name,
                info={
                    "models": [FAKE],
                    "model_meta": {FAKE: {"layers": 1, "bytes": 1, "split": False}},
                    "memory_available": 1 << 30,
                },
            )
        )
        self.generates: list[P.Generate] = []
        self.status: dict[str, Any] = {"stages": {}}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def send(self, msg: P.Msg) -> None:
        self.sock.send(P.encode(msg))

    def loop(self) -> None:
        beat = 0.0
        while not self.stopped.is_set():
            if self.sock.poll(50):
                msg = P.decode(self.sock.recv())
                if isinstance(msg, P.Load):
                    self.status["stages"][msg.instance] = {"state": "ready"}
                    beat = 0.0
                elif isinstance(msg, P.Generate):
                    self.generates.append(msg)
                    self.on_generate(self, msg)
            if time.monotonic() - beat > 0.2:
                beat = time.monotonic()
                self.send(P.Heartbeat(status=self.status))

    def kill(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.sock.close(linger=0)


def silent(node: FakeNode, g: P.Generate) -> None:
    """Takes the request and says nothing (until the test kills it)."""


def answers(node: FakeNode, g: P.Generate) -> None:
    node.send(
        P.Tokens(
            rid=g.rid,
            ids=[7],
            text=f"from {node.name}",
            finish="stop",
            seq=1,
            usage={"prompt_tokens": 1, "completion_tokens": 1},
        )
    )


def first_token_only(node: FakeNode, g: P.Generate) -> None:
    node.send(P.Tokens(rid=g.rid, ids=[7], text="half an", seq=1))


def fails(code: str, status: int) -> Callable[[FakeNode, P.Generate], None]:
    def fail(node: FakeNode, g: P.Generate) -> None:
        node.send(P.Fail(rid=g.rid, status=status, code=code, message=f"{node.name}: {code}"))

    return fail


@pytest.fixture()
def bare(models_dir: Path, tmp_path: Path) -> Iterator[LocalCluster]:
    """A broker with no real node, past its warm-up: fake nodes join it."""
    with LocalCluster.on_free_ports(models_dir, log_dir=tmp_path, nodes=0) as c:
        wait_until(lambda: c.cluster_state()["uptime_s"] > retry.BROKER_WARMUP_S, timeout=30)
        yield c


def up(c: LocalCluster) -> bool:
    try:
        return httpx.get(f"{c.url}/v1/models", timeout=2, headers=c.api_headers()).is_success
    except httpx.TransportError:
        return False


def ask(c: LocalCluster, out: dict[str, httpx.Response], **headers: str) -> threading.Thread:
    """A completion of FAKE on a thread: its response lands in out["r"]."""

    def run() -> None:
        out["r"] = httpx.post(
            f"{c.url}/v1/completions",
            json={"model": FAKE, "prompt": "x", "max_tokens": 4},
            headers={**c.api_headers(), **headers},
            timeout=60,
        )

    t = threading.Thread(target=run)
    t.start()
    return t


def stats(c: LocalCluster) -> dict[str, int]:
    return dict(c.cluster_state()["stats"])


def taken(*nodes: FakeNode) -> FakeNode:
    """The one fake node the request went to."""
    return wait_until(lambda: next((n for n in nodes if n.generates), None), timeout=30)


def two_and_a_request(
    c: LocalCluster, behaviour: Callable[[FakeNode, P.Generate], None], **headers: str
) -> tuple[FakeNode, FakeNode, threading.Thread, dict[str, httpx.Response]]:
    """Two fake nodes doing `behaviour`, and a request on its way: the node it
    went to, the other, its thread and where its response lands."""
    a = FakeNode(c, "fake-a", behaviour)
    b = FakeNode(c, "fake-b", behaviour)
    out: dict[str, httpx.Response] = {}
    t = ask(c, out, **headers)
    first = taken(a, b)
    return first, (b if first is a else a), t, out


def test_a_request_whose_node_dies_before_its_first_token_is_placed_again(
    bare: LocalCluster,
) -> None:
    first, other, t, out = two_and_a_request(bare, silent)
    other.on_generate = answers
    first.kill()  # after EXPIRY_S + GRACE_S the broker gives it up
    t.join(60)
    assert out["r"].status_code == 200, out["r"].text
    assert out["r"].json()["choices"][0]["text"] == f"from {other.name}"
    assert [g.rid for g in other.generates] == [first.generates[0].rid]  # the same request
    assert stats(bare)["placed_again"] == 1
    metrics = httpx.get(f"{bare.url}/metrics", headers=bare.api_headers(), timeout=10).text
    retried = {
        s.labels["what"]: s.value
        for f in text_string_to_metric_families(metrics)
        if f.name == "exo_retries"
        for s in f.samples
    }
    assert retried["placed_again"] == 1
    other.kill()


def test_a_request_that_has_had_a_token_is_never_placed_again(bare: LocalCluster) -> None:
    first, other, t, out = two_and_a_request(bare, first_token_only)
    time.sleep(0.5)  # its token is relayed
    first.kill()
    t.join(60)
    assert out["r"].status_code == 503
    assert out["r"].json()["error"]["code"] == "node_lost"
    assert "stopped responding" in out["r"].json()["error"]["message"]
    assert other.generates == []
    assert stats(bare).get("placed_again", 0) == 0
    other.kill()


def test_a_request_is_never_placed_again_past_its_deadline(bare: LocalCluster) -> None:
    # its deadline passes before the broker gives its node up (EXPIRY_S + GRACE_S)
    first, other, t, out = two_and_a_request(bare, silent, **{"X-Request-Timeout": "2"})
    first.kill()
    t.join(60)
    assert out["r"].status_code == 504
    assert out["r"].json()["error"]["code"] == "deadline_exceeded"
    time.sleep(P.EXPIRY_S + P.GRACE_S + 1)  # the node is given up: nothing follows
    assert other.generates == []
    assert stats(bare).get("placed_again", 0) == 0
    other.kill()


def test_a_lost_stage_places_a_request_again_at_most_max_placements_times(
    bare: LocalCluster,
) -> None:
    a = FakeNode(bare, "fake-a", fails("stage_timeout", 504))
    out: dict[str, httpx.Response] = {}
    ask(bare, out).join(60)
    assert out["r"].status_code == 504
    assert out["r"].json()["error"]["code"] == "stage_timeout"
    assert len(a.generates) == retry.MAX_PLACEMENTS
    assert len({g.rid for g in a.generates}) == 1
    assert stats(bare)["placed_again"] == retry.MAX_PLACEMENTS - 1
    a.kill()


def test_a_failure_that_is_not_a_loss_is_never_placed_again(bare: LocalCluster) -> None:
    a = FakeNode(bare, "fake-a", fails("step_failed", 500))
    out: dict[str, httpx.Response] = {}
    ask(bare, out).join(60)
    assert out["r"].status_code == 500
    assert out["r"].json()["error"]["code"] == "step_failed"
    assert len(a.generates) == 1
    a.kill()


def test_a_submit_sent_twice_runs_once_and_another_frontend_cannot_take_its_id(
    bare: LocalCluster,
) -> None:
    a = FakeNode(bare, "fake-a", silent)
    ctx = zmq.Context.instance()
    fronts = []
    for name in ("fe-1", "fe-2"):
        s = bare.as_member(ctx.socket(zmq.DEALER), role="frontend")
        s.setsockopt(zmq.LINGER, 0)
        s.connect(bare.broker_addr)
        s.send(P.encode(P.Hello(role="frontend", peer_id=name, name="api")))
        fronts.append(s)

    def next_of(sock: zmq.Socket, kind: type[P.Msg]) -> P.Msg:
        deadline = time.monotonic() + 30
        while sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            msg = P.decode(sock.recv())
            if isinstance(msg, kind):
                return msg
            if isinstance(msg, P.Heartbeat):
                sock.send(P.encode(P.Heartbeat()))
        raise AssertionError(f"no {kind.__name__}")

    one, two = fronts
    next_of(one, P.Welcome)
    next_of(two, P.Welcome)
    submit = P.Submit(
        rid="twice", model=FAKE, kind="completion", payload="x", params=SamplingParams()
    )
    one.send(P.encode(submit))
    next_of(one, P.Accepted)
    wait_until(lambda: a.generates, timeout=30)
    one.send(P.encode(submit))  # sent again: the same request
    two.send(P.encode(submit))  # another frontend's: refused
    refused = next_of(two, P.Fail)
    assert isinstance(refused, P.Fail) and refused.status == 409
    a.on_generate = answers  # (a second GENERATE would be answered, and seen)
    time.sleep(1.0)
    assert [g.rid for g in a.generates] == ["twice"]
    assert stats(bare)["submit_duplicate"] == 1
    for s in fronts:
        s.close(linger=0)
    a.kill()


def test_a_node_sent_generate_twice_runs_the_request_once(
    tiny_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_step_faults import GREEDY, PROMPT, Harness

    h = Harness(tiny_path, tmp_path, monkeypatch)
    try:
        g = P.Generate(rid="r", model="good", kind="completion", payload=PROMPT, params=sp(GREEDY))
        h.node.handle(g)
        h.node.tick()
        h.node.handle(g)  # resent while it runs
        h.run("r")
        h.submit("ref", "good", PROMPT)
        h.run("ref")
        assert h.tokens("r") == h.tokens("ref")
        assert [t for t, f in h.sent if f.get("rid") == "r" and t == "FAIL"] == []
        assert sum(1 for t, f in h.sent if f.get("rid") == "r" and f.get("finish")) == 1
        assert h.node.errors["generate_duplicate"] == 1
    finally:
        h.close()


def test_the_retry_rule_for_placement() -> None:
    """Rule 4 as a function of the request's state, and the broker applying it to
    hand-built requests (no model, no sockets)."""
    now, later = 100.0, 200.0
    assert retry.may_place_again("node_lost", 0, 1, now, later)
    assert not retry.may_place_again("node_lost", 1, 1, now, later)  # a token relayed
    assert not retry.may_place_again("node_lost", 0, 1, later, now)  # past its deadline
    assert not retry.may_place_again("node_lost", 0, retry.MAX_PLACEMENTS, now, later)
    assert not retry.may_place_again("context_length_exceeded", 0, 1, now, later)
    assert not retry.may_place_again("cancelled", 0, 1, now, later)

    reg, sent = Registry(), []
    deploy = Deployer(reg, lambda ident, msg: sent.append(msg) or True, lambda: None)  # type: ignore[arg-type, return-value]
    req = Requests(
        reg,
        deploy,
        None,  # type: ignore[arg-type]
        lambda ident, msg: sent.append(msg) or True,
        lambda ident, frame: True,
        lambda ident, why: None,
        lambda: None,  # type: ignore[arg-type, return-value]
        P.Counters(),
        60.0,
    )
    submit = P.Submit(rid="r", model="m", kind="completion", payload="x", params=SamplingParams())
    soon = time.monotonic() + 60
    req.lost(InFlight("r", b"fe", b"n", "m", soon, submit=submit), 503, "node_lost", "gone")
    assert "r" in reg.parked and reg.parked["r"].lost == "gone" and not sent
    del reg.parked["r"]
    told = InFlight("r", b"fe", b"n", "m", soon, relayed=1, submit=submit)
    req.lost(told, 503, "node_lost", "gone")
    assert "r" not in reg.parked and isinstance(sent[-1], P.Fail) and sent[-1].code == "node_lost"
    late = InFlight("r", b"fe", b"n", "m", time.monotonic() - 1, submit=submit)
    req.lost(late, 503, "node_lost", "gone")
    assert "r" not in reg.parked


# -- real processes ------------------------------------------------------------------------

# One long request fills a node's KV budget; a second waits behind it, no token yet.
NODE_ARGS = ["--idle-budget", "4", "--prefill-budget", "4", "--kv-budget-mb", "6"]


def queued_behind(c: LocalCluster) -> tuple[threading.Thread, dict[str, Any], dict[str, Any]]:
    """A streamed long request, and a queued one queued behind it on the same node
    (no token yet), each on a thread: their outcomes land in the dicts."""
    client = openai.OpenAI(
        base_url=f"{c.url}/v1", api_key="none", max_retries=0, timeout=120,
        default_headers=c.api_headers(),
    )  # fmt: skip
    long: dict[str, Any] = {"tokens": 0}

    def run_long() -> None:
        try:
            for _ in client.completions.create(
                model=TINY, prompt=[5, 6, 7], stream=True, extra_body={"ignore_eos": True},
                max_tokens=900, temperature=0,
            ):  # fmt: skip
                long["tokens"] += 1
        except openai.APIError as e:
            long["error"] = str(e)

    threading.Thread(target=run_long, daemon=True).start()
    wait_until(lambda: long["tokens"] >= 3)
    queued: dict[str, Any] = {}

    def run_queued() -> None:
        try:
            r = client.completions.create(
                model=TINY, prompt=[9, 10, 11], max_tokens=900, temperature=0,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            queued["text"] = r.choices[0].text
            queued["tokens"] = r.usage.completion_tokens if r.usage else 0
        except openai.APIError as e:
            queued["error"] = str(e)

    t = threading.Thread(target=run_queued, daemon=True)
    t.start()
    wait_until(
        lambda: any(n["status"].get("queued") for n in c.cluster_state()["nodes"]), timeout=30
    )
    return t, long, queued


def test_killed_node_its_streaming_request_fails_and_its_queued_one_is_answered_by_another(
    models_dir: Path, tmp_path: Path
) -> None:
    c = LocalCluster.on_free_ports(models_dir, log_dir=tmp_path, nodes=2, node_args=NODE_ARGS)
    with c:
        c.wait_nodes(2)
        t, long, queued = queued_behind(c)
        serving = next(r["node"] for r in c.cluster_state()["requests"] if r["state"] == "running")
        c.kill_node(int(serving.removeprefix("node")))
        t.join(90)
        assert "stopped responding" in long.get("error", ""), long
        assert "text" in queued, queued
        assert queued["tokens"] == 900
        assert stats(c)["placed_again"] == 1


def test_a_request_with_no_token_survives_a_broker_restart_in_the_split_deployment(
    models_dir: Path, tmp_path: Path
) -> None:
    c = LocalCluster.on_free_ports(
        models_dir, log_dir=tmp_path, broker_args=["--no-api"], node_args=NODE_ARGS
    )
    api = subprocess.Popen(
        [sys.executable, "-m", "exo.tools.main", "api", "--broker", c.broker_addr,
         "--port", str(c.api_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        c.start()
        wait_until(lambda: up(c))
        t, long, queued = queued_behind(c)
        assert c.broker is not None
        c.broker.kill()
        c.broker.wait()
        c.start_broker()
        t.join(90)
        assert "broker" in long.get("error", ""), long  # it had tokens: it fails
        assert "text" in queued, queued  # it had none: submitted again, answered
        assert queued["tokens"] == 900
    finally:
        api.terminate()
        api.wait(10)
        c.stop()


def test_a_node_started_before_its_broker_joins_when_the_broker_comes_up(
    models_dir: Path, tmp_path: Path
) -> None:
    c = LocalCluster.on_free_ports(models_dir, log_dir=tmp_path)
    try:
        c.keys()
        c.start_node(0)
        time.sleep(3)  # it dials a port nobody listens on, again and again
        c.start_broker()
        c.wait_nodes(1)
        r = httpx.post(
            f"{c.url}/v1/completions",
            json={"model": TINY, "prompt": [1, 2], "max_tokens": 4},
            headers=c.api_headers(),
            timeout=60,
        )
        assert r.status_code == 200
    finally:
        c.stop()
