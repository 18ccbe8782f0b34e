"""One model across several node processes: instances placed over HTTP, hidden
states between stages on the nodes' own peer sockets, on loopback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from exo.tools.cluster import LocalCluster
from exo.tools.default_model import DEFAULT_MODEL
from tests.helpers import (
    instances,
    node,
    node_ids,
    place,
    place_ready,
    ready,
    stages_on,
    stream_acting,
    wait_until,
)

PROMPTS = [
    "What is the capital of France?",
    "Tell me a story about a long journey across the sea, with ships, sailors and storms. " * 3,
    "List five fruits.",
]


@pytest.fixture(scope="module")
def three(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # Small prefill budgets so chunked prefill and batching are both at work.
    c = LocalCluster.on_free_ports(
        models_dir,
        nodes=3,
        log_dir=tmp_path_factory.mktemp("pipeline-logs"),
        node_args=["--prefill-budget", "12", "--idle-budget", "16"],
    )
    with c:
        yield c


def delete_all(c: LocalCluster) -> None:
    for i in instances(c):
        assert httpx.delete(f"{c.url}/v1/instances/{i['id']}", timeout=10).status_code == 200
    wait_until(lambda: all(not n["status"].get("stages") for n in c.cluster_state()["nodes"]))


def interrupted_stream(
    c: LocalCluster, after: int, action: Callable[[], None], max_tokens: int = 500
) -> tuple[list[str], float]:
    """Stream a long completion, run `action` once `after` tokens arrived; the
    stream's lines and the seconds from the action to the stream's end."""
    body = {"model": DEFAULT_MODEL, "prompt": "Once", "max_tokens": max_tokens}
    return stream_acting(c.url, body, after, action)


def concurrent(c: LocalCluster, model: str) -> tuple[list[list[int]], list[list[float]]]:
    """Three requests joining at staggered moments, greedy; their token ids and
    log probabilities (the last stage's, sent back to stage 0)."""
    out: list[list[int]] = [[] for _ in PROMPTS]
    lps: list[list[float]] = [[] for _ in PROMPTS]

    def one(i: int) -> None:
        time.sleep(0.3 * i)
        r = httpx.post(
            f"{c.url}/v1/completions",
            json={
                "model": model,
                "prompt": PROMPTS[i],
                "max_tokens": 12 + i,
                "temperature": 0,
                "return_token_ids": True,
                "logprobs": 2,
            },
            timeout=300,
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        out[i] = choice["token_ids"]
        # (an answer that ends at once has no tokens, so no log probabilities)
        lps[i] = (choice["logprobs"] or {}).get("token_logprobs", [])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, lps


@pytest.mark.parametrize("model", ["test/tiny-llama", "test/tiny-gemma3_text", DEFAULT_MODEL])
def test_one_two_three_stages_give_the_same_tokens(three: LocalCluster, model: str) -> None:
    c = three
    layers = {"test/tiny-llama": 4, "test/tiny-gemma3_text": 6}.get(model, 30)
    plans = [
        [("node0", 0, layers)],
        [("node1", 0, layers // 2), ("node2", layers // 2, layers)],
        [("node2", 0, 1), ("node0", 1, layers - 1), ("node1", layers - 1, layers)],
    ]
    results = []
    for plan in plans:
        inst = place_ready(c, plan, model)
        stages = stages_on(c, plan)
        # Explicit stages honoured exactly, and each node holds just its range.
        assert inst["stages"] == stages
        by_id = {n["id"]: n for n in c.cluster_state()["nodes"]}
        for s in stages:
            assert by_id[s["node"]]["status"]["stages"][inst["id"]]["layers"] == s["layers"]
        assert inst["history"] == ["downloading", "loading", "ready"]
        if len(plan) > 1:
            # Stage 0 admits no more KV than the tightest later stage can hold.
            head = by_id[stages[0]["node"]]["status"]
            caps = [
                by_id[s["node"]]["status"]["kv_budget"]
                * plan[0][2]
                // (s["layers"][1] - s["layers"][0])
                for s in stages[1:]
            ]
            assert head["kv_caps"][model] == min(caps)
        results.append(concurrent(c, model))
        delete_all(c)
    tokens = [ids for ids, _ in results]
    assert tokens[0] == tokens[1] == tokens[2]
    assert sum(len(x) for x in tokens[0]) >= 20
    # log probabilities too, split or not (computed on the last stage)
    whole = [v for lps in results[0][1] for v in lps]
    assert len(whole) == sum(len(x) for x in tokens[0])
    for _, split in results[1:]:
        assert [v for lps in split for v in lps] == pytest.approx(whole, abs=1e-3)
    # Hidden states went node to node, not through the broker.
    for n in c.cluster_state()["nodes"]:
        assert sum(n["status"]["peer_bytes_sent"].values()) > 0


def test_impossible_placements_are_refused_with_the_reason(three: LocalCluster) -> None:
    c = three
    ids = node_ids(c)
    cases = [
        ({"model": "test/tiny-llama", "stages": [{"node": "nope", "layers": [0, 4]}]}, 404, "nope"),
        (
            {"model": "test/tiny-llama", "stages": [{"node": ids["node0"], "layers": [0, 3]}]},
            400,
            "[0, 3)",
        ),
        (
            {
                "model": "test/tiny-llama",
                "stages": [
                    {"node": ids["node0"], "layers": [0, 2]},
                    {"node": ids["node1"], "layers": [1, 4]},
                ],
            },
            400,
            "without gaps or overlaps",
        ),
        ({"model": "no/such-model"}, 404, "no/such-model"),
        ({"model": "test/tiny-llama", "min_nodes": 9}, 400, "min_nodes"),
        ({"model": "test/tiny-llama", "stages": "all"}, 400, "stages"),
    ]
    for body, status, words in cases:
        for path in ("/v1/instances", "/v1/instances/preview"):
            r = httpx.post(f"{c.url}{path}", json=body, timeout=10)
            assert r.status_code == status, (path, body, r.text)
            assert words in r.json()["error"]["message"], r.text
    assert instances(c) == []  # nothing was created


def test_preview_lists_candidates_and_creates_nothing(three: LocalCluster) -> None:
    c = three
    r = httpx.post(
        f"{c.url}/v1/instances/preview",
        json={"model": DEFAULT_MODEL, "min_nodes": 1, "max_nodes": 2},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    found = r.json()["candidates"]
    assert len(found) == 3 + 3  # one node each, and every pair
    assert len(found[0]["stages"]) == 1 and found[0]["ok"]  # fewer stages first
    for cand in found:
        assert all(n["needs"] > 0 and n["available"] > 0 for n in cand["nodes"])
    assert instances(c) == []


def test_automatic_placement_and_a_request_without_an_instance(three: LocalCluster) -> None:
    c = three
    r = place(c, {"model": "test/tiny-llama", "min_nodes": 2, "max_nodes": 2})
    assert r.status_code == 201, r.text
    inst = ready(c, r.json()["id"])
    assert len(inst["stages"]) == 2 and inst["stages"][0]["layers"][0] == 0
    assert inst["stages"][-1]["layers"][1] == 4
    delete_all(c)
    # A request for a model with no instance places one (a single stage: one node holds it).
    r = httpx.post(
        f"{c.url}/v1/completions",
        json={"model": "test/tiny-llama", "prompt": "hi", "max_tokens": 3},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    (auto,) = instances(c)
    assert auto["placed"] == "auto" and len(auto["stages"]) == 1
    delete_all(c)


def test_requests_spread_over_several_ready_instances(three: LocalCluster) -> None:
    c = three
    ids = node_ids(c)
    for n in ("node0", "node1"):
        r = place(c, {"model": "test/tiny-llama", "nodes": [ids[n]]})
        assert r.status_code == 201, r.text
        ready(c, r.json()["id"])

    def steps() -> dict[str, int]:
        return {n["name"]: n["status"]["steps"] for n in c.cluster_state()["nodes"]}

    before = steps()
    results: list[int] = []

    def one() -> None:
        r = httpx.post(
            f"{c.url}/v1/completions",
            json={
                "model": "test/tiny-llama",
                "prompt": "Once",
                "max_tokens": 40,
                "ignore_eos": True,
            },
            timeout=120,
        )
        results.append(r.status_code)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 6
    after = wait_until(
        lambda: (s := steps())["node0"] > before["node0"] and s["node1"] > before["node1"] and s
    )
    assert after["node2"] == before["node2"]  # no instance there
    delete_all(c)


def test_garbage_on_the_peer_socket_is_dropped_and_counted(three: LocalCluster) -> None:
    import socket

    import zmq

    from exo.broker import protocol as P

    c = three
    n0 = node(c, "node0")
    port = n0["info"]["peer_port"]
    sock = c.as_member(zmq.Context.instance().socket(zmq.DEALER), peer=True)
    sock.setsockopt(zmq.LINGER, 2000)  # deliver before closing
    sock.connect(f"tcp://127.0.0.1:{port}")
    sock.send(b"\xc1 not msgpack")
    sock.send_multipart(
        [P.encode("ACT", instance="x", step=1, decode=[], chunks=[], shape=[2, 8]), b"short"]
    )
    sock.send_multipart([P.encode("RESULT", instance="nope", step=1, ids=[1])])
    sock.close()
    with socket.create_connection(("127.0.0.1", n0["info"]["probe_port"])) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not a probe: the node hangs up

    def dropped() -> dict[str, int]:
        return dict(node(c, "node0")["status"].get("peer_dropped", {}))

    got = wait_until(lambda: (d := dropped()).get("undecodable") and d.get("bad_tensor") and d)
    assert got["undecodable"] >= 1 and got["bad_tensor"] >= 1
    r = place(c, {"model": "test/tiny-llama", "nodes": [n0["id"]]})
    ready(c, r.json()["id"])
    r = httpx.post(
        f"{c.url}/v1/completions",
        json={"model": "test/tiny-llama", "prompt": "hi", "max_tokens": 3},
        timeout=60,
    )
    assert r.status_code == 200
    delete_all(c)


def test_two_models_on_one_node_set_mlx_limits_from_both(three: LocalCluster) -> None:
    c = three
    node0 = node_ids(c)["node0"]

    def limits() -> dict[str, int]:
        return dict(node(c, node0)["status"]["mlx_limits"])

    made = {}
    for model in (DEFAULT_MODEL, "test/tiny-llama"):  # the large one first, then the small
        r = place(c, {"model": model, "nodes": [node0]})
        assert r.status_code == 201, r.text
        made[model] = ready(c, r.json()["id"])["id"]
    both = wait_until(lambda: (lim := limits())["weights"] > 500 << 20 and lim)
    assert both["weights"] > 512 << 20  # SmolLM2 (513 MiB) and the tiny model, not the tiny one
    assert both["wired"] >= both["weights"]
    httpx.delete(f"{c.url}/v1/instances/{made[DEFAULT_MODEL]}", timeout=10)
    small = wait_until(lambda: (lim := limits())["weights"] < 100 << 20 and lim)
    assert small["weights"] > 0 and small["cache"] == both["cache"]
    delete_all(c)


def test_a_node_under_critical_memory_pressure_gets_no_stage(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    critical = Path(__file__).parent / "data" / "pressure" / "psi_critical.txt"
    with LocalCluster.on_free_ports(
        models_dir,
        nodes=2,
        log_dir=tmp_path_factory.mktemp("pressure-logs"),
        node_env={1: {"EXO_PSI_FILE": str(critical)}},
    ) as c:
        ids = node_ids(c)
        wait_until(lambda: all("memory_pressure" in n["info"] for n in c.cluster_state()["nodes"]))
        r = httpx.post(
            f"{c.url}/v1/instances/preview",
            json={"model": "test/tiny-llama", "max_nodes": 2},
            timeout=10,
        )
        for cand in r.json()["candidates"]:
            on_critical = ids["node1"] in [s["node"] for s in cand["stages"]]
            assert cand["ok"] != on_critical
            if on_critical:
                assert "critical memory pressure" in cand["reason"]
        r = place(c, {"model": "test/tiny-llama", "min_nodes": 1, "max_nodes": 2})
        assert [s["node"] for s in r.json()["stages"]] == [ids["node0"]]
        r = place(c, {"model": "test/tiny-llama", "nodes": [ids["node1"]]})
        assert r.status_code == 409 and "critical" in r.json()["error"]["message"]


def test_a_step_forged_by_a_member_that_is_not_the_stage_before_is_dropped(
    three: LocalCluster,
) -> None:
    """A peer holding the node key, but no stage of the instance: the middle stage
    takes steps from stage 0's node only (its peer key), so the forged one is
    dropped and counted and the stream goes on to its end."""
    import zmq

    from exo.broker import protocol as P

    c = three
    iid = place_ready(c, [("node0", 0, 10), ("node1", 10, 20), ("node2", 20, 30)])["id"]
    middle = node(c, "node1")

    def forge() -> None:
        # A step for a request the middle stage never saw: run, it would fail them all.
        sock = c.as_member(zmq.Context.instance().socket(zmq.DEALER), peer=True)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(f"tcp://127.0.0.1:{middle['info']['peer_port']}")
        header = P.encode(
            "ACT",
            instance=iid,
            step=10**9,
            decode=[],
            chunks=[["ghost", 1, False]],
            shape=[1, 576],
        )
        sock.send_multipart([header, bytes(4 * 576)])
        sock.close()

    got, _ = interrupted_stream(c, 2, forge, max_tokens=24)
    assert got[-1] == "data: [DONE]"
    assert not [x for x in got if '"error"' in x], got[-3:]
    wait_until(lambda: node(c, "node1")["status"]["peer_dropped"].get("not_its_stage"))
    delete_all(c)


def test_deleting_an_instance_ends_its_requests_in_flight_with_a_clear_error(
    three: LocalCluster,
) -> None:
    c = three
    iid = place_ready(c, [("node0", 0, 15), ("node1", 15, 30)])["id"]

    def delete() -> None:
        assert httpx.delete(f"{c.url}/v1/instances/{iid}", timeout=10).status_code == 200

    got, _ = interrupted_stream(c, 3, delete)
    assert got[-1] == "data: [DONE]"
    assert any('"error"' in x and "deleted" in x for x in got), got[-3:]
    wait_until(lambda: all(not n["status"].get("stages") for n in c.cluster_state()["nodes"]))
    assert all(n["status"]["kv_bytes"] == 0 for n in c.cluster_state()["nodes"])


def test_a_killed_stage_fails_its_requests_and_the_next_request_works(
    three: LocalCluster,
) -> None:
    c = three
    iid = place_ready(c, [("node0", 0, 15), ("node2", 15, 30)])["id"]
    got, ended = interrupted_stream(c, 3, lambda: c.kill_node(2))
    assert ended < 10
    assert got[-1] == "data: [DONE]"
    assert any('"error"' in x and "node" in x for x in got), got[-3:]
    inst = wait_until(
        lambda: [i for i in instances(c) if i["id"] == iid and i["state"] == "failed"]
    )
    assert "gone" in inst[0]["error"]
    r = httpx.post(
        f"{c.url}/v1/completions",
        json={"model": DEFAULT_MODEL, "prompt": "Hello", "max_tokens": 4},
        timeout=120,
    )
    assert r.status_code == 200, r.text


def test_two_stages_on_nodes_in_different_network_namespaces(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tests.netbed import Bed, need_root

    need_root()
    bed = Bed()
    try:
        for host in ("a", "b"):
            bed.add_host(host)
        _, b_addr = bed.link("a", "b", "ethernet", rate="1gbit")
        with bed.cluster(models_dir, log_dir=tmp_path_factory.mktemp("netns-logs")) as c:
            outs = []
            for plan in ([("node0", 0, 30)], [("node0", 0, 12), ("node1", 12, 30)]):
                place_ready(c, plan)
                outs.append(concurrent(c, DEFAULT_MODEL))
                if len(plan) == 2:
                    sent = node(c, "node0")["status"]["peer_bytes_sent"]
                    # Stage 0 reached stage 1 over the data link, the only path between them.
                    assert [e for e in sent if e.startswith(f"tcp://{b_addr}:")], sent
                delete_all(c)
            assert outs[0][0] == outs[1][0] and sum(map(len, outs[0][0])) >= 20
    finally:
        bed.close()


def test_the_instances_command_line(three: LocalCluster) -> None:
    import subprocess
    import sys

    c = three
    ids = node_ids(c)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "exo.tools.main", "instances", *args, "--api", c.url],
            capture_output=True,
            text=True,
            timeout=120,
        )

    out = cli("preview", "test/tiny-llama", "--max-nodes", "2")
    assert out.returncode == 0 and out.stdout.splitlines()[0].startswith("ok ")
    out = cli(
        "place",
        "test/tiny-llama",
        "--stage",
        f"{ids['node1']}:0-3",
        "--stage",
        f"{ids['node0']}:3-4",
    )
    assert out.returncode == 0, out.stderr
    placed = json.loads(out.stdout)
    assert placed["state"] == "ready"
    assert [s["layers"] for s in placed["stages"]] == [[0, 3], [3, 4]]
    out = cli("list")
    assert placed["id"] in out.stdout and "ready" in out.stdout
    out = cli("place", "test/tiny-llama", "--stage", "nowhere:0-4")
    assert out.returncode != 0 and "nowhere" in out.stderr
    assert cli("delete", placed["id"]).returncode == 0
    assert placed["id"] not in cli("list").stdout
