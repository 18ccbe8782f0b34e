"""Hostile input on every door: frames a peer sends the broker or a node, HTTP
bodies, a rogue hub. Each attack fails, is counted, and the cluster keeps serving."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
import zmq

from exo.broker import protocol as P
from exo.nodes.store.download import Downloader, DownloadError
from exo.tools.cluster import LocalCluster
from tests.helpers import stream_acting, wait_until
from tests.hub import Hub

TINY = "test/tiny-llama"


def chat(url: str, **body: object) -> httpx.Response:
    body.setdefault("model", TINY)
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    body.setdefault("max_tokens", 3)
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def dealer(c: LocalCluster, role: str = "node") -> zmq.Socket:
    """A buggy or hostile member of the cluster: it holds the `role` key."""
    d = c.as_member(zmq.Context.instance().socket(zmq.DEALER), role)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(c.broker_addr)
    return d


def hello(d: zmq.Socket, role: str, peer_id: str, **fields: object) -> P.Msg:
    d.send(P.encode("HELLO", role=role, peer_id=peer_id, **fields))
    assert d.poll(5000)
    return P.decode(d.recv())


def node0(c: LocalCluster) -> dict:
    """The cluster's real node (a rogue one of an earlier test may not have expired yet)."""
    (n,) = [n for n in c.cluster_state()["nodes"] if n["name"] == "node0"]
    return n


def alive(c: LocalCluster) -> None:
    assert c.broker is not None and c.broker.poll() is None
    assert all(p is not None and p.poll() is None for p in c.node_procs)
    assert chat(c.url).status_code == 200


@pytest.mark.parametrize(
    "info",
    [
        [1],
        {"models": [[1]]},
        {"models": ["m"], "model_meta": {"m": {"layers": "many"}}},
        {"interfaces": [1]},
        {"interfaces": [{"name": "x", "networks": [7]}]},
        {"memory_available": -(1 << 40)},
        {"memory_pressure": "high"},
        {"peer_port": 1 << 20},
        {"models": ["m"] * 10_000},
        {"x": [[[[[[[[[[[1]]]]]]]]]]]},
    ],
)
def test_a_node_hello_with_bad_facts_is_refused_and_the_broker_serves_on(
    cluster: LocalCluster, info: object
) -> None:
    d = dealer(cluster)
    try:
        if isinstance(info, dict):
            msg = hello(d, "node", "rogue", info=info)
            assert isinstance(msg, P.Refused) and "bad info" in msg.reason
        else:  # not even the map a HELLO's info is: a bad frame, dropped unanswered
            d.send(P.encode("HELLO", role="node", peer_id="rogue", info=info))
            assert not d.poll(1000)
    finally:
        d.close()
    assert "rogue" not in str(cluster.cluster_state()["nodes"])
    alive(cluster)


def test_bad_reports_after_hello_are_dropped_and_the_node_keeps_its_last_good_ones(
    cluster: LocalCluster,
) -> None:
    d = dealer(cluster)
    try:
        assert hello(d, "node", "flaky", info={"models": []}).type == "WELCOME"
        d.send(P.encode("INFO", info={"models": [[1]]}))
        d.send(P.encode("INFO", info={"interfaces": [1]}))
        d.send(P.encode("HEARTBEAT", status={"running": -50}))
        d.send(P.encode("HEARTBEAT", status={"downloads": [{"model": 3}]}))
        d.send(P.encode("HEARTBEAT", status={"stages": {"i": "ready"}}))
        d.send(P.encode("HEARTBEAT", status={"probes": {"k": {"at": "now"}}}))
        d.send(P.encode("HEARTBEAT", status=[1]))  # not a map: a bad frame
        time.sleep(0.5)
        d.send(P.encode("HEARTBEAT"))  # still here
        state = cluster.cluster_state()
        (flaky,) = [n for n in state["nodes"] if n["id"] == "flaky"]
        assert flaky["info"]["models"] == [] and flaky["status"] == {}
        assert state["dropped"].get("bad_report", 0) >= 6
        assert state["dropped"].get("bad_fields", 0) >= 1
    finally:
        d.close()
    alive(cluster)


