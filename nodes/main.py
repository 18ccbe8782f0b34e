"""exo-node: one per machine."""

from __future__ import annotations

import logging
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from exo.broker.protocol import DEFAULT_ROUTER_PORT
from exo.common import hugepages, logs, parent
from exo.nodes.store.store import default_models_dir

if TYPE_CHECKING:
    from exo.common.keys import Cluster
    from exo.nodes.engine.engine import Engine

log = logging.getLogger("exo.nodes.main")


@click.command()
@click.option(
    "--broker",
    default=None,
    help="The broker's ROUTER endpoint (default: the broker of this node's cluster found "
    f"on the local network, else tcp://127.0.0.1:{DEFAULT_ROUTER_PORT}).",
)
@click.option("--name", default=None, help="A label for this node (default: the hostname).")
@click.option(
    "--models-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where models live (env EXO_MODELS_DIR, default ~/.exo/models).",
)
@click.option(
    "--extra-models-dir",
    "extra_dirs",
    type=click.Path(path_type=Path),
    multiple=True,
    help="A read-only models directory (repeatable).",
)
@click.option(
    "--link-types",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help='JSON {"ifname": "wifi|ethernet|thunderbolt|thunderbolt5|vpn|loopback|other"}; wins over detection.',
)
@click.option(
    "--download-stall-timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Give a download up after this many seconds without progress.",
)
@click.option(
    "--prefill-budget",
    type=int,
    default=None,
    help="Fixed tokens per engine step while streams decode (default: sized by --max-stall).",
)
@click.option(
    "--kv-budget-mb",
    type=int,
    default=None,
    help="KV cache memory for admitted requests (default: a quarter of free memory).",
)
@click.option(
    "--idle-budget",
    type=int,
    default=None,
    help="Prefill chunk in tokens when nothing decodes (default 256).",
)
@click.option(
    "--max-stall",
    type=float,
    default=None,
    help="Slowest step, relative to a decode-only step, while a prompt prefills (default 1.5).",
)
@click.option(
    "--max-ttft-ratio",
    type=float,
    default=None,
    help="Slowest first token of a prompt prefilled beside streams, relative to the "
    "same prompt alone (default 3); where it and --max-stall cannot both hold, "
    "--max-stall gives.",
)
@click.option(
    "--prefill-lane/--no-prefill-lane",
    default=None,
    help="Prefill prompts on a core of their own while streams decode "
    "(default: on MLX's CPU backend with 2+ cores).",
)
@click.option(
    "--prefix-cache/--no-prefix-cache",
    default=True,
    show_default=True,
    help="Keep the KV of prompts and answers for the next request that starts with "
    "the same tokens (a chat's next turn, an agent's system prompt).",
)
@click.option(
    "--prefix-cache-mb",
    type=int,
    default=None,
    help="Most memory the prefix cache keeps, inside the KV budget (default: half of it).",
)
@click.option(
    "--peer-port",
    type=int,
    default=0,
    help="Port of the socket pipeline stages use between nodes (default: any free one).",
)
@click.option(
    "--probe-port",
    type=int,
    default=0,
    help="Port other nodes probe this node's links on (default: any free one).",
)
@click.option(
    "--stage-timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Fail a pipeline step's requests when the later stages do not answer it in this long.",
)
@click.option(
    "--weights-port",
    type=int,
    default=0,
    help="Port this node serves its complete models to other nodes on (default: any free one).",
)
@click.option(
    "--serve-weights/--no-serve-weights",
    default=True,
    show_default=True,
    help="Let other nodes fetch this node's models from it instead of the hub.",
)
@click.option(
    "--join",
    "join_token",
    default=None,
    help="A join token from `exo-tools keys show` on the broker's machine: stored in "
    "~/.exo/cluster, then used on every start.",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="No CURVE keys (the broker runs with --insecure too): a closed lab only.",
)
@click.option("--log", "log_spec", default=None, help='e.g. "info" or "nodes.engine=debug".')
@click.option("--log-file", default=None, help="DEBUG log file (default ~/.exo/logs/node-PID.log).")
def main(
    broker: str | None,
    name: str | None,
    models_dir: Path | None,
    extra_dirs: tuple[Path, ...],
    link_types: Path | None,
    download_stall_timeout: float,
    prefill_budget: int | None,
    kv_budget_mb: int | None,
    idle_budget: int | None,
    max_stall: float | None,
    max_ttft_ratio: float | None,
    prefill_lane: bool | None,
    prefix_cache: bool,
    prefix_cache_mb: int | None,
    peer_port: int,
    probe_port: int,
    stage_timeout: float,
    weights_port: int,
    serve_weights: bool,
    join_token: str | None,
    insecure: bool,
    log_spec: str | None,
    log_file: str | None,
) -> None:
    """Serve this machine's models to an exo cluster."""
    parent.follow_parent()
    hugepages.ensure()
    logs.setup(log_spec, log_file or logs.default_log_file("node"))
    from exo.nodes.machine.interfaces import load_link_types
    from exo.nodes.store.download import Downloader
    from exo.nodes.worker import Node

    engine = engine_of(
        prefill_budget, max_stall, idle_budget, kv_budget_mb, prefill_lane, max_ttft_ratio,
        prefix_cache, prefix_cache_mb,
    )  # fmt: skip
    cluster = cluster_of(join_token, insecure)
    try:
        types = load_link_types(link_types)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    node = Node(
        broker or find_broker(cluster, types),
        name or socket.gethostname(),
        models_dir or default_models_dir(),
        engine,
        extra_dirs=list(extra_dirs),
        downloader=Downloader(stall_timeout=download_stall_timeout),
        link_types=types,
        peer_port=peer_port,
        probe_port=probe_port,
        stage_timeout=stage_timeout,
        weights_port=weights_port if serve_weights else None,
        cluster=cluster,
    )
    signal.signal(signal.SIGTERM, lambda *_: node.stopping.set())
    try:
        sys.exit(node.run())
    except KeyboardInterrupt:
        node.stopping.set()


