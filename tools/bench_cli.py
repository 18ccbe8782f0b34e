"""`exo-tools bench ...`: benchmarks that print figures beside a baseline, against
a running cluster (--url) or one started here for the run."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from exo.broker.main import Command
from exo.tools.options import models_dir_option, resolve_models_dir


def pick_model(model: str | None, models_dir: Path | None) -> tuple[str, Path]:
    """(model id, models dir) for a benchmark: the default model, pulled, unless one
    is named. Its process first runs itself again with the node's huge pages: the
    baselines (and bench lane's engine) run in it (hugepages.py)."""
    from exo.common import hugepages
    from exo.tools.default_model import DEFAULT_MODEL, pull_default

    hugepages.ensure()
    d = resolve_models_dir(models_dir)
    if model is None:
        model = DEFAULT_MODEL
        pull_default(d)
    return model, d


@contextlib.contextmanager
def _target(
    url: str | None,
    model: str | None,
    models_dir: Path | None,
    node_args: list[str] | None = None,
    nodes: int = 1,
) -> Iterator[tuple[str, str, Path]]:
    """(base URL, model id, models dir) for a benchmark: the cluster at `url`, or one
    started here for the duration (see pick_model)."""
    from exo.tools.cluster import LocalCluster

    model, d = pick_model(model, models_dir)
    if url is not None:
        yield url, model, d
        return
    ctx = click.get_current_context(silent=True)
    insecure = bool(ctx and ctx.find_root().meta.get("bench_insecure"))
    cluster = LocalCluster.on_free_ports(
        d, nodes=nodes, log_spec="warning", node_args=node_args or [], insecure=insecure
    ).start()
    try:
        yield cluster.url, model, d
    finally:
        cluster.stop()


def target_options(f: Command) -> Command:
    """--url and --model: what every benchmark runs against (see _target)."""
    f = click.option("--model", default=None, help="Model id (default: the default model).")(f)
    return click.option(
        "--url", default=None, help="A running cluster's base URL (default: start one here)."
    )(f)


@click.group()
@click.option(
    "--insecure",
    is_flag=True,
    help="The cluster started here runs without CURVE keys (what they cost: run both).",
)
def bench(insecure: bool) -> None:
    """Benchmarks that print figures beside a baseline."""
    click.get_current_context().find_root().meta["bench_insecure"] = insecure


@bench.command("overhead")
@target_options
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--rounds", default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@models_dir_option
def bench_overhead(
    url: str | None,
    model: str | None,
    max_tokens: int,
    rounds: int,
    as_json: bool,
    models_dir: Path | None,
) -> None:
    """Single-stream decode tokens/s and TTFT through the whole stack vs bare mlx-lm."""
    from exo.nodes.store.store import ModelStore
    from exo.tools.bench import overhead, print_overhead

    with _target(url, model, models_dir) as (base, model_id, d):
        res = overhead(base, ModelStore(d).path(model_id), model_id, max_tokens, rounds)
    print(json.dumps(res) if as_json else "")
    if not as_json:
        print_overhead(res)


@bench.command("cancel")
@target_options
@click.option("--cancels", default=40, show_default=True)
@click.option(
    "--storm",
    "storm_n",
    default=200,
    show_default=True,
    help="Requests cancelled at random moments.",
)
@click.option("--tokens", default=64, show_default=True, help="Tokens for the lone-request rate.")
@click.option(
    "--rounds", default=6, show_default=True, help="Storm rounds, each between two lone runs."
)
@click.option("--json", "as_json", is_flag=True)
@models_dir_option
def bench_cancel(
    url: str | None,
    model: str | None,
    cancels: int,
    storm_n: int,
    tokens: int,
    rounds: int,
    as_json: bool,
    models_dir: Path | None,
) -> None:
    """Cancel latency (client -> node) and throughput after a storm of cancels."""
    from exo.tools import bench_cancel as bc

    with _target(url, model, models_dir) as (base, model_id, _):
        res = bc.run(base, model_id, cancels, storm_n, tokens, rounds)
    bc.report(res)
    print(json.dumps(res) if as_json else "")


@bench.command("stall")
@target_options
@click.option(
    "--streams", default=4, show_default=True, help="Streams running when the long prompt comes."
)
@click.option("--long-tokens", default=2048, show_default=True, help="Length of the long prompt.")
@click.option(
    "--concurrency", default="1,4,8,16", show_default=True, help="Stream counts for throughput."
)
@click.option(
    "--tokens", default=48, show_default=True, help="Tokens per stream in the throughput runs."
)
@click.option(
    "--rounds", default=1, show_default=True, help="Rounds of the stall test (exo's side)."
)
@click.option(
    "--busy-every",
    default=0,
    show_default=True,
    help="Every Nth round runs with a busy nice-0 process beside the node (2: half of them).",
)
@click.option(
    "--traffic/--no-traffic",
    default=False,
    show_default=True,
    help="Before each round: chats, streamed chats, completions and a cancelled request.",
)
@click.option(
    "--prefill-budget", type=int, default=None, help="Node's budget, when starting a cluster here."
)
@click.option(
    "--max-stall",
    type=float,
    default=None,
    help="Node's --max-stall, when starting a cluster here.",
)
@click.option("--json", "as_json", is_flag=True)
@models_dir_option
def bench_stall(
    url: str | None,
    model: str | None,
    streams: int,
    long_tokens: int,
    concurrency: str,
    tokens: int,
    rounds: int,
    busy_every: int,
    traffic: bool,
    prefill_budget: int | None,
    max_stall: float | None,
    as_json: bool,
    models_dir: Path | None,
) -> None:
    """Inter-token latency of running streams while a long prompt prefills, and batch throughput."""
    from exo.nodes.store.store import ModelStore
    from exo.tools import bench_stall as stall

    args = ["--prefill-budget", str(prefill_budget)] if prefill_budget else []
    args += ["--max-stall", str(max_stall)] if max_stall else []
    with _target(url, model, models_dir, args) as (base, model_id, d):
        res = stall.run(
            base,
            ModelStore(d).path(model_id),
            model_id,
            streams,
            long_tokens,
            [int(x) for x in concurrency.split(",") if x],
            tokens,
            rounds,
            busy_every,
            traffic,
        )
    stall.report(res)
    print(json.dumps(res) if as_json else "")


@bench.command("churn")
@target_options
@click.option("--streams", default=4, show_default=True, help="Streams running throughout.")
@click.option("--context", default=400, show_default=True, help="The streams' prompt tokens.")
@click.option("--arrivals", default=10, show_default=True, help="Short requests, one at a time.")
@click.option("--every", default=2.0, show_default=True, help="Seconds between arrivals.")
@click.option("--short-prompt", default=16, show_default=True)
@click.option("--short-tokens", default=4, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@models_dir_option
def bench_churn(
    url: str | None,
    model: str | None,
    streams: int,
    context: int,
    arrivals: int,
    every: float,
    short_prompt: int,
    short_tokens: int,
    as_json: bool,
    models_dir: Path | None,
) -> None:
    """Running streams' inter-token latency while short requests join and leave the batch."""
    from exo.tools import bench_churn as bc

    with _target(url, model, models_dir) as (base, model_id, _):
        res = bc.run(base, model_id, streams, context, arrivals, every, short_prompt, short_tokens)
    bc.report(res)
    print(json.dumps(res) if as_json else "")


@bench.command("lane")
@click.option("--model", default=None, help="Model id (default: the default model).")
@click.option("--streams", default=4, show_default=True, help="Streams decoding throughout.")
@click.option("--long-tokens", default=2048, show_default=True, help="The lane's prompt.")
@click.option("--blocks", default=16, show_default=True, help="Blocks, held and working in turn.")
@click.option("--block-steps", default=7, show_default=True, help="Decode steps per block.")
@click.option("--json", "as_json", is_flag=True)
@models_dir_option
def bench_lane(
    model: str | None,
    streams: int,
    long_tokens: int,
    blocks: int,
    block_steps: int,
    as_json: bool,
    models_dir: Path | None,
) -> None:
    """The streams' decode steps with the prefill lane working beside them and held, in
    turn (the node's engine, run in this process)."""
    from exo.nodes.store.store import ModelStore
    from exo.tools import bench_lane as bl

    model, d = pick_model(model, models_dir)
    res = bl.run(ModelStore(d).path(model), model, streams, long_tokens, blocks, block_steps)
    bl.report(res)
    print(json.dumps(res) if as_json else "")


@bench.command("pipeline")
@target_options
@click.option("--stages", default="1,2,3", show_default=True, help="Stage counts to compare.")
@click.option("--tokens", default=64, show_default=True)
@click.option("--rounds", default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@models_dir_option
def bench_pipeline(
    url: str | None,
    model: str | None,
    stages: str,
    tokens: int,
    rounds: int,
    as_json: bool,
    models_dir: Path | None,
) -> None:
    """Decode tokens/s and TTFT on 1, 2, 3 stages of this machine; bytes between stages."""
    from exo.tools import bench_pipeline as bp

    counts = [int(x) for x in stages.split(",") if x]
    with _target(url, model, models_dir, nodes=max(counts)) as (base, model_id, _):
        res = bp.run(base, model_id, counts, tokens, rounds)
    bp.report(res)
    print(json.dumps(res) if as_json else "")


@bench.command("prefix")
@click.option("--model", default=None, help="Model id (default: the default model).")
@click.option(
    "--turns", default=6, show_default=True, help="Conversation turns, the first included."
)
@click.option("--baseline-agent", is_flag=True, help="The agent trace on mlx_lm.server too (slow).")
@click.option("--json", "as_json", is_flag=True)
@models_dir_option
def bench_prefix(
    model: str | None, turns: int, baseline_agent: bool, as_json: bool, models_dir: Path | None
) -> None:
    """A chat's next turn and an agent's shared system prompt, with the prefix cache,
    without it, and on mlx_lm.server with its own prompt cache."""
    from exo.nodes.store.store import ModelStore
    from exo.tools import bench_prefix as bp

    model_id, d = pick_model(model, models_dir)
    path = ModelStore(d).path(model_id)
    res = bp.run(d, model_id, path, turns, baseline_agent)
    bp.report(res)
    print(json.dumps(res) if as_json else "")


@bench.command("grammar")
@target_options
@click.option(
    "--streams", default="1,8", show_default=True, help="Concurrent streams, comma-separated."
)
@click.option("--max-tokens", default=96, show_default=True)
@click.option("--rounds", default=2, show_default=True, help="Alternated free/schema pairs.")
@click.option("--json", "as_json", is_flag=True)
@models_dir_option
def bench_grammar(
    url: str | None,
    model: str | None,
    streams: str,
    max_tokens: int,
    rounds: int,
    as_json: bool,
    models_dir: Path | None,
) -> None:
    """A json_schema response format beside free decoding (1 and 8 streams), and the
    grammar libraries' mask cost on the model's tokenizer."""
    from exo.nodes.store.store import ModelStore
    from exo.tools import bench_grammar as bg
    from exo.tools.bench import machine

    with _target(url, model, models_dir) as (base, model_id, d):
        res: dict[str, Any] = {"machine": machine(), "model": model_id}
        res["libraries"] = bg.libraries(ModelStore(d).path(model_id))
        res["decode"] = [
            bg.decode(base, model_id, int(n), max_tokens, rounds) for n in streams.split(",")
        ]
    bg.report(res)
    print(json.dumps(res) if as_json else "")
