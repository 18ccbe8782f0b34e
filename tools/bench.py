"""Benchmarks: commands that print figures next to a baseline run in the same process."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from exo.tools.cluster import api_headers

if TYPE_CHECKING:
    from mlx.nn import Module
    from mlx_lm.tokenizer_utils import TokenizerWrapper

PROMPT = "Write a long story about a dragon who learns to read."


def timings(t0: float, first: float, last: float, tokens: int) -> dict[str, float]:
    """Time to the first token and the decode rate after it."""
    return {
        "ttft_s": first - t0,
        "tokens": tokens,
        "decode_tps": (tokens - 1) / (last - first) if last > first else 0.0,
    }


def stream_http(url: str, model: str, prompt: str, max_tokens: int) -> dict[str, float]:
    """One streaming chat request; client-side TTFT and decode rate."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = last = 0.0
    tokens = 0
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=api_headers(), timeout=600
    ) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            elif obj["choices"] and obj["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
    return timings(t0, first, last, tokens)


def stream_bare(
    model: Module, tokenizer: TokenizerWrapper, prompt: str, max_tokens: int
) -> dict[str, float]:
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True
    )
    t0 = time.perf_counter()
    first = last = 0.0
    tokens = 0
    for resp in stream_generate(
        model, tokenizer, ids, max_tokens=max_tokens, sampler=make_sampler(0.0)
    ):
        now = time.perf_counter()
        first = first or now
        last = now
        tokens = resp.generation_tokens
    return timings(t0, first, last, tokens)


def machine() -> str:
    import os

    from exo.nodes.engine.mlxenv import blas
    from exo.nodes.machine.info import chip

    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {chip()}, MLX BLAS: {blas}"


def overhead(
    url: str, model_path: Path, model_id: str, max_tokens: int, rounds: int
) -> dict[str, Any]:
    from mlx_lm import load

    model, tokenizer = load(str(model_path))[:2]
    stream_http(url, model_id, "Hi", 4)  # load the model on the node; not timed
    stream_bare(model, tokenizer, "Hi", 4)
    bare, exo = [], []
    for _ in range(rounds):  # alternate so drift in machine load hits both sides
        bare.append(stream_bare(model, tokenizer, PROMPT, max_tokens))
        exo.append(stream_http(url, model_id, PROMPT, max_tokens))

    def med(rows: list[dict[str, float]], k: str) -> float:
        return statistics.median(r[k] for r in rows)

    res: dict[str, Any] = {
        "bench": "overhead",
        "model": model_id,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "machine": machine(),
        "bare_decode_tps": med(bare, "decode_tps"),
        "exo_decode_tps": med(exo, "decode_tps"),
        "bare_ttft_s": med(bare, "ttft_s"),
        "exo_ttft_s": med(exo, "ttft_s"),
        "tokens": [r["tokens"] for r in exo],
    }
    res["decode_ratio"] = res["exo_decode_tps"] / res["bare_decode_tps"]
    res["ttft_ratio"] = res["exo_ttft_s"] / res["bare_ttft_s"]
    return res


def print_overhead(res: dict[str, Any]) -> None:
    print(f"overhead: {res['model']}, {res['max_tokens']} tokens, median of {res['rounds']} rounds")
    print(f"machine: {res['machine']}")
    print(f"{'':24}{'bare mlx-lm':>14}{'exo (HTTP)':>14}{'ratio':>10}")
    print(
        f"{'decode tokens/s':24}{res['bare_decode_tps']:14.2f}{res['exo_decode_tps']:14.2f}{res['decode_ratio']:10.3f}"
    )
    print(
        f"{'time to first token s':24}{res['bare_ttft_s']:14.3f}{res['exo_ttft_s']:14.3f}{res['ttft_ratio']:10.3f}"
    )
