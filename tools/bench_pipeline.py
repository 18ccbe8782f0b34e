"""bench pipeline: decode tokens/s and TTFT of one model on 1, 2, 3 stages of the
same machine, and the bytes that cross between stages per token.

Configurations are measured in alternating rounds (place, measure, delete), so
drift in the machine's load hits each of them alike.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import httpx

from exo.tools.bench import PROMPT, machine, stream_http
from exo.tools.cluster import api_headers, wait_ready


def _peer_bytes(url: str) -> int:
    nodes = httpx.get(f"{url}/v1/cluster", headers=api_headers(), timeout=10).json()["nodes"]
    return sum(sum(n["status"].get("peer_bytes_sent", {}).values()) for n in nodes)


def _clear(url: str) -> None:
    for i in httpx.get(f"{url}/v1/instances", headers=api_headers(), timeout=10).json()["data"]:
        httpx.delete(f"{url}/v1/instances/{i['id']}", headers=api_headers(), timeout=10)


def run(url: str, model: str, stages: list[int], tokens: int, rounds: int) -> dict[str, Any]:
    nodes = [
        n["id"]
        for n in httpx.get(f"{url}/v1/cluster", headers=api_headers(), timeout=10).json()["nodes"]
    ]
    stages = [k for k in stages if k <= len(nodes)]
    rows: dict[int, list[dict[str, float]]] = {k: [] for k in stages}
    per_token: dict[int, list[float]] = {k: [] for k in stages}
    splits: dict[int, list[list[int]]] = {}  # each stage's [start, end) layers
    _clear(url)
    for _ in range(rounds):
        for k in stages:
            r = httpx.post(
                f"{url}/v1/instances",
                json={"model": model, "nodes": nodes[:k]},
                headers=api_headers(),
                timeout=60,
            )
            r.raise_for_status()
            inst = wait_ready(url, r.json()["id"])
            splits[k] = [s["layers"] for s in inst["stages"]]
            stream_http(url, model, "Hi", 4)  # warm: not timed
            time.sleep(0.6)  # let the nodes' byte counters reach the broker
            before = _peer_bytes(url)
            res = stream_http(url, model, PROMPT, tokens)
            time.sleep(0.6)
            moved = _peer_bytes(url) - before
            rows[k].append(res)
            per_token[k].append(moved / max(1, res["tokens"]))
            _clear(url)
    out: dict[str, Any] = {
        "bench": "pipeline",
        "model": model,
        "tokens": tokens,
        "rounds": rounds,
        "machine": machine(),
        "stages": {},
    }
    base = statistics.median(r["decode_tps"] for r in rows[stages[0]])
    for k in stages:
        tps = statistics.median(r["decode_tps"] for r in rows[k])
        out["stages"][k] = {
            "layers": splits[k],
            "decode_tps": tps,
            "ttft_s": statistics.median(r["ttft_s"] for r in rows[k]),
            "decode_ratio": tps / base if base else 0.0,
            "peer_bytes_per_token": statistics.median(per_token[k]),
        }
    return out


def report(res: dict[str, Any]) -> None:
    print(f"pipeline: {res['model']}, {res['tokens']} tokens, median of {res['rounds']} rounds")
    print(f"machine: {res['machine']}")
    print(
        f"{'stages':>7}{'decode tok/s':>14}{'vs 1 stage':>12}{'TTFT s':>9}{'peer B/token':>14}  layers"
    )
    for k, s in res["stages"].items():
        print(
            f"{k:>7}{s['decode_tps']:14.2f}{s['decode_ratio']:12.3f}{s['ttft_s']:9.3f}"
            f"{s['peer_bytes_per_token']:14.0f}  {s['layers']}"
        )
    print("peer B/token: bytes all nodes sent to each other per generated token (prompt included)")
