"""exo-tools up: a whole cluster on this machine, placed and greeted, until Ctrl-C."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from exo.common.paths import exo_home
from exo.tools.instances_cli import ready_or_exit
from exo.tools.options import models_dir_option, resolve_models_dir

if TYPE_CHECKING:
    from exo.tools.cluster import LocalCluster


@click.command()
@click.option("--nodes", default=1, show_default=True, help="Node processes to start.")
@click.option("--model", default=None, help="Model to serve (default: the default model).")
@click.option("--api-port", default=52415, show_default=True)
@click.option("--port", default=52416, show_default=True, help="Broker ROUTER port.")
@click.option("--pub-port", default=52417, show_default=True)
@models_dir_option
def up(
    nodes: int, model: str | None, api_port: int, port: int, pub_port: int, models_dir: Path | None
) -> None:
    """A whole cluster on this machine, until Ctrl-C."""

    from exo.tools.cluster import LocalCluster
    from exo.tools.default_model import DEFAULT_MODEL, pull_default

    d = resolve_models_dir(models_dir)
    if model is None:
        model = DEFAULT_MODEL
        click.echo(f"default model: {pull_default(d)}")
    cluster = LocalCluster(
        d,
        nodes=nodes,
        api_port=api_port,
        router_port=port,
        pub_port=pub_port,
        log_dir=exo_home() / "logs" / time.strftime("up-%Y%m%d-%H%M%S"),
        tied=True,
    )
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    # Ctrl-C as KeyboardInterrupt even where SIGINT came in ignored (a shell without
    # job control starts background commands so: `exo-tools up &`, then `kill -INT`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        cluster.start()
        place_and_greet(cluster, model, nodes)
        while not stop:
            time.sleep(0.5)
            dead = [
                p
                for p in [cluster.broker, *cluster.node_procs]
                if p is not None and p.poll() is not None
            ]
            if dead:
                click.echo(f"a process exited (code {dead[0].returncode}); stopping", err=True)
                break
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        click.echo("stopped")


def placed(url: str, auth: dict[str, str], model: str, nodes: int) -> str | None:
    """An instance of `model` already placed over `nodes` nodes, not failed."""
    import httpx

    for inst in httpx.get(f"{url}/v1/instances", headers=auth, timeout=10).json()["data"]:
        if inst["model"] == model and len(inst["stages"]) == nodes and inst["state"] != "failed":
            return str(inst["id"])
    return None


def place_and_greet(cluster: LocalCluster, model: str, nodes: int) -> None:
    """One instance across every node (a pipeline stage each), loaded now so the
    first real request does not wait for it; then how to use it."""
    import httpx

    from exo.tools.cluster import api_headers

    auth = api_headers()  # the broker honours EXO_API_KEY: so do we
    # A request sent while up was starting may have placed the model already: an
    # instance as asked (one stage per node) is what up wanted.
    iid = placed(cluster.url, auth, model, nodes)
    if iid is None:
        r = httpx.post(
            f"{cluster.url}/v1/instances",
            timeout=60,
            headers=auth,
            json={"model": model, "min_nodes": nodes, "max_nodes": nodes},
        )
        iid = r.json()["id"] if r.status_code == 201 else placed(cluster.url, auth, model, nodes)
        if iid is None:
            raise click.ClickException(f"could not place {model}: {r.text}")
    inst = ready_or_exit(cluster.url, iid)
    split = ", ".join(f"{s['node']} layers {s['layers']}" for s in inst["stages"])
    click.echo(f"\nexo is serving {model} on {nodes} node(s) ({split}); logs in {cluster.log_dir}")
    click.echo(f"OpenAI base URL: {cluster.url}/v1\n")
    question = {"role": "user", "content": "What is the capital of France?"}
    body = json.dumps({"model": model, "messages": [question]})
    click.echo(
        f"curl {cluster.url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'\n"
    )
    click.echo("A second machine joins with the line `exo-tools keys show` prints.")
    click.echo("Ctrl-C stops every process this started.")
