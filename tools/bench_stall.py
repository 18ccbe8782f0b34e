"""`exo-tools bench stall`: do running streams freeze while a long prompt prefills?

Client-side figures against a running cluster, beside mlx-lm's BatchGenerator
on the same model in the same run.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exo.tools.streams import (
    JOINED_TOKENS,
    Busy,
    Stream,
    gaps,
    long_prompt,
    machine_floor,
    pct,
    traffic,
    wait_tokens,
)

if TYPE_CHECKING:
    from mlx.nn import Module
    from mlx_lm.tokenizer_utils import TokenizerWrapper


def exo_stall(
    url: str,
    model: str,
    tokenizer: TokenizerWrapper,
    streams: int,
    long_n: int,
    before_s: float,
    control_s: float,
    busy: bool = False,
    varied: bool = False,
) -> dict[str, Any]:
    long_ids = long_prompt(tokenizer, long_n)
    if varied:
        traffic(url, model)
    # alone: on an idle cluster and machine, whatever the round then adds
    alone = Stream(url, model, long_prompt(tokenizer, long_n), 1).start()
    alone.wait()
    ttft_alone = alone.times[0] - alone.sent
    if busy:
        with Busy():
            res = _beside_streams(url, model, tokenizer, streams, long_ids, before_s, control_s)
    else:
        res = _beside_streams(url, model, tokenizer, streams, long_ids, before_s, control_s)
    res["long_ttft_alone_s"] = ttft_alone
    res["ttft_ratio"] = res["long_ttft_s"] / ttft_alone
    res["busy"] = busy
    return res


def _beside_streams(
    url: str,
    model: str,
    tokenizer: TokenizerWrapper,
    streams: int,
    long_ids: list[int],
    before_s: float,
    control_s: float,
) -> dict[str, Any]:
    running = [
        Stream(url, model, tokenizer.encode(f"Story number {i}:"), 4000).start()
        for i in range(streams)
    ]
    wait_tokens(running, 5)
    t_before = time.perf_counter()
    time.sleep(before_s)
    # The long prompt then decodes a few tokens in the batch: joining it must not
    # freeze the streams either.
    long = Stream(url, model, long_ids, JOINED_TOKENS).start()
    long.wait()
    t_sent, t_first, t_last = long.sent, long.times[0], long.times[-1]
    # The same streams for as long again with no prompt coming: how high their
    # inter-token latency goes by itself on this machine (the noise floor).
    t_after = t_last + 1.0
    time.sleep(1.0 + min(control_s, t_first - t_sent))
    for s in running:
        s.join()
    before = [b - a for s in running for a, b in gaps(s.times) if t_before <= a and b < t_sent]
    during = [b - a for s in running for a, b in gaps(s.times) if b > t_sent and a < t_first]
    joined = [b - a for s in running for a, b in gaps(s.times) if b > t_first and a < t_last]
    after = [b - a for s in running for a, b in gaps(s.times) if a >= t_after]
    med = statistics.median(before)
    return {
        "itl_median_before_s": med,
        "itl_max_during_s": max(during),
        "itl_p99_during_s": pct(during, 99),
        "itl_median_during_s": statistics.median(during),
        "stall_ratio": max(during) / med,
        "itl_max_joined_s": max(joined),
        "joined_ratio": max(joined) / med,
        "itl_median_control_s": statistics.median(after),
        "itl_max_control_s": max(after),
        "control_ratio": max(after) / med,
        "p99_ratio": pct(during, 99) / med,
        "long_ttft_s": t_first - t_sent,
    }


def exo_throughput(url: str, model: str, tokenizer: TokenizerWrapper, n: int, tokens: int) -> float:
    streams = [
        Stream(url, model, tokenizer.encode(f"Story number {i}:"), tokens).start() for i in range(n)
    ]
    for s in streams:
        s.wait()
    start = max(s.times[0] for s in streams)
    end = min(s.times[-1] for s in streams)
    count = sum(1 for s in streams for t in s.times if start < t <= end)
    return count / (end - start) if end > start else float("nan")


def batchgen_throughput(model: Module, tokenizer: TokenizerWrapper, n: int, tokens: int) -> float:
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, max_tokens=tokens, stop_tokens=[])
    gen.insert([tokenizer.encode(f"Story number {i}:") for i in range(n)], max_tokens=[tokens] * n)
    times: list[float] = []
    while True:
        _, responses = gen.next()
        if responses:
            if len(responses) == n:
                times.append(time.perf_counter())
            if any(r.finish_reason for r in responses):
                break
        elif not gen._unprocessed_sequences and not gen._currently_processing and not times:
            continue
    gen.close()
    return n * (len(times) - 1) / (times[-1] - times[0])


def batchgen_stall(
    model: Module, tokenizer: TokenizerWrapper, streams: int, long_n: int, before_steps: int = 20
) -> dict[str, float]:
    """The same stall test on mlx-lm's BatchGenerator (prefill chunks of 2048, alternating)."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, max_tokens=4000, stop_tokens=[])
    uids = gen.insert(
        [tokenizer.encode(f"Story number {i}:") for i in range(streams)],
        max_tokens=[4000] * streams,
    )
    last: dict[int, float] = {}
    before: list[float] = []
    during: list[float] = []
    long_uid: int | None = None
    steps = 0
    while True:
        _, responses = gen.next()
        now = time.perf_counter()
        for r in responses:
            if r.uid == long_uid:
                gen.close()
                return {
                    "itl_median_before_s": statistics.median(before),
                    "itl_max_during_s": max(during),
                    "stall_ratio": max(during) / statistics.median(before),
                }
            if r.uid in uids and r.uid in last:
                (during if long_uid is not None else before).append(now - last[r.uid])
            last[r.uid] = now
        steps += 1
        if steps == before_steps:
            long_uid = gen.insert([long_prompt(tokenizer, long_n)], max_tokens=[1])[0]


