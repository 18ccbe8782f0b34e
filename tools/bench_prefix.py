"""bench prefix: what the prefix cache saves a chat's next turn and an agent's
repeated system prompt, beside mlx_lm.server's own prompt cache in the same run.

- conversation: one ~2,000-token first turn, then follow-up turns of ~50 tokens;
  the figure is the mean TTFT of the follow-ups over the first turn's (also with
  the model split over two nodes of this machine).
- agent: CALLERS callers at once, each making CALLS calls that share one
  ~1,500-token system prompt with tools; mean TTFT and aggregate tokens/s, with
  the cache and without it (the node started with --no-prefix-cache).
Every server answers greedily with the same short answers, one after another
(never two servers at once on this machine).
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from exo.tools.bench import machine
from exo.tools.cluster import LocalCluster, api_headers, free_port, wait_ready

WORDS = [
    "cluster",
    "node",
    "model",
    "token",
    "memory",
    "link",
    "prompt",
    "cache",
    "stage",
    "layer",
    "batch",
    "stream",
    "answer",
    "machine",
    "network",
    "cable",
    "wifi",
    "ethernet",
    "thunderbolt",
    "broker",
    "request",
    "latency",
    "bandwidth",
    "kernel",
    "thread",
    "core",
    "matrix",
    "weight",
    "vector",
    "context",
    "window",
    "budget",
    "queue",
    "router",
    "socket",
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name.replace('_', ' ')} on the cluster's machines, by name.",
            "parameters": {
                "type": "object",
                "properties": {"machine": {"type": "string"}, "detail": {"type": "string"}},
                "required": ["machine"],
            },
        },
    }
    for name in ("read_file", "list_models", "check_memory", "probe_link", "restart_node")
]
ANSWER = 24  # tokens per answer
CALLERS, CALLS = 8, 3


def text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    sentences = []
    while words > 0:
        n = rng.randint(8, 16)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + ".")
        words -= n
    return " ".join(sentences)


def ask(
    url: str, model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """One streamed chat turn: its TTFT, answer, tokens and cached prompt tokens."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": ANSWER,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if tools:
        body["tools"] = tools
    t0 = time.perf_counter()
    first: float | None = None
    answer, usage = "", dict[str, Any]()
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=api_headers(), timeout=600
    ) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            usage = ev.get("usage") or usage
            for choice in ev.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece and first is None:
                    first = time.perf_counter()
                answer += piece
    end = time.perf_counter()
    return {
        "ttft": (first or end) - t0,
        "answer": answer,
        "tokens": int(usage.get("completion_tokens") or 0),
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "cached": int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
    }


def conversation(url: str, model: str, turns: int) -> dict[str, Any]:
    messages = [
        {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
        {"role": "user", "content": text(1500, 1) + " Summarise this in one sentence."},
    ]
    out = []
    for t in range(turns):
        r = ask(url, model, messages)
        out.append(r)
        messages += [
            {"role": "assistant", "content": r["answer"]},
            {"role": "user", "content": text(38, 100 + t) + " What next?"},
        ]
    first, rest = out[0]["ttft"], [r["ttft"] for r in out[1:]]
    return {
        "prompt_tokens": out[0]["prompt_tokens"],
        "ttft_first_s": first,
        "ttft_next_s": statistics.mean(rest),
        "ratio": statistics.mean(rest) / first,
        "cached": [r["cached"] for r in out],
    }


def agent(url: str, model: str) -> dict[str, Any]:
    system = "You operate a cluster of machines through tools. " + text(1050, 2)
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def caller(i: int) -> None:
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Caller {i}: " + text(20, 300 + i)},
        ]
        for c in range(CALLS):
            r = ask(url, model, messages, TOOLS)
            with lock:
                results.append(r)
            messages += [
                {"role": "assistant", "content": r["answer"]},
                {"role": "user", "content": text(15, 400 + 10 * i + c)},
            ]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(CALLERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "prompt_tokens": max(r["prompt_tokens"] for r in results),
        "ttft_mean_s": statistics.mean(r["ttft"] for r in results),
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "cached_mean": statistics.mean(r["cached"] for r in results),
    }


