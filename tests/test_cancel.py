"""A request's end, for any reason, stops its work on the node within a step."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import zmq

from exo.broker import protocol as P
from exo.tools.cluster import LocalCluster
from tests.helpers import wait_until

TINY = "test/tiny-llama"
LONG = {"max_tokens": 900, "temperature": 0, "ignore_eos": True}
# Small budgets so that every state lasts long enough to be caught: prompts
# prefill a few tokens per step, and only one long request fits in KV memory.
NODE_ARGS = ["--idle-budget", "4", "--prefill-budget", "4", "--kv-budget-mb", "6"]


@pytest.fixture(scope="module")
def slow_cluster(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    c = LocalCluster.on_free_ports(
        models_dir, log_dir=tmp_path_factory.mktemp("cancel"), node_args=NODE_ARGS
    )
    with c:
        yield c


def node_status(c: LocalCluster) -> dict[str, Any]:
    return c.cluster_state()["nodes"][0]["status"]


def idle(c: LocalCluster) -> bool:
    s, state = node_status(c), c.cluster_state()
    return (
        s["running"],
        s["prefilling"],
        s["queued"],
        s["kv_bytes"],
        state["requests_active"],
    ) == (0, 0, 0, 0, 0)


def assert_cancelled_on_node(c: LocalCluster, rid: str) -> None:
    wait_until(lambda: any(x[0] == rid for x in node_status(c)["recent_cancels"]))
    wait_until(lambda: idle(c))


def stats(c: LocalCluster) -> dict[str, int]:
    return c.cluster_state()["stats"]


def start_stream(
    c: LocalCluster, body: dict, headers: dict | None = None
) -> tuple[httpx.Client, httpx.Response, str]:
    client = httpx.Client(timeout=60)
    req = client.build_request(
        "POST",
        f"{c.url}/v1/completions",
        json={"model": TINY, "stream": True, **body},
        headers=headers or {},
    )
    r = client.send(req, stream=True)
    assert r.status_code == 200, r.read()
    return client, r, r.headers["x-request-id"]


def reference(c: LocalCluster) -> list[int]:
    r = httpx.post(
        f"{c.url}/v1/completions",
        timeout=60,
        json={
            "model": TINY,
            "prompt": [7, 8, 9],
            "max_tokens": 12,
            "temperature": 0,
            "return_token_ids": True,
        },
    )
    return r.json()["choices"][0]["token_ids"]


def test_disconnect_while_streaming(slow_cluster: LocalCluster) -> None:
    c = slow_cluster
    before = stats(c).get("cancelled_disconnect", 0)
    client, r, rid = start_stream(c, {"prompt": [5, 6, 7], **LONG})
    lines = r.iter_lines()
    while not next(lines).startswith('data: {"id"'):
        pass
    wait_until(lambda: node_status(c)["running"] == 1)
    r.close()
    client.close()
    assert_cancelled_on_node(c, rid)
    assert stats(c)["cancelled_disconnect"] == before + 1


def test_disconnect_while_waiting_for_a_non_streaming_reply(slow_cluster: LocalCluster) -> None:
    c = slow_cluster
    before = stats(c).get("cancelled_disconnect", 0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{c.url}/v1/completions",
            json={"model": TINY, "prompt": [5, 6, 7], **LONG},
            timeout=1.0,
        )
    wait_until(lambda: stats(c).get("cancelled_disconnect", 0) == before + 1)
    wait_until(lambda: idle(c))


def test_deadline_non_streaming_is_a_504(slow_cluster: LocalCluster) -> None:
    c = slow_cluster
    r = httpx.post(
        f"{c.url}/v1/completions",
        json={"model": TINY, "prompt": [5, 6, 7], **LONG},
        timeout=60,
        headers={"X-Request-Timeout": "0.5"},
    )
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "deadline_exceeded"
    assert_cancelled_on_node(c, r.headers["x-request-id"])


def test_deadline_mid_stream_is_an_error_event(slow_cluster: LocalCluster) -> None:
    c = slow_cluster
    oa = openai.OpenAI(base_url=f"{c.url}/v1", api_key="none", max_retries=0)
    got = 0
    with pytest.raises(openai.APIError, match="deadline"):
        for _ in oa.completions.create(
            model=TINY,
            prompt=[5, 6, 7],
            stream=True,
            extra_body={"ignore_eos": True},
            max_tokens=900,
            temperature=0,
            extra_headers={"X-Request-Timeout": "1"},
        ):
            got += 1
    assert got > 1
    wait_until(lambda: idle(c))
    bad = httpx.post(
        f"{c.url}/v1/completions",
        json={"model": TINY, "prompt": "x"},
        timeout=10,
        headers={"X-Request-Timeout": "soon"},
    )
    assert bad.status_code == 400


def test_explicit_cancel_while_decoding(slow_cluster: LocalCluster) -> None:
    c = slow_cluster
    client, r, rid = start_stream(c, {"prompt": [5, 6, 7], **LONG})
    lines = r.iter_lines()
    first = next(line for line in lines if line.startswith("data: {"))
    assert json.loads(first[6:])["id"] == f"cmpl-{rid}"
    wait_until(lambda: node_status(c)["running"] == 1)
    assert httpx.post(f"{c.url}/v1/cancel/cmpl-{rid}", timeout=10).json()["cancelled"] is True
    rest = [line for line in lines if line]
    assert any('"code":"cancelled"' in line for line in rest) and rest[-1] == "data: [DONE]"
    client.close()
    assert_cancelled_on_node(c, rid)
    assert httpx.post(f"{c.url}/v1/cancel/{rid}", timeout=10).status_code == 404
    assert httpx.post(f"{c.url}/v1/cancel/nosuchrequest", timeout=10).status_code == 404


def test_explicit_cancel_while_prefilling(slow_cluster: LocalCluster) -> None:
    c = slow_cluster
    client, r, rid = start_stream(
        c, {"prompt": [3 + i % 500 for i in range(900)], "max_tokens": 5, "temperature": 0}
    )
    wait_until(lambda: node_status(c)["prefilling"] == 1)
    assert httpx.post(f"{c.url}/v1/cancel/{rid}", timeout=10).status_code == 200
    client.close()
    assert_cancelled_on_node(c, rid)


def test_explicit_cancel_while_queued_leaves_the_others_untouched(
    slow_cluster: LocalCluster,
) -> None:
    c = slow_cluster
    expected = reference(c)
    c1, r1, running = start_stream(c, {"prompt": [5, 6, 7], **LONG})
    wait_until(lambda: node_status(c)["running"] == 1)
    c2, r2, queued = start_stream(c, {"prompt": [8, 9], **LONG})
    wait_until(lambda: node_status(c)["queued"] == 1)
    assert httpx.post(f"{c.url}/v1/cancel/{queued}", timeout=10).status_code == 200
    wait_until(
        lambda: (
            node_status(c)["queued"] == 0
            and any(x[0] == queued for x in node_status(c)["recent_cancels"])
        )
    )
    assert node_status(c)["running"] == 1  # the other one is still going
    assert httpx.post(f"{c.url}/v1/cancel/{running}", timeout=10).status_code == 200
    for cl in (c1, c2):
        cl.close()
    wait_until(lambda: idle(c))
    assert reference(c) == expected


def test_a_storm_of_cancels_leaves_nothing_behind(models_dir: Path, tmp_path: Path) -> None:
    with LocalCluster.on_free_ports(models_dir, log_dir=tmp_path) as c:
        expected = reference(c)
        rng = random.Random(0)
        plan = [
            (rng.choice(["disconnect", "explicit"]), rng.randint(0, 12), rng.randint(2, 60))
            for _ in range(200)
        ]
        errors: list[str] = []

        def one(how: str, after: int, prompt_len: int) -> None:
            try:
                client, r, rid = start_stream(c, {"prompt": list(range(3, 3 + prompt_len)), **LONG})
                lines = r.iter_lines()
                for _ in range(after):
                    next(lines)
                if how == "explicit":
                    httpx.post(f"{c.url}/v1/cancel/{rid}", timeout=30)
                r.close()
                client.close()
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(repr(e))

        threads: list[threading.Thread] = []
        for args in plan:
            while sum(t.is_alive() for t in threads) >= 12:
                time.sleep(0.01)
            t = threading.Thread(target=one, args=args)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(60)
        assert not errors
        wait_until(lambda: idle(c), timeout=30)
        s = c.cluster_state()
        assert (
            s["stats"].get("cancelled_disconnect", 0) + s["stats"].get("cancelled_explicit", 0)
            >= 150
        )
        assert reference(c) == expected


def test_the_broker_resends_a_cancel_until_the_node_acknowledges(
    slow_cluster: LocalCluster,
) -> None:
    """A fake node on a real socket: it ignores the first CANCEL, and gets it again."""
    c = slow_cluster
    fake = c.as_member(zmq.Context.instance().socket(zmq.DEALER))
    fake.setsockopt(zmq.LINGER, 0)
    fake.connect(c.broker_addr)
    fake.send(
        P.encode(
            "HELLO",
            role="node",
            peer_id="fake-node",
            name="fake",
            info={
                "models": ["fake/model"],
                "model_meta": {"fake/model": {"layers": 1, "bytes": 1}},
                "memory_available": 1 << 30,
            },
        )
    )
    assert P.decode(fake.recv()).type == "WELCOME"
    status: dict = {"stages": {}}

    def recv(kind: str, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while fake.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            msg = P.decode(fake.recv())
            if msg.type == kind:
                return msg
            if isinstance(msg, P.Load):  # the broker places an instance on it first
                status["stages"][msg.instance] = {"state": "ready"}
            if msg.type in ("HEARTBEAT", "LOAD"):
                fake.send(P.encode("HEARTBEAT", status=status))
        raise AssertionError(f"no {kind}")

    holder: dict[str, httpx.Response] = {}
    t = threading.Thread(
        target=lambda: holder.setdefault(
            "r",
            httpx.post(
                f"{c.url}/v1/completions", json={"model": "fake/model", "prompt": "x"}, timeout=30
            ),
        )
    )
    t.start()
    rid = recv("GENERATE").rid
    assert httpx.post(f"{c.url}/v1/cancel/{rid}", timeout=10).status_code == 200
    assert recv("CANCEL").rid == rid
    assert recv("CANCEL").rid == rid  # not acknowledged: sent again
    fake.send(P.encode("CANCEL_ACK", rid=rid))
    time.sleep(1.0)
    while fake.poll(0):
        assert P.decode(fake.recv()).type != "CANCEL"
    assert c.cluster_state()["cancels_unacknowledged"] == 0
    t.join(30)
    assert holder["r"].status_code == 499
    fake.close()


@pytest.mark.skipif(
    os.geteuid() != 0 and not os.environ.get("CI"), reason="needs root for nftables"
)
def test_a_cancel_lost_on_pub_still_reaches_the_node(models_dir: Path, tmp_path: Path) -> None:
    """Every packet to the broker's PUB port is dropped, so the node's SUB never
    hears anything: the point-to-point cancel alone must do."""
    assert shutil.which("nft"), "nftables is installed by make test's system-deps"
    c = LocalCluster.on_free_ports(models_dir, log_dir=tmp_path)
    table = f"exotest{c.pub_port}"
    subprocess.run(["nft", "add", "table", "inet", table], check=True)
    try:
        subprocess.run(
            [
                "nft",
                "add",
                "chain",
                "inet",
                table,
                "out",
                "{ type filter hook output priority 0 ; }",
            ],
            check=True,
        )
        subprocess.run(
            [
                "nft",
                "add",
                "rule",
                "inet",
                table,
                "out",
                "tcp",
                "dport",
                str(c.pub_port),
                "counter",
                "drop",
            ],
            check=True,
        )
        with c:
            client, r, rid = start_stream(c, {"prompt": [5, 6, 7], **LONG})
            wait_until(lambda: node_status(c)["running"] == 1)
            assert httpx.post(f"{c.url}/v1/cancel/{rid}", timeout=10).status_code == 200
            client.close()
            assert_cancelled_on_node(c, rid)
            out = subprocess.run(
                ["nft", "list", "table", "inet", table], capture_output=True, text=True
            ).stdout
            dropped = re.search(r"counter packets (\d+)", out)
            assert (
                dropped and int(dropped.group(1)) > 0
            )  # the rule really dropped the node's traffic
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=False)
