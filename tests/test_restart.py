"""A broker restart loses nothing that took long to build: the stages nodes hold
are adopted as their instances (no reload), instances placed by hand come back
from the journal, and stages no instance owns are unloaded after the warm-up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from exo.broker.instances import adoptable
from exo.broker.journal import Journal
from exo.broker.placement import StageSpec
from exo.broker.reports import StageState
from exo.common import retry
from exo.tools.cluster import LocalCluster
from tests.helpers import instances, node, place_ready, stream_acting, wait_until

TINY = "test/tiny-llama"  # 4 layers
GREEDY = {"model": TINY, "prompt": [3, 4, 5], "max_tokens": 12, "temperature": 0}


def answer(c: LocalCluster) -> list[int]:
    r = httpx.post(f"{c.url}/v1/completions", json={**GREEDY, "return_token_ids": True}, timeout=60)
    assert r.status_code == 200, r.text
    return list(r.json()["choices"][0]["token_ids"])


def stages(c: LocalCluster, name: str) -> dict[str, Any]:
    return dict(node(c, name)["status"].get("stages") or {})


def restart_broker(c: LocalCluster) -> None:
    assert c.broker is not None
    c.broker.kill()
    c.broker.wait()
    c.start_broker()


def test_a_restarted_broker_adopts_a_split_instance_and_keeps_it_explicit(
    models_dir: Path, tmp_path: Path
) -> None:
    with LocalCluster.on_free_ports(models_dir, log_dir=tmp_path, nodes=2) as c:
        inst = place_ready(c, [("node0", 0, 2), ("node1", 2, 4)], TINY)
        before = answer(c)
        loaded = {n: stages(c, n)[inst["id"]]["loaded_at"] for n in ("node0", "node1")}
        journal = json.loads(
            (tmp_path / "broker-state" / f"instances-{c.router_port}.json").read_text()
        )
        assert [e["id"] for e in journal] == [inst["id"]]

        restart_broker(c)
        c.wait_nodes(2)
        (back,) = wait_until(lambda: [i for i in instances(c) if i["state"] == "ready"])
        assert back["id"] == inst["id"] and back["placed"] == "explicit"
        assert [s["layers"] for s in back["stages"]] == [[0, 2], [2, 4]]
        assert answer(c) == before
        # nothing was loaded again, and no other instance was placed
        assert {n: stages(c, n)[inst["id"]]["loaded_at"] for n in loaded} == loaded
        assert [i["id"] for i in instances(c)] == [inst["id"]]


def test_a_restarted_broker_adopts_an_auto_instance_without_a_reload(
    models_dir: Path, tmp_path: Path
) -> None:
    with LocalCluster.on_free_ports(models_dir, log_dir=tmp_path) as c:
        before = answer(c)  # places an instance on demand
        (inst,) = instances(c)
        loaded = stages(c, "node0")[inst["id"]]["loaded_at"]
        restart_broker(c)
        c.wait_nodes(1)
        # a request during the warm-up waits for the node's stage, not a new placement
        assert answer(c) == before
        assert [(i["id"], i["placed"]) for i in instances(c)] == [(inst["id"], "auto")]
        assert stages(c, "node0")[inst["id"]]["loaded_at"] == loaded


def test_stages_no_instance_owns_are_unloaded_after_the_warm_up(
    models_dir: Path, tmp_path: Path
) -> None:
    """The broker and node1 die: node0's half of the instance cannot be adopted
    (its other half is gone with node1's process) nor restored (node1's id is new)."""
    with LocalCluster.on_free_ports(models_dir, log_dir=tmp_path, nodes=2) as c:
        inst = place_ready(c, [("node0", 0, 2), ("node1", 2, 4)], TINY)
        assert c.broker is not None
        c.broker.kill()
        c.broker.wait()
        c.kill_node(1)
        c.start_broker()
        c.start_node(1)
        c.wait_nodes(2)
        assert inst["id"] in stages(c, "node0")  # kept through the warm-up...
        wait_until(lambda: not stages(c, "node0"), timeout=retry.BROKER_WARMUP_S + 30)
        assert instances(c) == []  # ...and not restored: node1 is another process
        answer(c)  # served by a new instance


def test_adoptable_wants_every_layer_ready_and_of_one_model() -> None:
    def st(a: int, b: int, **kw: Any) -> StageState:
        return StageState(**{"state": "ready", "model": "m", "layers": [a, b], "total": 4, **kw})

    whole = adoptable(
        "i", [("n1", st(2, 4, stage0="tcp://a:1")), ("n0", st(0, 2, next="tcp://b:2"))]
    )
    assert whole is not None and whole.state == "ready" and whole.loads_sent
    assert whole.stages == [StageSpec("n0", 0, 2), StageSpec("n1", 2, 4)]
    assert whole.routes == [{"next": "tcp://b:2"}, {"stage0": "tcp://a:1"}]
    assert adoptable("i", [("n0", st(0, 2))]) is None  # a half
    assert adoptable("i", [("n0", st(0, 1)), ("n1", st(2, 4))]) is None  # a gap
    assert adoptable("i", [("n0", st(0, 2)), ("n1", st(2, 4, model="x"))]) is None
    assert adoptable("i", [("n0", st(0, 2)), ("n1", st(2, 4, state="loading"))]) is None
    assert adoptable("i", [("n0", st(0, 2)), ("n1", st(1, 4))]) is None  # overlapping
    assert adoptable("i", [("n0", st(0, 4, total=0))]) is None


def test_the_journal_keeps_live_explicit_instances_and_sets_a_bad_file_aside(
    tmp_path: Path,
) -> None:
    from exo.broker.instances import Instance

    path = tmp_path / "instances.json"
    j = Journal(path)
    keep = Instance("a", "m", [StageSpec("n0", 0, 2), StageSpec("n1", 2, 4)], 4)
    auto = Instance("b", "m", [StageSpec("n0", 0, 4)], 4, auto=True)
    failed = Instance("c", "m", [StageSpec("n0", 0, 4)], 4, state="failed")
    j.save([keep, auto, failed])
    assert path.stat().st_mode & 0o777 == 0o600
    (back,) = Journal(path).load()
    assert (back.id, back.model, back.stages, back.total, back.auto) == (
        "a",
        "m",
        keep.stages,
        4,
        False,
    )
    path.write_text('[{"id": "x", "stages": "not a list"}]')
    assert Journal(path).load() == []
    assert path.with_suffix(".bad").exists() and not path.exists()


@pytest.mark.parametrize("entries", [[], None])
def test_no_journal_restores_nothing(tmp_path: Path, entries: Any) -> None:
    path = tmp_path / "instances.json"
    if entries is not None:
        path.write_text(json.dumps(entries))
    assert Journal(path).load() == []
    assert Journal(None).load() == []


def test_a_broker_stopped_mid_stream_ends_the_stream_with_an_error_event(
    models_dir: Path, tmp_path: Path
) -> None:
    """SIGTERM (a service manager's stop, Ctrl-C): the client reads why, then the
    stream's end, never a reset connection."""
    import signal

    with LocalCluster.on_free_ports(models_dir, log_dir=tmp_path) as c:
        body = {"model": TINY, "prompt": [1, 2], "max_tokens": 900, "ignore_eos": True}
        assert c.broker is not None
        lines, _ = stream_acting(c.url, body, 5, lambda: c.broker.send_signal(signal.SIGTERM))
        assert lines[-1] == "data: [DONE]", lines[-3:]
        (err,) = [json.loads(x[6:]) for x in lines if '"error"' in x]
        assert err["error"]["code"] == "shutting_down"
        assert c.broker is not None
        c.broker.wait(15)  # (exits by the signal, as uvicorn re-raises it)
