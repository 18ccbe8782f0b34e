"""`exo-tools bench cancel`: how fast a request's end stops its work, and whether
a storm of cancels leaves anything behind that slows the next request."""

from __future__ import annotations

import random
import statistics
import threading
import time
from typing import Any

import httpx

from exo.tools.cluster import api_headers
from exo.tools.streams import Stream, pct


def lone_tps(url: str, model: str, tokens: int) -> float:
    s = Stream(url, model, [5, 6, 7], tokens).start()
    s.wait()
    return (len(s.times) - 1) / (s.times[-1] - s.times[0])


def node_cancels(url: str) -> dict[str, float]:
    nodes = httpx.get(f"{url}/v1/cluster", headers=api_headers(), timeout=10).json()["nodes"]
    return {c[0]: c[1] for n in nodes for c in n["status"].get("recent_cancels", [])}


def node_cancel_steps(url: str) -> dict[str, float]:
    """rid -> length of the engine step the cancel waited behind."""
    nodes = httpx.get(f"{url}/v1/cluster", headers=api_headers(), timeout=10).json()["nodes"]
    return {c[0]: c[2] for n in nodes for c in n["status"].get("recent_cancels", [])}


def step_s(url: str) -> float:
    nodes = httpx.get(f"{url}/v1/cluster", headers=api_headers(), timeout=10).json()["nodes"]
    return max((n["status"].get("step_s") or 0.0) for n in nodes)


def one_cancel(url: str, model: str, how: str) -> tuple[float, float]:
    """Seconds from the client's disconnect (or cancel call) to the node dropping the request."""
    client = httpx.Client(timeout=60, headers=api_headers())
    req = client.build_request(
        "POST",
        f"{url}/v1/completions",
        json={
            "model": model,
            "prompt": [5, 6, 7],
            "max_tokens": 2000,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        },
    )
    r = client.send(req, stream=True)
    rid = r.headers["x-request-id"]
    lines = r.iter_lines()
    seen = 0
    for line in lines:
        seen += line.startswith("data: {")
        if seen == 4:
            break
    t0 = time.time()
    if how == "explicit":
        httpx.post(f"{url}/v1/cancel/{rid}", headers=api_headers(), timeout=10)
    r.close()
    client.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        t1 = node_cancels(url).get(rid)
        if t1 is not None:
            return t1 - t0, node_cancel_steps(url)[rid]
        time.sleep(0.02)
    raise RuntimeError(f"request {rid} was never cancelled on its node")


def storm(url: str, model: str, n: int, concurrency: int) -> None:
    rng = random.Random(1)

    def one() -> None:
        s = Stream(url, model, list(range(3, 3 + rng.randint(2, 200))), 2000).start()
        time.sleep(rng.uniform(0, 1.5))
        s.join()

    threads: list[threading.Thread] = []
    for _ in range(n):
        while sum(t.is_alive() for t in threads) >= concurrency:
            time.sleep(0.01)
        t = threading.Thread(target=one)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()


def wait_idle(url: str, timeout: float = 30.0) -> dict[str, Any]:
    """The cluster state once nothing is in flight anywhere (status lags a heartbeat)."""
    deadline = time.monotonic() + timeout
    while True:
        state = httpx.get(f"{url}/v1/cluster", headers=api_headers(), timeout=10).json()
        busy = state["requests_active"] or any(
            n["status"].get("running")
            or n["status"].get("prefilling")
            or n["status"].get("kv_bytes")
            for n in state["nodes"]
        )
        if not busy or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def run(
    url: str, model: str, cancels: int, storm_n: int, tokens: int, rounds: int = 6
) -> dict[str, Any]:
    from exo.tools.bench import machine

    lone_tps(url, model, 8)  # load the model
    pairs = [one_cancel(url, model, "disconnect" if i % 2 else "explicit") for i in range(cancels)]
    lat = [latency for latency, _ in pairs]
    beyond = [latency - step for latency, step in pairs]  # past the end of the step in progress
    step = step_s(url)
    # The storm comes in rounds, each between two lone runs a minute or less apart:
    # this machine's rate drifts by 20% over minutes, so only adjacent pairs compare.
    befores, afters = [], []
    for i in range(rounds):
        befores.append(lone_tps(url, model, tokens))
        storm(url, model, storm_n // rounds + (i < storm_n % rounds), 8)
        wait_idle(url)
        afters.append(lone_tps(url, model, tokens))
    before, after = statistics.median(befores), statistics.median(afters)
    ratios = [a / b for a, b in zip(afters, befores, strict=True)]
    state = wait_idle(url)
    return {
        "bench": "cancel",
        "model": model,
        "machine": machine(),
        "cancels": cancels,
        "latency_p50_s": statistics.median(lat),
        "latency_p99_s": pct(lat, 99),
        "latency_max_s": max(lat),
        "beyond_step_p50_s": statistics.median(beyond),
        "beyond_step_p99_s": pct(beyond, 99),
        "engine_step_s": step,
        "storm": storm_n,
        "tps_before": before,
        "tps_after": after,
        "rounds": rounds,
        "tps_ratio": statistics.median(ratios),
        "tps_ratios": ratios,
        "requests_active_after": state["requests_active"],
        "kv_bytes_after": sum(n["status"]["kv_bytes"] for n in state["nodes"]),
    }


def report(res: dict[str, Any]) -> None:
    print(
        f"cancel: {res['model']}, {res['cancels']} cancels (half disconnects, half POST /v1/cancel)"
    )
    print(f"machine: {res['machine']}")
    print(
        f"cancel latency, client -> node drops the request: p50 {res['latency_p50_s'] * 1000:.1f} ms, "
        f"p99 {res['latency_p99_s'] * 1000:.1f} ms, max {res['latency_max_s'] * 1000:.1f} ms "
        f"(mean engine step {res['engine_step_s'] * 1000:.1f} ms)"
    )
    print(
        f"beyond the end of the step in progress when the cancel came: "
        f"p50 {res['beyond_step_p50_s'] * 1000:.1f} ms, p99 {res['beyond_step_p99_s'] * 1000:.1f} ms "
        f"(target: p99 <= 20 ms)"
    )
    print(
        f"lone request before each of {res['rounds']} rounds of a storm of {res['storm']} cancels "
        f"(median): {res['tps_before']:.1f} tok/s; right after: {res['tps_after']:.1f} tok/s; "
        f"median ratio of adjacent pairs {res['tps_ratio']:.3f} "
        f"({', '.join(f'{r:.2f}' for r in res['tps_ratios'])}); left behind: "
        f"{res['requests_active_after']} requests, {res['kv_bytes_after']} KV bytes"
    )
