"""Streams as a client sees them, for the benchmarks: each token's arrival time,
the gaps between them, and the load a benchmark puts beside them (other
streams, a busy process, the machine's own floor)."""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

from exo.tools.cluster import api_headers

if TYPE_CHECKING:
    from mlx_lm.tokenizer_utils import TokenizerWrapper


@dataclass
class Stream:
    """One streaming completion, recording when each token arrived."""

    url: str
    model: str
    prompt: list[int]
    max_tokens: int
    times: list[float] = field(default_factory=list)
    sent: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    error: str | None = None

    def start(self) -> Stream:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        body = {
            "model": self.model,
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        self.sent = time.perf_counter()
        try:
            with httpx.stream(
                "POST", f"{self.url}/v1/completions", json=body, headers=api_headers(), timeout=600
            ) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if self.stop.is_set():
                        return  # closing the connection cancels the request
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if "error" in event:  # the request failed mid-stream (a node stopped...)
                            self.error = str(event["error"].get("message", event["error"]))
                            return
                        ids = event["choices"][0].get("token_ids") or []
                        now = time.perf_counter()
                        self.times.extend([now] * len(ids))
        except httpx.HTTPError as e:
            self.error = str(e)

    def wait(self) -> Stream:
        """Until the request ends by itself."""
        if self.thread:
            self.thread.join()
        return self

    def join(self) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join(30)


def gaps(times: list[float]) -> list[tuple[float, float]]:
    return [(a, b) for a, b in zip(times, times[1:], strict=False)]


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


_prompts = itertools.count()


def long_prompt(tokenizer: TokenizerWrapper, n: int) -> list[int]:
    """`n` tokens of prose, each call's its own from the first token on: a prompt
    measured twice would be the prefix cache's the second time."""
    text = f"Story {next(_prompts)}. " + (
        "The river runs through the old town, past the market and the mill, and on to the sea. "
        * 400
    )
    ids = tokenizer.encode(text)
    return list(ids[:n])


def wait_tokens(streams: list[Stream], n: int, timeout: float = 300) -> None:
    deadline = time.perf_counter() + timeout
    while any(len(s.times) < n for s in streams):
        if time.perf_counter() > deadline or any(s.error for s in streams):
            raise RuntimeError(f"streams stalled: {[s.error for s in streams]}")
        time.sleep(0.05)


JOINED_TOKENS = 16


def traffic(url: str, model: str) -> None:
    """Ordinary requests of every kind, as a cluster serves before a round: a chat, a
    streamed chat, a completion, a request cancelled mid-stream, an unknown model.
    They leave the engine's learned state (thread choice, pacing) as real use does."""
    chat = {"model": model, "messages": [{"role": "user", "content": "Hello there"}]}
    with httpx.Client(timeout=120, headers=api_headers()) as c:
        c.post(f"{url}/v1/chat/completions", json={**chat, "max_tokens": 12})
        with c.stream(
            "POST", f"{url}/v1/chat/completions", json={**chat, "max_tokens": 24, "stream": True}
        ) as r:
            for _ in r.iter_lines():
                pass
        c.post(
            f"{url}/v1/completions", json={"model": model, "prompt": "Once upon", "max_tokens": 16}
        )
        c.post(f"{url}/v1/chat/completions", json={**chat, "model": "nobody/none"})
    cancelled = Stream(url, model, [1, 2, 3], 400).start()
    wait_tokens([cancelled], 8)
    cancelled.join()


# A busy loop that dies with the process that started it (Linux: PR_SET_PDEATHSIG),
# so that a benchmark or test killed midway leaves no core spinning behind it.
HOG = """
import ctypes, signal, sys
if sys.platform.startswith("linux"):
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)
while True:
    pass
"""


def hog() -> subprocess.Popen[bytes]:
    """A busy nice-0 process: a compile job, a browser tab."""
    import sys

    return subprocess.Popen([sys.executable, "-c", HOG])


class Busy:
    """One busy nice-0 process beside the node (a compile job, a browser tab)."""

    def __enter__(self) -> Busy:
        self.proc = hog()
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


def machine_floor(seconds: float, step_s: float = 0.12) -> dict[str, float]:
    """A fixed computation about as long as a decode step, run over and over for
    `seconds` on one thread while the cluster idles: how far this machine's own
    jitter (a shared host's other tenants, its hypervisor) takes the longest of
    them over their median in that time. No engine's steps can stay under it."""
    from exo.nodes.engine.mlxenv import blas_threads, mx

    blas_threads(1)
    w = mx.random.normal((576, 1536)) * 0.01
    x = mx.random.normal((4, 576))
    mx.eval(w, x)

    def work(n: int) -> float:
        t = time.perf_counter()
        y = x
        for _ in range(n):
            y = (y @ w)[:, :576]
        mx.eval(y)
        return time.perf_counter() - t

    n = max(1, round(50 * step_s / work(50)))
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        times.append(work(n))
    blas_threads(None)
    med = statistics.median(times)
    return {"floor_max_ratio": max(times) / med, "floor_p99_ratio": pct(times, 99) / med}
