"""Small helpers the process-level tests share."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from exo.common.sampling import SamplingParams
from exo.tools.cluster import LocalCluster
from exo.tools.default_model import DEFAULT_MODEL


def sp(params: dict[str, Any] | SamplingParams) -> SamplingParams:
    """A request's sampling parameters, from the dict a test writes them as."""
    if isinstance(params, SamplingParams):
        return params
    return SamplingParams.from_wire(params)


def wait_until(cond: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll until `cond` returns something true, and return it; fail after `timeout`.
    (Node status travels in heartbeats, so tests poll rather than read once.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout}s")


def linkstat_json(c: LocalCluster) -> dict[str, Any]:
    """`exo-tools linkstat --once --json` against the cluster's PUB socket, as an operator runs it."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "exo.tools.main",
            "linkstat",
            "--broker",
            "127.0.0.1",
            "--pub-port",
            str(c.pub_port),
            "--once",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return dict(json.loads(out.stdout))


def stream_acting(
    url: str, body: dict[str, Any], after: int, action: Callable[[], None]
) -> tuple[list[str], float]:
    """POST a streaming completion `body` to the API at `url`, run `action` once
    `after` data chunks arrived; the stream's non-empty lines and the seconds from
    the action to the stream's end."""
    got: list[str] = []
    acted_at = None
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60
    ) as resp:
        for line in resp.iter_lines():
            if line:
                got.append(line)
            if acted_at is None and sum(x.startswith("data: {") for x in got) >= after:
                acted_at = time.monotonic()
                action()
    assert acted_at is not None, got
    return got, time.monotonic() - acted_at


def stream_while(
    c: LocalCluster, path: str, body: dict[str, Any], poll: Callable[[], None]
) -> list[str]:
    """POST a streaming request and call `poll` every 0.2 s until the stream ends;
    the stream's non-empty lines."""
    lines: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", f"{c.url}{path}", timeout=120, json=body) as resp:
            lines.extend(line for line in resp.iter_lines() if line)

    t = threading.Thread(target=stream)
    t.start()
    while t.is_alive():
        poll()
        time.sleep(0.2)
    t.join()
    return lines


# -- instances ------------------------------------------------------------------------


def node_ids(c: LocalCluster) -> dict[str, str]:
    return {n["name"]: n["id"] for n in c.cluster_state()["nodes"]}


def place(c: LocalCluster, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{c.url}/v1/instances", json=body, timeout=30)


def instances(c: LocalCluster) -> list[dict[str, Any]]:
    return httpx.get(f"{c.url}/v1/instances", timeout=10).json()["data"]


def ready(c: LocalCluster, iid: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        found = [i for i in instances(c) if i["id"] == iid]
        assert found and found[0]["state"] != "failed", found
        return found[0] if found[0]["state"] == "ready" else None

    return wait_until(check, 120)


def stages_on(c: LocalCluster, plan: list[tuple[str, int, int]]) -> list[dict[str, Any]]:
    """(node name, first layer, end layer) -> the API's stage list."""
    ids = node_ids(c)
    return [{"node": ids[n], "layers": [a, b]} for n, a, b in plan]


def place_ready(
    c: LocalCluster, plan: list[tuple[str, int, int]], model: str = DEFAULT_MODEL
) -> dict[str, Any]:
    """Place `model` on the stages of `plan`; the instance once it is ready."""
    r = place(c, {"model": model, "stages": stages_on(c, plan)})
    assert r.status_code == 201, r.text
    return ready(c, r.json()["id"])


def node(c: LocalCluster, key: str) -> dict[str, Any]:
    """A node of the cluster state, by id or name."""
    (n,) = [n for n in c.cluster_state()["nodes"] if key in (n["id"], n["name"])]
    return n
