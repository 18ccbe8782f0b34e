"""`exo-tools bench churn`: do running streams stutter when short requests come and go?

A chat server's batch changes all the time: requests join when their prompt is
done and leave when they finish. Each change touches the running rows' caches
(nodes/engine/rowcache.py); this measures, from the client side, what the streams see:
their inter-token latency while short requests join and leave beside them,
against the same streams with nothing arriving (this machine's own jitter).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from exo.tools.streams import Stream, gaps, pct, wait_tokens


def prompt(n: int, seed: int) -> list[int]:
    return [100 + (seed * 131 + 7 * i) % 5000 for i in range(n)]


def run(
    url: str,
    model: str,
    streams: int,
    context: int,
    arrivals: int,
    every_s: float,
    short_prompt: int,
    short_tokens: int,
) -> dict[str, Any]:
    from exo.tools.bench import machine

    Stream(url, model, [1, 2, 3], 2).start().join()  # the node loads the model
    # as long as the default model's 8192-token context allows: they run through the churn
    long = 8000 - context
    running = [Stream(url, model, prompt(context, i), long).start() for i in range(streams)]
    wait_tokens(running, 5)
    t_before = time.perf_counter()
    time.sleep(8.0)
    t_churn = time.perf_counter()
    shorts = []
    for i in range(arrivals):
        shorts.append(Stream(url, model, prompt(short_prompt, 1000 + i), short_tokens).start())
        time.sleep(every_s)
    for s in shorts:
        s.wait()
    t_quiet = time.perf_counter()
    time.sleep(t_quiet - t_churn)  # as long again with nothing arriving
    for s in running:
        s.join()
    errors = [s.error for s in running + shorts if s.error]
    if errors:
        raise RuntimeError(f"requests failed: {errors}")

    def window(a: float, b: float) -> list[float]:
        return [y - x for s in running for x, y in gaps(s.times) if a <= x and y <= b]

    before, churn, quiet = (
        window(t_before, t_churn),
        window(t_churn, t_quiet),
        window(t_quiet, time.perf_counter()),
    )
    med = statistics.median(before)
    return {
        "bench": "churn",
        "model": model,
        "machine": machine(),
        "streams": streams,
        "context_tokens": context,
        "arrivals": arrivals,
        "every_s": every_s,
        "short_prompt_tokens": short_prompt,
        "short_tokens": short_tokens,
        "itl_median_before_s": med,
        "itl_max_churn_s": max(churn),
        "itl_p99_churn_s": pct(churn, 99),
        "itl_median_churn_s": statistics.median(churn),
        "itl_max_quiet_s": max(quiet),
        "itl_p99_quiet_s": pct(quiet, 99),
        "churn_ratio": max(churn) / med,
        "quiet_ratio": max(quiet) / med,
        "short_ttft_s": statistics.median(s.times[0] - s.sent for s in shorts),
    }


def report(res: dict[str, Any]) -> None:
    med = res["itl_median_before_s"]
    print(
        f"churn: {res['model']}, {res['streams']} streams at {res['context_tokens']} tokens; "
        f"{res['arrivals']} requests of {res['short_prompt_tokens']} + {res['short_tokens']} "
        f"tokens, one every {res['every_s']} s"
    )
    print(f"machine: {res['machine']}")
    print(f"{'':30}{'ITL max, s':>12}{'p99, s':>10}{'max / median':>14}")
    print(
        f"{'requests joining and leaving':30}{res['itl_max_churn_s']:12.3f}"
        f"{res['itl_p99_churn_s']:10.3f}{res['churn_ratio']:14.2f}"
    )
    print(
        f"{'nothing arriving (baseline)':30}{res['itl_max_quiet_s']:12.3f}"
        f"{res['itl_p99_quiet_s']:10.3f}{res['quiet_ratio']:14.2f}"
    )
    print(
        f"streams' median ITL before: {med:.3f} s, during: {res['itl_median_churn_s']:.3f} s; "
        f"short requests' median TTFT {res['short_ttft_s']:.2f} s"
    )
