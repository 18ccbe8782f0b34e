"""bench failover: the longest gap streams see when the link carrying a split
model's traffic dies, and when it comes back (the namespace test bed, as root).

Host a runs the broker and node0, host b node1; an ethernet (1 Gbit/s) and a
WiFi (100 Mbit/s) link join them, and node1 reaches the broker over ethernet.
The tiny model is split over both nodes; each round streams 3 requests, takes
the ethernet link down on both ends once they run, brings it back once the
traffic moved, and records every stream's longest gap between two tokens
around each event, next to the median gap (the steps' own pace).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from exo.tools.bench import machine
from exo.tools.cluster import LocalCluster, api_headers
from exo.tools.netbed import Bed
from exo.tools.streams import Stream, gaps, wait_tokens

MODEL = "test/tiny-llama"


def run(models_dir: Path, rounds: int, tokens: int = 1000) -> dict[str, Any]:
    bed = Bed()
    try:
        _, eth = bed.two_hosts()
        with bed.cluster(models_dir, broker_in="a", via={"b": eth[0]}, log_spec="warning") as c:
            return _measure(c, bed, eth, rounds, tokens)
    finally:
        bed.close()


def _next_hop(c: LocalCluster, iid: str) -> str:
    (inst,) = [i for i in c.cluster_state()["instances"] if i["id"] == iid]
    return str(inst["routes"][0]["next"]) if inst["routes"] else ""


def _until(cond: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError("the traffic did not move")
        time.sleep(0.1)


def _place(c: LocalCluster) -> str:
    ids = {n["name"]: n["id"] for n in c.cluster_state()["nodes"]}
    stages = [{"node": ids["node0"], "layers": [0, 2]}, {"node": ids["node1"], "layers": [2, 4]}]
    r = httpx.post(
        f"{c.url}/v1/instances",
        json={"model": MODEL, "stages": stages},
        headers=api_headers(),
        timeout=30,
    )
    r.raise_for_status()
    iid = str(r.json()["id"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        (inst,) = [i for i in c.cluster_state()["instances"] if i["id"] == iid]
        if inst["state"] == "ready":
            return iid
        time.sleep(0.2)
    raise RuntimeError("the instance did not become ready")


def _worst(streams: list[Stream], t0: float, t1: float) -> float:
    """The longest gap between two tokens that ends in [t0, t1], over the streams."""
    return max((b - a for s in streams for a, b in gaps(s.times) if t0 <= b <= t1), default=0.0)


def _measure(
    c: LocalCluster, bed: Bed, eth: tuple[str, str], rounds: int, tokens: int
) -> dict[str, Any]:
    iid = _place(c)
    on_eth = f"//{eth[1]}:"
    prompt = list(range(5, 21))
    rows = []
    for _ in range(rounds):
        streams = [Stream(c.url, MODEL, prompt, tokens).start() for _ in range(3)]
        wait_tokens(streams, 30)
        t_down = time.perf_counter()
        bed.set_link("a", eth[0], up=False)
        bed.set_link("b", eth[1], up=False)
        _until(lambda: on_eth not in _next_hop(c, iid))  # failed over: the steps on WiFi
        time.sleep(0.5)
        t_up = time.perf_counter()
        bed.set_link("a", eth[0], up=True)
        bed.set_link("b", eth[1], up=True)
        _until(lambda: on_eth in _next_hop(c, iid))
        t_back = time.perf_counter() + 0.5
        for s in streams:
            s.wait()
        if min(s.times[-1] for s in streams) < t_back:
            raise RuntimeError("the streams ended before the traffic was back: more tokens")
        if any(s.error or len(s.times) < tokens for s in streams):
            raise RuntimeError(f"a stream failed: {[s.error for s in streams]}")
        median = statistics.median(b - a for s in streams for a, b in gaps(s.times))
        rows.append(
            {
                "down_s": round(_worst(streams, t_down, t_up), 3),
                "up_s": round(_worst(streams, t_up, t_back), 3),
                "median_s": round(median, 4),
            }
        )
        time.sleep(1)
    return {
        "bench": "failover",
        "model": MODEL,
        "rounds": rounds,
        "tokens": tokens,
        "machine": machine(),
        "rows": rows,
        "worst_down_s": max(r["down_s"] for r in rows),
        "worst_up_s": max(r["up_s"] for r in rows),
    }


def report(res: dict[str, Any]) -> None:
    print(f"failover: {res['model']} split over 2 nodes, 3 streams, {res['rounds']} rounds")
    print(f"{'round':>5} {'link down: worst gap':>21} {'link back':>10} {'median gap':>11}")
    for i, r in enumerate(res["rows"], 1):
        print(f"{i:>5} {r['down_s']:>20.2f}s {r['up_s']:>9.2f}s {r['median_s']:>10.3f}s")
    print(f"worst: {res['worst_down_s']:.2f}s when the link died, {res['worst_up_s']:.2f}s back")