def test_a_frontend_with_a_bad_instances_spec_or_params_cannot_stop_anything(
    cluster: LocalCluster,
) -> None:
    d = dealer(cluster, "frontend")
    try:
        assert hello(d, "frontend", "rogue-api").type == "WELCOME"
        d.send(msgpack.packb({"v": 1, "t": "INSTANCES", "qid": "q1", "op": "place", "spec": [1]}))
        d.send(P.encode("INSTANCES", qid="q2", op="place", spec={"model": TINY, "stages": 5}))
        d.send(P.encode("INSTANCES", qid="q3", op="place", spec={"model": TINY, "nodes": [[]]}))
        # Sampling parameters no API would send: the frame does not decode at the
        # broker, which tells the frontend (FAIL 400) rather than leave it waiting.
        bad_params = [
            {"seed": -1, "temperature": 0, "max_tokens": 2},  # fine: any signed 64-bit seed
            {"seed": 1.5},
            {"temperature": "hot"},
            {"max_tokens": -3},
            {"top_p": 0},
            {"stop": [1, 2]},
        ]
        for i, params in enumerate(bad_params):
            d.send(
                P.encode(
                    "SUBMIT",
                    rid=f"bad-{i}",
                    model=TINY,
                    kind="chat",
                    payload=[{"role": "user", "content": "hi"}],
                    params=params,
                )
            )
        replies: dict[str, P.Reply] = {}
        ended: dict[str, P.Tokens | P.Fail] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(ended) < len(bad_params):
            if not d.poll(500):
                continue
            msg = P.decode(d.recv())
            if isinstance(msg, P.Reply):
                replies[msg.qid] = msg
            elif isinstance(msg, P.Fail) or (isinstance(msg, P.Tokens) and msg.finish):
                ended[msg.rid] = msg
        assert isinstance(ended["bad-0"], P.Tokens)
        for i in range(1, len(bad_params)):
            failed = ended[f"bad-{i}"]
            assert isinstance(failed, P.Fail), failed
            assert failed.status == 400 and failed.code == "invalid_params"
        assert "q1" not in replies  # a spec that is not a map is a bad frame
        for q in ("q2", "q3"):
            assert replies[q].data["status"] == 400, replies[q]
    finally:
        d.close()
    assert cluster.cluster_state()["dropped"].get("bad_fields", 0) >= 1
    alive(cluster)


