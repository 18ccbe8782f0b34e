"""Property-based fuzz of every message type at the broker and of ACT frames at a
node: members of the cluster (they hold its keys) sending whatever hypothesis
makes. No process dies, and the cluster serves a real request afterwards."""

from __future__ import annotations

import time
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exo.broker import protocol as P
from exo.tools.cluster import LocalCluster, free_port

TINY = "test/tiny-llama"

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=24)
    | st.binary(max_size=24)
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def typed(kind: Any) -> st.SearchStrategy[Any]:
    """Mostly a value of the field's declared type, sometimes anything at all."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Annotated:
        return typed(args[0])
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[typed(a) for a in args], values)
    right = {
        str: st.text(max_size=40) | st.sampled_from([TINY, "chat", "completion", "place", "list"]),
        int: st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
        float: st.floats(allow_nan=True, allow_infinity=True),
        dict: st.dictionaries(st.text(max_size=12), values, max_size=6),
        list: st.lists(values, max_size=6),
    }
    return st.one_of(right.get(origin or kind, values), values)


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, bytes]:
    role = draw(st.sampled_from(["node", "frontend"]))
    type_ = draw(st.sampled_from(sorted(P.TYPES)))
    fields = {
        f.name: draw(typed(f.type))
        for f in msgspec.structs.fields(P.TYPES[type_])
        if f.name != "v" and (f.required or draw(st.booleans()))
    }
    fields.update(draw(st.dictionaries(st.text(max_size=8), values, max_size=2)))
    fields["v"], fields["t"] = P.VERSION, type_
    return role, msgpack.packb(fields, use_bin_type=True)


@pytest.fixture(scope="module")
def fuzzed(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # A download a fuzzed PULL asks for goes nowhere: no hub but a closed port here.
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_OFFLINE": "1"}
    c = LocalCluster.on_free_ports(
        models_dir, log_dir=tmp_path_factory.mktemp("fuzz-logs"), env=env
    )
    with c:
        yield c


def member(c: LocalCluster, role: str) -> zmq.Socket:
    d = c.as_member(zmq.Context.instance().socket(zmq.DEALER), role)
    d.setsockopt(zmq.LINGER, 0)
    d.setsockopt(zmq.RCVHWM, 100_000)
    d.connect(c.broker_addr)
    d.send(P.encode("HELLO", role=role, peer_id=f"fuzz-{role}", info={}))
    return d


def serves(c: LocalCluster) -> None:
    assert c.broker is not None and c.broker.poll() is None
    assert all(p is not None and p.poll() is None for p in c.node_procs)
    body = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    r = httpx.post(f"{c.url}/v1/chat/completions", json=body, headers=c.api_headers(), timeout=60)
    assert r.status_code == 200, r.text


def test_every_message_type_fuzzed_at_the_broker_stops_nothing(fuzzed: LocalCluster) -> None:
    socks = {role: member(fuzzed, role) for role in ("node", "frontend")}
    sent = {"n": 0}

    @settings(
        max_examples=400,
        deadline=None,
        derandomize=True,  # the same examples every run: CI is reproducible
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(messages())
    def one(msg: tuple[str, bytes]) -> None:
        role, frame = msg
        socks[role].send(frame)
        sent["n"] += 1
        if sent["n"] % 50 == 0:  # a HELLO now and then keeps both registered
            for r, s in socks.items():
                s.send(P.encode("HELLO", role=r, peer_id=f"fuzz-{r}", info={}))

    try:
        one()
    finally:
        for s in socks.values():
            s.close()
    time.sleep(1.0)
    serves(fuzzed)
    state = fuzzed.cluster_state()
    dropped, stats = state["dropped"], state["stats"]
    assert sum(dropped.values()) > 0, dropped
    # Every bad frame was refused by a check, none by a guard catching a crash.
    assert dropped.get("handler_error", 0) == 0, dropped
    assert not [k for k in stats if k.startswith("tick_error")], stats


def test_act_frames_fuzzed_at_a_nodes_peer_port_stop_nothing(fuzzed: LocalCluster) -> None:
    (node,) = [n for n in fuzzed.cluster_state()["nodes"] if n["name"] == "node0"]
    d = fuzzed.as_member(zmq.Context.instance().socket(zmq.DEALER), peer=True)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(f"tcp://127.0.0.1:{node['info']['peer_port']}")

    @settings(
        max_examples=200,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        st.sampled_from(["ACT", "RESULT", "STAGE_ERROR"]),
        st.dictionaries(
            st.sampled_from(
                ["instance", "step", "decode", "chunks", "shape", "new", "drops", "ids", "message"]
            ),
            values,
            max_size=9,
        ),
        st.binary(max_size=256),
    )
    def one(type_: str, fields: dict[str, Any], tensor: bytes) -> None:
        header = msgpack.packb({**fields, "v": P.VERSION, "t": type_}, use_bin_type=True)
        d.send_multipart([header, tensor])

    try:
        one()
    finally:
        d.close()
    time.sleep(1.0)
    serves(fuzzed)
    (node,) = [n for n in fuzzed.cluster_state()["nodes"] if n["name"] == "node0"]
    # refused by the checks (counted in peer_dropped), never by a guard catching a crash
    assert node["status"]["errors"] == {}, node["status"]["errors"]
    assert sum(node["status"]["peer_dropped"].values()) > 0
