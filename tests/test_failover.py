"""A cable pulled mid-stream fails nobody (network-namespace test bed).

Host a runs the broker and node0, host b runs node1; a 1 Gbit/s "ethernet" link
and a 100 Mbit/s "wifi" link join them, and node1 reaches the broker over the
ethernet one. A model split over both nodes streams while the ethernet link goes
down on both ends: node1's session dials the broker's WiFi address, the broker
keeps it (and its stage) through the silence, the stage traffic moves to WiFi
and the step that was out on the dead link is sent again. Every stream ends with
every token, the same tokens as without the cut; no instance fails. Then the
link comes back and the stage traffic returns to it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import wait_until
from tests.netbed import Bed, need_root

MODEL = "test/tiny-llama"
PROMPTS = ["Once upon a time", "The quick brown fox", "A cluster of machines"]
TOKENS = 300


@pytest.fixture(scope="module")
def bed(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    need_root()
    b = Bed()
    try:
        wifi, eth = b.two_hosts()
        logs = tmp_path_factory.mktemp("failover-logs")
        with b.cluster(models_dir, broker_in="a", via={"b": eth[0]}, log_dir=logs) as c:
            yield {"bed": b, "cluster": c, "wifi": wifi, "ethernet": eth}
    finally:
        b.close()


def node(c: Any, name: str) -> dict[str, Any]:
    (n,) = [n for n in c.cluster_state()["nodes"] if n["name"] == name]
    return n


def streams(c: Any, during: Any = None, tokens: int = TOKENS) -> list[dict[str, Any]]:
    """The prompts streamed at once, greedy: each one's text, finish and tokens;
    `during` runs once every stream has 40 tokens."""
    out: list[dict[str, Any]] = [{"text": "", "n": 0, "finish": None} for _ in PROMPTS]
    started = threading.Barrier(len(PROMPTS) + 1, timeout=60)

    def one(i: int) -> None:
        body = {
            "model": MODEL,
            "prompt": PROMPTS[i],
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", f"{c.url}/v1/completions", json=body, timeout=120) as r:
            assert r.status_code == 200, r.read()
            told = False
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                import json

                choice = json.loads(line[6:])["choices"]
                if not choice:
                    continue
                out[i]["text"] += choice[0]["text"]
                out[i]["n"] += 1
                out[i]["finish"] = choice[0]["finish_reason"] or out[i]["finish"]
                if "error" in line:
                    out[i]["error"] = line
                if not told and out[i]["n"] >= 40:
                    told = True
                    started.wait()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    started.wait()
    if during is not None:
        during()
    for t in threads:
        t.join(timeout=180)
    return out


def test_a_link_pulled_mid_stream_fails_no_stream_and_traffic_returns(bed: dict) -> None:
    c, b = bed["cluster"], bed["bed"]
    (eth_a, eth_b), (wifi_a, wifi_b) = bed["ethernet"], bed["wifi"]
    ids = {n["name"]: n["id"] for n in c.cluster_state()["nodes"]}
    stages = [{"node": ids["node0"], "layers": [0, 2]}, {"node": ids["node1"], "layers": [2, 4]}]
    r = httpx.post(f"{c.url}/v1/instances", json={"model": MODEL, "stages": stages}, timeout=30)
    assert r.status_code == 201, r.text
    iid = r.json()["id"]

    def inst() -> dict[str, Any]:
        (i,) = [i for i in c.cluster_state()["instances"] if i["id"] == iid]
        return i

    wait_until(lambda: inst()["state"] == "ready" and inst()["routes"], timeout=120)
    assert f"//{eth_b}:" in inst()["routes"][0]["next"]  # ethernet carries the steps
    assert f"//{eth_a}:" in node(c, "node1")["status"]["broker"]["endpoint"]
    reference = streams(c)
    assert all(s["finish"] == "length" for s in reference), reference

    def pull() -> None:
        b.set_link("a", eth_a, up=False)
        b.set_link("b", eth_b, up=False)

    try:
        cut = streams(c, during=pull)
        assert [s["text"] for s in cut] == [s["text"] for s in reference]
        assert all(s["finish"] == "length" and "error" not in s for s in cut), cut
        assert inst()["state"] == "ready"
        st = node(c, "node1")["status"]
        # node1's session went over to the broker's WiFi address; the steps did too
        assert f"//{wifi_a}:" in st["broker"]["endpoint"] and st["broker"]["failovers"]
        assert f"//{wifi_b}:" in inst()["routes"][0]["next"]
        assert c.cluster_state()["stats"].get("resumed", 0) >= 1
    finally:
        b.set_link("a", eth_a, up=True)
        b.set_link("b", eth_b, up=True)
    # and back: the steps return to ethernet, and requests are served over it
    wait_until(lambda: f"//{eth_b}:" in inst()["routes"][0]["next"], timeout=20)
    n0 = node(c, "node0")["status"]["peer_bytes_sent"]
    before = sum(v for e, v in n0.items() if f"//{eth_b}:" in e)
    again = streams(c)
    assert [s["text"] for s in again] == [s["text"] for s in reference]
    n0 = node(c, "node0")["status"]["peer_bytes_sent"]
    assert sum(v for e, v in n0.items() if f"//{eth_b}:" in e) > before
    httpx.delete(f"{c.url}/v1/instances/{iid}", timeout=10)
    wait_until(lambda: not c.cluster_state()["instances"], timeout=20)


def test_a_link_that_flaps_twice_in_ten_seconds_fails_no_stream(bed: dict) -> None:
    c, b = bed["cluster"], bed["bed"]
    (eth_a, eth_b) = bed["ethernet"]
    ids = {n["name"]: n["id"] for n in c.cluster_state()["nodes"]}
    stages = [{"node": ids["node0"], "layers": [0, 2]}, {"node": ids["node1"], "layers": [2, 4]}]
    r = httpx.post(f"{c.url}/v1/instances", json={"model": MODEL, "stages": stages}, timeout=30)
    assert r.status_code == 201, r.text
    iid = r.json()["id"]
    wait_until(
        lambda: [i for i in c.cluster_state()["instances"] if i["state"] == "ready"], timeout=120
    )
    reference = streams(c, tokens=900)

    def flap() -> None:
        for _ in range(2):
            b.set_link("a", eth_a, up=False)
            b.set_link("b", eth_b, up=False)
            time.sleep(2)
            b.set_link("a", eth_a, up=True)
            b.set_link("b", eth_b, up=True)
            time.sleep(2)

    try:
        got = streams(c, during=flap, tokens=900)
    finally:
        b.set_link("a", eth_a, up=True)
        b.set_link("b", eth_b, up=True)
    assert [s["text"] for s in got] == [s["text"] for s in reference]
    assert all(s["finish"] == "length" and "error" not in s for s in got), got
    (inst,) = [i for i in c.cluster_state()["instances"] if i["id"] == iid]
    assert inst["state"] == "ready"
    httpx.delete(f"{c.url}/v1/instances/{iid}", timeout=10)


# -- the pure parts -------------------------------------------------------------------


def test_a_session_tries_the_brokers_other_addresses_its_own_networks_first() -> None:
    from exo.broker import protocol as P
    from exo.common.dealer import Session

    s = Session(
        "tcp://10.0.1.1:5",
        "n",
        lambda: P.Hello(role="node", peer_id="n"),
        silent_s=1.0,
        usable=lambda ep: "10.0." in ep,
    )
    listed = ["tcp://10.231.0.2:5", "tcp://10.0.1.1:5", "tcp://10.0.2.1:5"]
    assert s.on(P.Welcome(peer_id="n", addresses=listed)) == "welcome"
    # the one given first, then the listed ones on this machine's networks
    assert s.endpoints == ["tcp://10.0.1.1:5", "tcp://10.0.2.1:5", "tcp://10.231.0.2:5"]
    assert not s.silent(s.last_heard + 0.5) and s.silent(s.last_heard + 1.5)
    s.next_endpoint()
    assert s.broker == "tcp://10.0.2.1:5" and s.failovers[-1]["from"] == "tcp://10.0.1.1:5"
    # the broker kept it: its work goes on; a broker that forgot it: start over
    assert s.on(P.Welcome(peer_id="n", resumed=True)) == "resumed"
    assert s.on(P.Welcome(peer_id="n")) == "again"
    s.next_endpoint()
    s.next_endpoint()
    assert s.broker == "tcp://10.0.1.1:5"  # round and round: the first may come back


def test_a_step_out_is_sent_again_after_a_few_round_trips() -> None:
    from exo.nodes.pipeline import stage0 as s0

    st = s0.Stage0()
    sent: list[int] = []
    st.hop = lambda lm, act, h: sent.append(act.step)
    from exo.broker import protocol as P

    act = P.Act(instance="i", step=7, decode=[], chunks=[], shape=[0, 4])
    w = s0.Remote(7, [], [], s0.StepPlan(), [], t0=100.0, act=act, h=object(), sent=100.0)  # type: ignore[arg-type]
    st.out["m"] = w
    st.round_trip["m"] = 0.2
    assert st.due(100.5) == []  # 4 round trips (0.8 s) not yet past
    assert st.due(100.9) == [("m", w)]
    assert st.resend("m", None) and sent == [7] and w.resends == 1  # type: ignore[arg-type]
    st.round_trip["m"] = 0.0
    assert st.due(w.sent + 0.4) == [] and st.due(w.sent + 0.6)  # never under STEP_RESEND_MIN_S
    assert st.back("m", 7) is w and st.round_trip["m"] == 0.0  # a resent step teaches nothing


def test_a_stage_is_given_up_on_after_its_measured_pace_not_a_fixed_time() -> None:
    import time

    from exo.nodes.pipeline import stage0 as s0

    st = s0.Stage0()
    now = time.perf_counter()
    st.out["m"] = s0.Remote(1, [], [], s0.StepPlan(), [], t0=now - 12)
    st.round_trip["m"] = 0.05  # 100 round trips: 5 s, under the 10 s floor
    assert [m for m, _ in st.stalled(cap=30)] == ["m"]
    st.round_trip["m"] = 0.5  # 50 s: the cap (--stage-timeout) decides
    assert st.stalled(cap=30) == [] and [m for m, _ in st.stalled(cap=11)] == ["m"]


def test_the_broker_relays_each_tokens_seq_once() -> None:
    from exo.broker import protocol as P
    from exo.broker.cancels import Cancels
    from exo.broker.registry import InFlight, Peer, Registry
    from exo.broker.requests import Requests

    reg = Registry()
    relayed: list[bytes] = []
    stats = P.Counters()

    class Pub:
        def send_multipart(self, parts: list[bytes]) -> None:
            pass

    def send_raw(ident: bytes, frame: Any) -> bool:
        relayed.append(bytes(frame))
        return True

    cancels = Cancels(send_raw, Pub(), stats)  # type: ignore[arg-type]
    reqs = Requests(
        reg,
        None,  # type: ignore[arg-type]  # (no placement: already placed)
        cancels,
        lambda i, m: True,
        send_raw,
        lambda i, w: None,
        lambda: ({}, []),
        stats,
        60.0,
    )
    node = Peer(b"n", "n", "node")
    reg.requests["r"] = InFlight("r", b"fe", b"n", "m")
    for seq in (1, 2, 2, 1, 3):
        frame = P.encode(P.Tokens(rid="r", ids=[seq], text=str(seq), seq=seq))
        reqs.on_node_reply(node, P.decode(frame), frame)  # type: ignore[arg-type]
    assert [P.decode(f).ids for f in relayed] == [[1], [2], [3]]  # type: ignore[attr-defined]
    assert stats["tokens_duplicate"] == 2


def test_linkstat_says_what_each_link_carries_and_the_last_failover() -> None:
    from exo.tools.linkstat import carries, failovers

    link = {"a": {"address": "10.0.1.1"}, "b": {"address": "10.0.1.2"}}
    moved = {"from": "tcp://10.0.2.1:5", "to": "tcp://10.0.1.1:5"}
    state = {
        "nodes": [
            {
                "name": "b",
                "status": {"broker": {"endpoint": "tcp://10.0.1.1:5", "failovers": [moved]}},
            },
            {"name": "a", "status": {"broker": {"endpoint": "tcp://127.0.0.1:5"}}},
        ],
        "instances": [{"id": "inst-1", "routes": [{"next": "tcp://10.0.1.2:7"}, {}]}],
    }
    assert carries(state, link) == "broker<-b, inst-1 steps"
    assert failovers(state) == "b: tcp://10.0.2.1:5 -> tcp://10.0.1.1:5"


def test_wifi_alone_of_three_links_carries_everything_and_fails_no_stream(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    need_root()
    b = Bed()
    try:
        wifi, eth = b.two_hosts()
        tb = b.link("a", "b", "thunderbolt")
        logs = tmp_path_factory.mktemp("failover3-logs")
        with b.cluster(models_dir, broker_in="a", via={"b": tb[0]}, log_dir=logs) as c:
            ids = {n["name"]: n["id"] for n in c.cluster_state()["nodes"]}
            stages = [
                {"node": ids["node0"], "layers": [0, 2]},
                {"node": ids["node1"], "layers": [2, 4]},
            ]
            r = httpx.post(
                f"{c.url}/v1/instances", json={"model": MODEL, "stages": stages}, timeout=30
            )
            assert r.status_code == 201, r.text

            def next_hop() -> str:
                (i,) = c.cluster_state()["instances"]
                return str(i["routes"][0]["next"]) if i["state"] == "ready" else ""

            wait_until(lambda: f"//{tb[1]}:" in next_hop(), timeout=120)  # the fastest
            reference = streams(c)

            def pull_two() -> None:
                for ends in (tb, eth):
                    b.set_link("a", ends[0], up=False)
                    b.set_link("b", ends[1], up=False)

            got = streams(c, during=pull_two)
            assert [s["text"] for s in got] == [s["text"] for s in reference]
            assert all(s["finish"] == "length" and "error" not in s for s in got), got
            assert f"//{wifi[1]}:" in next_hop()
            (n1,) = [n for n in c.cluster_state()["nodes"] if n["name"] == "node1"]
            assert f"//{wifi[0]}:" in n1["status"]["broker"]["endpoint"]
    finally:
        b.close()
