"""`exo-tools bench ...` on the network: benchmarks of links, weights and pipeline
hops, most in network namespaces with shaped veth links (run as root)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from exo.tools.bench_cli import bench, pick_model
from exo.tools.options import models_dir_option, resolve_models_dir


def _needs_root(what: str) -> None:
    if os.geteuid() != 0:
        raise click.ClickException(f"bench {what} builds network namespaces: run it as root")


@bench.command("failover")
@click.option("--rounds", default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@models_dir_option
def bench_failover(rounds: int, as_json: bool, models_dir: Path | None) -> None:
    """Streams' longest gap when the link under a split model dies and returns (root)."""
    from exo.tools import bench_failover as bf

    _needs_root("failover")
    res = bf.run(resolve_models_dir(models_dir), rounds)
    bf.report(res)
    print(json.dumps(res) if as_json else "")


@bench.command("links")
@click.option("--rounds", default=5, show_default=True, help="Probes per link.")
@click.option("--json", "as_json", is_flag=True)
@models_dir_option
def bench_links(rounds: int, as_json: bool, models_dir: Path | None) -> None:
    """Prober bandwidth and RTT vs iperf3 and ping, in a namespace test bed (needs root)."""
    from exo.tools import bench_links as bl

    _needs_root("links")
    res = bl.run(resolve_models_dir(models_dir), rounds)
    bl.report(res)
    print(json.dumps(res) if as_json else "")


@bench.command("weights")
@click.option("--model", default=None, help="Model id (default: the default model).")
@click.option("--json", "as_json", is_flag=True)
@models_dir_option
def bench_weights(model: str | None, as_json: bool, models_dir: Path | None) -> None:
    """A model's weights copied node to node over a 1 Gbit/s link vs iperf3 on it, in a
    namespace test bed (needs root)."""
    from exo.nodes.store.store import ModelStore
    from exo.tools import bench_weights as bw

    _needs_root("weights")
    model_id, d = pick_model(model, models_dir)
    res = bw.run(d, model_id, ModelStore(d).path(model_id))
    bw.report(res)
    print(json.dumps(res) if as_json else "")


@bench.command("curve")
@click.option(
    "--sizes",
    default="9216,1179648",
    show_default=True,
    help="Frame bytes, comma-separated (defaults: a 4-row decode step and a 512-row "
    "prefill chunk of a 576-wide model).",
)
@click.option("--round-trips", "n", default=2000, show_default=True)
@click.option("--pairs", default=3, show_default=True, help="Alternated insecure/CURVE runs.")
@click.option(
    "--step-ms", default=75.0, show_default=True, help="A decode step's time, for the bound."
)
@click.option("--json", "as_json", is_flag=True)
def bench_curve(sizes: str, n: int, pairs: int, step_ms: float, as_json: bool) -> None:
    """What CURVE adds to one pipeline hop (loopback, the peer sockets' setup), and
    the decode ratio it bounds: insecure and CURVE side by side."""
    from exo.tools import bench_curve as bc

    rows = bc.run([int(s) for s in sizes.split(",")], n, pairs, step_ms)
    print(f"{'bytes':>9} {'insecure us':>12} {'CURVE us':>9} {'extra us':>9} {'decode x':>9}")
    for r in rows:
        print(
            f"{r['bytes']:>9} {r['plain_us']:>12.1f} {r['curve_us']:>9.1f} "
            f"{r['extra_us']:>9.1f} {r['decode_ratio']:>9.4f}"
        )
    if as_json:
        print(json.dumps(rows))