def exo(models_dir: Path, model: str, cache: bool, fn: Any) -> dict[str, Any]:
    args = [] if cache else ["--no-prefix-cache"]
    with LocalCluster.on_free_ports(models_dir, log_spec="warning", node_args=args) as c:
        return dict(fn(c.url, model))


def exo_split(models_dir: Path, model: str, fn: Any) -> dict[str, Any]:
    """The model split over two nodes of this machine, a stage each."""
    with LocalCluster.on_free_ports(models_dir, nodes=2, log_spec="warning") as c:
        r = httpx.post(
            f"{c.url}/v1/instances",
            json={"model": model, "min_nodes": 2, "max_nodes": 2},
            headers=api_headers(),
            timeout=60,
        )
        r.raise_for_status()
        wait_ready(c.url, r.json()["id"])
        return dict(fn(c.url, model))


def mlx_lm_server(path: Path, fn: Any) -> dict[str, Any]:
    """mlx-lm's own server (its LRU prompt cache on), on loopback, with OpenBLAS."""
    import os

    from exo.nodes.engine import mlxenv

    port = free_port()
    cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(path), "--port", str(port)]
    env = dict(os.environ)
    if mlxenv._openblas is not None:
        # The same BLAS as exo's nodes: MLX's CPU matmuls without it are ~10x slower.
        env["LD_PRELOAD"] = str(mlxenv._openblas._name)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/v1/models", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        return dict(fn(url, str(path)))
    finally:
        p.terminate()
        p.wait(timeout=30)


def run(
    models_dir: Path, model: str, path: Path, turns: int, baseline_agent: bool = False
) -> dict[str, Any]:
    """Each figure printed as it comes (a long run says where it is)."""
    convo = lambda url, m: conversation(url, m, turns)  # noqa: E731
    res: dict[str, Any] = {"machine": machine(), "conversation": {}, "agent": {}}
    print(res["machine"], flush=True)
    steps = [
        ("conversation", "exo", lambda: exo(models_dir, model, True, convo)),
        ("conversation", "mlx_lm.server", lambda: mlx_lm_server(path, convo)),
        ("conversation", "exo, 2 stages", lambda: exo_split(models_dir, model, convo)),
        ("agent", "exo", lambda: exo(models_dir, model, True, agent)),
        ("agent", "exo, no cache", lambda: exo(models_dir, model, False, agent)),
    ]
    if baseline_agent:  # (mlx_lm.server takes the 24 calls one by one: long)
        steps.append(("agent", "mlx_lm.server", lambda: mlx_lm_server(path, agent)))
    for part, name, fn in steps:
        res[part][name] = fn()
        print(f"{part}, {name}: {json.dumps(res[part][name])}", flush=True)
    return res


def report(res: dict[str, Any]) -> None:
    print("\nconversation: first turn, then follow-ups of ~50 tokens (TTFT)")
    print(f"  {'server':16} {'prompt':>7} {'first s':>8} {'next s':>8} {'next/first':>10}")
    for name, r in res["conversation"].items():
        print(
            f"  {name:16} {r['prompt_tokens']:7d} {r['ttft_first_s']:8.3f} "
            f"{r['ttft_next_s']:8.3f} {r['ratio']:10.3f}"
        )
    print(f"\nagent: {CALLERS} callers x {CALLS} calls, one system prompt with tools")
    print(f"  {'server':16} {'prompt':>7} {'TTFT s':>8} {'tok/s':>8} {'cached':>8}")
    for name, r in res["agent"].items():
        print(
            f"  {name:16} {r['prompt_tokens']:7d} {r['ttft_mean_s']:8.3f} "
            f"{r['tokens_per_s']:8.2f} {r['cached_mean']:8.0f}"
        )
    a = res["agent"]
    print(
        f"  TTFT with the cache / without: {a['exo']['ttft_mean_s'] / a['exo, no cache']['ttft_mean_s']:.3f}"
    )