def engine_of(
    prefill_budget: int | None,
    max_stall: float | None,
    idle_budget: int | None,
    kv_budget_mb: int | None,
    prefill_lane: bool | None,
    max_ttft_ratio: float | None,
    prefix_cache: bool,
    prefix_cache_mb: int | None,
) -> Engine:
    """The engine as the options ask (each left out: its default)."""
    from exo.nodes.engine.engine import Engine
    from exo.nodes.engine.pacing import DEFAULT_IDLE_BUDGET, DEFAULT_MAX_STALL
    from exo.nodes.engine.watch import DEFAULT_MAX_TTFT_RATIO

    prefix_limit = None if prefix_cache_mb is None else prefix_cache_mb << 20
    return Engine(
        prefill_budget=prefill_budget,
        max_stall=max_stall or DEFAULT_MAX_STALL,
        idle_budget=idle_budget or DEFAULT_IDLE_BUDGET,
        kv_budget=kv_budget_mb << 20 if kv_budget_mb else None,
        lane=prefill_lane,
        max_ttft_ratio=max_ttft_ratio or DEFAULT_MAX_TTFT_RATIO,
        prefix_limit=prefix_limit if prefix_cache else 0,
    )


def cluster_of(join_token: str | None, insecure: bool) -> Cluster | None:
    """The cluster's keys (joined with a token, or this machine's own); None: insecure."""
    from exo.common import keys

    if insecure:
        return None
    try:
        return keys.Cluster.join(join_token) if join_token else keys.Cluster.load()
    except (keys.KeysMissing, ValueError) as e:
        raise click.ClickException(str(e)) from None


def find_broker(cluster: Cluster | None, types: dict[str, str]) -> str:
    """The broker of this node's cluster on the local network (common/discovery.py),
    over this machine's best link to it; else one on this machine's loopback."""
    from exo.common import discovery
    from exo.nodes.machine.interfaces import interfaces

    print_ = discovery.fingerprint(cluster.broker.public if cluster is not None else None)
    try:
        found = discovery.choose(discovery.browse(), print_)
    except discovery.NotFound as e:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", DEFAULT_ROUTER_PORT)) == 0:
                return f"tcp://127.0.0.1:{DEFAULT_ROUTER_PORT}"
        raise click.ClickException(str(e)) from None
    best = discovery.ranked(found.addresses, interfaces(types))
    endpoint = f"tcp://{best[0]}:{found.router_port}"
    log.info("found the broker %s on the local network: dialling %s", found.name, endpoint)
    return endpoint


if __name__ == "__main__":
    main()