def test_http_bounds_answer_4xx_in_openais_shape(cluster: LocalCluster) -> None:
    url = cluster.url
    bounds: list[tuple[dict[str, Any], str]] = [
        ({"seed": 1 << 64}, "seed"),
        ({"seed": -(1 << 63) - 1}, "seed"),
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"max_completion_tokens": 1 << 40}, "max_completion_tokens"),
        ({"stop": ["x" * 5000]}, "stop"),
    ]
    for body, param in bounds:
        r = chat(url, **body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param
    # the whole signed 64-bit range is a seed, and a seed gives the same tokens
    a = chat(url, seed=-1, temperature=1.0, max_tokens=8)
    b = chat(url, seed=-1, temperature=1.0, max_tokens=8)
    assert a.status_code == 200 and a.json()["choices"][0] == b.json()["choices"][0]
    assert chat(url, seed=(1 << 63) - 1).status_code == 200
    # a body over the limit is 413 whether it says its length or not
    big = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (5 << 20) + b'"}]}'
    r = httpx.post(f"{url}/v1/chat/completions", content=big, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: chunked transfer encoding
        for _ in range(6):
            yield b"a" * (1 << 20)

    r = httpx.post(f"{url}/v1/chat/completions", content=chunks(), timeout=60)
    assert r.status_code == 413
    deep = b'{"model": "a/b", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    for path in ("/v1/chat/completions", "/v1/models/pull", "/v1/instances"):
        r = httpx.post(f"{url}{path}", content=deep, timeout=60)
        assert r.status_code == 400, (path, r.status_code, r.text[:200])
        assert r.headers["content-type"].startswith("application/json")
    for model in ("../../etc", "a/../../b", "/abs/path", "a--b/c", "x/" + "y" * 200):
        r = httpx.post(f"{url}/v1/models/pull", json={"model": model}, timeout=10)
        assert r.status_code == 400, (model, r.text)
    alive(cluster)


def test_bad_act_frames_at_a_nodes_peer_port_are_dropped_and_counted(
    cluster: LocalCluster,
) -> None:
    node = node0(cluster)
    port = node["info"]["peer_port"]
    d = cluster.as_member(zmq.Context.instance().socket(zmq.DEALER), peer=True)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(f"tcp://127.0.0.1:{port}")
    good = np.zeros((2, 4), dtype=np.float32).tobytes()
    header = {"instance": "nope", "step": 1, "decode": [], "chunks": []}
    for shape, data in [
        ([-1, -8], good),
        (["2", "4"], good),
        ([2, 4, 1], good),
        ([True, 8], good),
        ([1 << 40, 1 << 40], good),
        ([2, 4], good[:-4]),
    ]:
        d.send_multipart([P.encode("ACT", shape=shape, **header), data])
    d.send_multipart([P.encode("ACT", shape=[2, 4], **header), good])  # no such instance
    d.send_multipart([b"\xc1", good])
    # a frame far over any step's hidden states costs the sender its connection
    d.send_multipart([P.encode("ACT", shape=[1, 1], **header), b"\0" * (200 << 20)])
    d.close()

    def counted() -> bool:
        # Shapes that are not integers fail the ACT's type (bad_fields); the rest
        # do not fit their bytes (bad_tensor).
        dropped = node0(cluster)["status"]["peer_dropped"]
        return dropped.get("bad_tensor", 0) + dropped.get("bad_fields", 0) >= 6

    wait_until(counted, 15)
    alive(cluster)


def test_many_idle_connections_to_the_weights_and_probe_ports_do_not_hold_the_node(
    cluster: LocalCluster,
) -> None:
    node = node0(cluster)
    socks = []
    try:
        for port in (node["info"]["weights_port"], node["info"]["probe_port"]):
            for _ in range(300):
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                socks.append(s)
        time.sleep(1.0)
        alive(cluster)
        # the weights server still answers once a slot is free (the idle ones time out)
    finally:
        for s in socks:
            s.close()
    wport = node["info"]["weights_port"]

    token = {"authorization": f"Bearer {cluster.keys().secret('weights')}"}

    def lists() -> bool:
        try:
            r = httpx.get(f"http://127.0.0.1:{wport}/api/models/{TINY}", headers=token, timeout=5)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    wait_until(lists, 30)


def test_a_rogue_hub_cannot_write_outside_the_model_folder(tiny_path: Path, tmp_path: Path) -> None:
    outside = tmp_path / "evil.pth"
    dest = tmp_path / "models" / "hubtest--m"
    for listed in ("../../evil.pth", str(outside), "a/../../../evil.pth", "x.partial", ""):
        with Hub({"hubtest/m": tiny_path}) as hub:
            hub.faults.listed_as["config.json"] = listed
            with pytest.raises(DownloadError, match="outside|listed"):
                Downloader(hub=hub.url, stall_timeout=5).download("hubtest/m", dest)
        assert not outside.exists()
        assert not any(p.name == "evil.pth" for p in tmp_path.rglob("*"))
    # a link in the folder pointing out is no way out either
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "sub").symlink_to(tmp_path)
    with Hub({"hubtest/m": tiny_path}) as hub:
        hub.faults.listed_as["config.json"] = "sub/evil.pth"
        with pytest.raises(DownloadError, match="outside"):
            Downloader(hub=hub.url, stall_timeout=5).download("hubtest/m", dest)
    assert not outside.exists()
    for bad in ("../x", "a/b/c", "..", "a--b"):
        with pytest.raises(DownloadError, match="not a model id"):
            Downloader(hub="http://127.0.0.1:9").download(bad, tmp_path / "z")


def test_a_source_that_sends_more_than_it_listed_fails_without_filling_the_disk(
    tiny_path: Path, tmp_path: Path
) -> None:
    weights = "model.safetensors"
    with Hub({"hubtest/m": tiny_path}) as hub:
        hub.faults.listed_size[weights] = 1024
        with pytest.raises(DownloadError, match="more than the 1024 bytes"):
            Downloader(hub=hub.url, stall_timeout=5).download("hubtest/m", tmp_path / "m")
    part = tmp_path / "m" / f"{weights}.partial"
    assert not part.exists() or part.stat().st_size <= 1024


@pytest.fixture(scope="module")
def keyed(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A cluster whose API takes two keys."""
    c = LocalCluster.on_free_ports(
        models_dir,
        log_dir=tmp_path_factory.mktemp("keyed-logs"),
        broker_args=["--api-key", "key-one", "--api-key", "key-two"],
    )
    with c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_api_keys_are_required_and_any_configured_one_works(keyed: LocalCluster) -> None:
    import openai

    url = keyed.url
    for headers in ({}, bearer("wrong"), {"authorization": "Basic a2V5LW9uZQ=="}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
            r = httpx.request(method, f"{url}{path}", headers=headers, json={}, timeout=10)
            assert r.status_code == 401, (headers, path, r.text)
            err = r.json()["error"]
            assert err["code"] == "invalid_api_key" and set(err) == {
                "message",
                "type",
                "param",
                "code",
            }
    body = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=bearer("key-one"), timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={"x-api-key": "key-two"}, timeout=60
    )
    assert r.status_code == 200, r.text
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="key-two", max_retries=0)
    assert client.chat.completions.create(**body).choices[0].message.content is not None
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(**body)


def test_no_web_page_can_drive_the_api(keyed: LocalCluster) -> None:
    url, key = keyed.url, bearer("key-one")
    # DNS rebinding: a page at evil.example, its name now resolving to 127.0.0.1
    r = httpx.get(f"{url}/v1/cluster", headers={**key, "host": "evil.example"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed"
    # a cross-site "simple" POST: refused before any handler reads it
    for origin in ("http://evil.example", "null", f"http://evil.example:{keyed.api_port}"):
        r = httpx.post(
            f"{url}/v1/models/pull",
            content=b'{"model": "a/b"}',
            headers={**key, "origin": origin, "content-type": "text/plain"},
            timeout=10,
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    # the API's own origin (the dashboard) is welcome, with CORS headers
    own = f"http://127.0.0.1:{keyed.api_port}"
    r = httpx.get(f"{url}/v1/models", headers={**key, "origin": own}, timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == own
    r = httpx.options(
        f"{url}/v1/chat/completions",
        headers={"origin": own, "access-control-request-method": "POST"},
        timeout=10,
    )
    assert r.status_code == 204 and "authorization" in r.headers["access-control-allow-headers"]


def test_only_the_caller_that_submitted_a_request_can_cancel_it(keyed: LocalCluster) -> None:
    import threading

    url = keyed.url
    body = {
        "model": TINY,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 1000,
        "stream": True,
        "ignore_eos": True,
    }
    rid: list[str] = []
    lines: list[str] = []

    def stream() -> None:
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers=bearer("key-one"), timeout=120
        ) as r:
            rid.append(r.headers["x-request-id"])
            for line in r.iter_lines():
                lines.append(line)

    t = threading.Thread(target=stream)
    t.start()
    wait_until(lambda: rid and len(lines) > 5, 30)
    r = httpx.post(f"{url}/v1/cancel/{rid[0]}", headers=bearer("key-two"), timeout=10)
    assert r.status_code == 404
    # nor another frontend at the broker, with the request's id in hand
    d = dealer(keyed, "frontend")
    try:
        assert hello(d, "frontend", "stranger").type == "WELCOME"
        d.send(P.encode("CANCEL", rid=rid[0], reason="explicit", qid="c1"))
        reply = P.decode(d.recv()) if d.poll(5000) else None
        while reply is not None and reply.type == "HEARTBEAT":  # (the broker's, any time)
            reply = P.decode(d.recv()) if d.poll(5000) else None
        assert isinstance(reply, P.Reply) and reply.data == {"found": False}
    finally:
        d.close()
    n = len(lines)
    time.sleep(0.5)
    assert t.is_alive() and len(lines) > n  # still streaming
    r = httpx.post(f"{url}/v1/cancel/{rid[0]}", headers=bearer("key-one"), timeout=10)
    assert r.status_code == 200
    t.join(30)
    assert not t.is_alive() and any("cancelled" in line for line in lines)


def test_a_stranger_claiming_the_apis_published_id_takes_nothing_over(
    keyed: LocalCluster,
) -> None:
    frontends = httpx.get(f"{keyed.url}/v1/cluster", headers=bearer("key-one"), timeout=10).json()[
        "frontends"
    ]
    (api_id,) = [f for f in frontends if f.startswith("api-")]
    d = keyed.as_member(zmq.Context.instance().socket(zmq.DEALER), "frontend")
    d.setsockopt(zmq.LINGER, 0)
    d.setsockopt(zmq.IDENTITY, api_id.encode())
    d.connect(keyed.broker_addr)
    try:
        assert hello(d, "frontend", api_id).type == "WELCOME"
        body = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        r = httpx.post(
            f"{keyed.url}/v1/chat/completions", json=body, headers=bearer("key-one"), timeout=60
        )
        assert r.status_code == 200, r.text
        for _ in range(10):  # the stranger got none of it
            if d.poll(100):
                assert P.decode(d.recv()).type == "HEARTBEAT"
    finally:
        d.close()


def test_a_corrupted_weights_file_is_neither_loaded_nor_served(
    tiny_path: Path, tmp_path: Path
) -> None:
    import shutil

    from exo.nodes.engine.model import load_model
    from exo.nodes.store import manifest
    from exo.nodes.store.store import ModelStore
    from exo.nodes.store.weights import WeightsServer

    models = tmp_path / "models"
    copy = models / "test--tiny-copy"
    shutil.copytree(tiny_path, copy)
    (copy / manifest.NAME).unlink(missing_ok=True)
    load_model("test/tiny-copy", copy)  # a folder copied in by hand: hashed on first sight
    assert set(manifest.read(copy)["files"]) >= {"config.json", "model.safetensors"}
    # a download keeps the hashes its source listed
    with Hub({"hubtest/m": copy}) as hub:
        Downloader(hub=hub.url).download("hubtest/m", tmp_path / "dl")
    got, want = manifest.read(tmp_path / "dl")["files"], manifest.read(copy)["files"]
    assert {k: v["sha256"] for k, v in got.items()} == {k: v["sha256"] for k, v in want.items()}
    # the same bytes touched are still good; other bytes of the same size are not
    weights = copy / "model.safetensors"
    weights.touch()
    manifest.verify(copy)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(manifest.Corrupt, match="model.safetensors"):
        load_model("test/tiny-copy", copy)
    server = WeightsServer(ModelStore(models), host="127.0.0.1")
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        r = httpx.get(f"{base}/api/models/test/tiny-copy", timeout=10)
        assert r.status_code == 409 and "sha256" in r.text
        r = httpx.get(f"{base}/test/tiny-copy/resolve/main/model.safetensors", timeout=10)
        assert r.status_code == 409
        r = httpx.get(f"{base}/test/tiny-copy/resolve/main/{manifest.NAME}", timeout=10)
        assert r.status_code == 404  # the node's own dot files are never served
        with pytest.raises(DownloadError):
            Downloader(hub=base, stall_timeout=5).download("test/tiny-copy", tmp_path / "peer")
        assert server.bytes_served == 0
    finally:
        server.close()


def test_a_stranger_without_the_clusters_keys_can_neither_join_nor_listen(
    cluster: LocalCluster,
) -> None:
    from exo.common import keys
    from exo.nodes.machine.prober import probe

    ctx = zmq.Context.instance()
    info = {"models": [TINY], "model_meta": {TINY: {"layers": 4, "bytes": 1}}}
    plain = ctx.socket(zmq.DEALER)  # no CURVE at all
    own = ctx.socket(zmq.DEALER)  # keys of its own, and the broker's public key (no secret)
    keys.connect_as(own, keys.Pair.new(), cluster.keys().broker)
    sub = ctx.socket(zmq.SUB)  # the PUB publishes the cluster's state every second
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        for s in (plain, own, sub):
            s.setsockopt(zmq.LINGER, 0)
        for s in (plain, own):
            s.connect(cluster.broker_addr)
            s.send(P.encode("HELLO", role="node", peer_id="stranger", info=info))
        sub.connect(f"tcp://127.0.0.1:{cluster.pub_port}")
        assert not plain.poll(1500) and not own.poll(100) and not sub.poll(1500)
    finally:
        for s in (plain, own, sub):
            s.close()
    assert "stranger" not in str(cluster.cluster_state()["nodes"])
    # the node key does not make a frontend: a role is its key, not a claim
    d = dealer(cluster, "node")
    try:
        msg = hello(d, "frontend", "sneaky")
        assert isinstance(msg, P.Refused) and "key" in msg.reason
    finally:
        d.close()
    # the nodes' plain-TCP servers want the cluster's token
    node = node0(cluster)
    r = httpx.get(f"http://127.0.0.1:{node['info']['weights_port']}/api/models/{TINY}", timeout=5)
    assert r.status_code == 401
    with pytest.raises((ConnectionError, OSError)):
        probe("127.0.0.1", "127.0.0.1", node["info"]["probe_port"], timeout=2.0)
    alive(cluster)


def test_a_flood_from_a_peer_the_broker_does_not_know_gets_one_reconnect(
    cluster: LocalCluster,
) -> None:
    d = dealer(cluster, "frontend")
    try:
        for i in range(200):  # never said HELLO
            d.send(P.encode("QUERY", qid=f"q{i}", what="cluster"))
        got = []
        while d.poll(500):
            got.append(P.decode(d.recv()).type)
        assert got == ["RECONNECT"], got
    finally:
        d.close()


def test_a_member_that_is_not_an_instances_stage_cannot_end_or_feed_its_requests(
    cluster: LocalCluster,
) -> None:
    """Holding the node key makes a peer a member of the cluster, not the stage
    after this one: its STAGE_ERROR and RESULT for a running instance are dropped,
    and the stream goes on to its end."""
    node = node0(cluster)
    d = cluster.as_member(zmq.Context.instance().socket(zmq.DEALER), peer=True)
    d.setsockopt(zmq.LINGER, 2000)
    d.connect(f"tcp://127.0.0.1:{node['info']['peer_port']}")
    body = {"model": TINY, "prompt": [1, 2], "max_tokens": 300, "ignore_eos": True}

    def stranger() -> None:
        stages = node0(cluster)["status"]["stages"]
        (iid,) = [i for i, s in stages.items() if s["model"] == TINY]
        d.send(P.encode(P.StageError(instance=iid, message="a stranger says stop")))
        d.send(P.encode(P.Result(instance=iid, step=10**9, ids=[1])))

    lines, _ = stream_acting(cluster.url, body, 2, stranger)
    d.close()
    assert lines[-1] == "data: [DONE]" and not [x for x in lines if '"error"' in x]
    chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    dropped = wait_until(lambda: node0(cluster)["status"]["peer_dropped"].get("not_its_stage"))
    assert dropped >= 2


def test_the_models_the_broker_remembers_are_bounded() -> None:
    """A node could list new model names in every INFO: what the broker keeps of
    them (for 503 rather than 404 once their nodes left) stays bounded."""
    from exo.broker.registry import MAX_SEEN, Peer, Registry

    reg = Registry()
    reg.peers[b"n"] = Peer(b"n", "n", "node", info={"models": ["a/held"]})
    for i in range(3):
        reg.saw_models([f"junk/{i}-{k}" for k in range(MAX_SEEN // 2)])
    assert len(reg.seen_models) <= MAX_SEEN
    reg.saw_models(["a/held"])
    assert "a/held" in reg.seen_models