def run(
    url: str,
    model_path: Path,
    model_id: str,
    streams: int,
    long_n: int,
    concurrency: list[int],
    tokens: int,
    rounds: int = 1,
    busy_every: int = 0,
    varied: bool = False,
) -> dict[str, Any]:
    from mlx_lm import load

    from exo.tools.bench import machine

    model, tokenizer = load(str(model_path))[:2]
    Stream(url, model_id, [1, 2, 3], 2).start().join()  # the node loads the model
    # As long as the long prompt's prefill with streams running (~20 s here).
    floor = machine_floor(20.0)
    res: dict[str, Any] = {
        "bench": "stall",
        "model": model_id,
        "machine": machine(),
        "streams": streams,
        "long_prompt_tokens": long_n,
        **floor,
    }
    # One round's max is one moment of a shared machine: several rounds show the spread,
    # and the table shows the round with the median ratio.
    res["exo_rounds"] = [
        exo_stall(
            url,
            model_id,
            tokenizer,
            streams,
            long_n,
            before_s=8.0,
            control_s=60,
            busy=bool(busy_every) and i % busy_every == busy_every - 1,
            varied=varied,
        )
        for i in range(rounds)
    ]
    by_ratio = sorted(res["exo_rounds"], key=lambda r: r["stall_ratio"])
    res["exo"] = by_ratio[(len(by_ratio) - 1) // 2]
    res["worst_ttft_ratio"] = max(r["ttft_ratio"] for r in res["exo_rounds"])
    res["median_p99_ratio"] = statistics.median(r["p99_ratio"] for r in res["exo_rounds"])
    res["batchgen"] = batchgen_stall(model, tokenizer, streams, long_n)
    res["throughput"] = []
    for n in concurrency:
        exo = exo_throughput(url, model_id, tokenizer, n, tokens)
        ref = batchgen_throughput(model, tokenizer, n, tokens)
        res["throughput"].append(
            {"streams": n, "exo_tps": exo, "batchgen_tps": ref, "ratio": exo / ref}
        )
    return res


def report(res: dict[str, Any]) -> None:
    e, b = res["exo"], res["batchgen"]
    print(
        f"stall: {res['model']}, {res['streams']} streams, long prompt {res['long_prompt_tokens']} tokens"
    )
    print(f"machine: {res['machine']}")
    print(f"{'':34}{'exo':>12}{'BatchGenerator':>16}")
    print(
        f"{'median ITL before, s':34}{e['itl_median_before_s']:12.3f}{b['itl_median_before_s']:16.3f}"
    )
    print(
        f"{'max ITL during long prefill, s':34}{e['itl_max_during_s']:12.3f}{b['itl_max_during_s']:16.3f}"
    )
    print(f"{'p99 ITL during, s':34}{e['itl_p99_during_s']:12.3f}{'':>16}")
    print(f"{'median ITL during, s':34}{e['itl_median_during_s']:12.3f}{'':>16}")
    print(f"{'max during / median before':34}{e['stall_ratio']:12.2f}{b['stall_ratio']:16.2f}")
    print(
        f"{'max ITL while it decodes too, s':34}{e['itl_max_joined_s']:12.3f}"
        f"   ({e['joined_ratio']:.2f}x: the {JOINED_TOKENS} tokens after its first, joining included)"
    )
    print(
        f"{'no prompt: max / median before':34}{e['control_ratio']:12.2f}"
        f"   (the same streams after the prefill, as long again: this machine's own jitter)"
    )
    print(
        f"{'fixed work, idle: max / median':34}{res['floor_max_ratio']:12.2f}"
        f"   (p99 {res['floor_p99_ratio']:.2f}; a 0.12 s computation for 20 s: the machine's floor)"
    )
    print(
        f"long prompt TTFT: {e['long_ttft_s']:.2f}s with streams running, {e['long_ttft_alone_s']:.2f}s alone "
        f"on an idle cluster (ratio {e['ttft_ratio']:.2f})"
    )
    if len(res.get("exo_rounds", [])) > 1:
        print(
            "rounds (max / p99 / median during, join, control: over the median before;"
            " the median before; TTFT with streams):"
        )
        for i, r in enumerate(res["exo_rounds"], 1):
            med = r["itl_median_before_s"]
            print(
                f"  {i}: {r['stall_ratio']:.2f} / {r['itl_p99_during_s'] / med:.2f} / "
                f"{r['itl_median_during_s'] / med:.2f}, {r['joined_ratio']:.2f}, "
                f"{r['control_ratio']:.2f}; {med:.3f}s; {r['long_ttft_s']:.1f}s "
                f"(x{r['ttft_ratio']:.1f}){' busy' if r.get('busy') else ''}"
            )
        print("  (the table above shows the round with the median max / median before)")
        print(
            f"worst round's TTFT ratio {res['worst_ttft_ratio']:.2f}; median round's p99 / median "
            f"before {res['median_p99_ratio']:.2f}"
        )
    print(f"{'streams':>8}{'exo tok/s':>12}{'BatchGenerator tok/s':>22}{'ratio':>8}")
    for row in res["throughput"]:
        print(
            f"{row['streams']:>8}{row['exo_tps']:12.1f}{row['batchgen_tps']:22.1f}{row['ratio']:8.2f}"
        )
