"""`exo-tools instances place|preview|list|delete`: model instances on a running
cluster, through its HTTP API (the same calls an operator's scripts make)."""

from __future__ import annotations

import json
from typing import Any

import click

from exo.broker.main import Command
from exo.tools.cluster import api_headers


def ready_or_exit(url: str, iid: str) -> dict[str, Any]:
    from exo.tools.cluster import InstanceFailed, wait_ready

    try:
        return wait_ready(url, iid)
    except InstanceFailed as e:
        raise click.ClickException(str(e)) from e


@click.group()
def instances() -> None:
    """Place, preview, list and delete model instances on a running cluster."""


api_option = click.option(
    "--api", "api_url", default="http://127.0.0.1:52415", show_default=True, help="The API's URL."
)


def _instances_call(method: str, url: str, body: dict[str, Any] | None = None) -> Any:
    import httpx

    try:
        r = httpx.request(method, url, json=body, headers=api_headers(), timeout=30)
    except httpx.HTTPError as e:
        raise click.ClickException(f"cannot reach the API at {url}: {e}") from e
    if r.status_code >= 400:
        raise click.ClickException(r.json().get("error", {}).get("message", r.text))
    return r.json()


def _spec(
    model: str, nodes: str | None, stages: tuple[str, ...], lo: int | None, hi: int | None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": model}
    if nodes:
        spec["nodes"] = nodes.split(",")
    if stages:
        # NODE:START-END, e.g. node0:0-15 node1:15-30
        try:
            spec["stages"] = [
                {
                    "node": s.rsplit(":", 1)[0],
                    "layers": [int(x) for x in s.rsplit(":", 1)[1].split("-")],
                }
                for s in stages
            ]
        except (IndexError, ValueError) as e:
            raise click.BadParameter(f"stages are NODE:START-END ({e})") from e
    if lo:
        spec["min_nodes"] = lo
    if hi:
        spec["max_nodes"] = hi
    return spec


def placement_options(f: Command) -> Command:
    for opt in reversed(
        [
            click.argument("model"),
            click.option("--nodes", default=None, help="Explicit ordered nodes, comma-separated."),
            click.option("--stage", "stages", multiple=True, help="NODE:START-END (repeatable)."),
            click.option("--min-nodes", type=int, default=None),
            click.option("--max-nodes", type=int, default=None),
            api_option,
        ]
    ):
        f = opt(f)
    return f


@instances.command("place")
@placement_options
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until ready.")
def instances_place(
    model: str,
    nodes: str | None,
    stages: tuple[str, ...],
    min_nodes: int | None,
    max_nodes: int | None,
    api_url: str,
    wait: bool,
) -> None:
    """Place an instance of MODEL (automatically, or on --nodes / --stage)."""
    inst = _instances_call(
        "POST", f"{api_url}/v1/instances", _spec(model, nodes, stages, min_nodes, max_nodes)
    )
    if wait:
        inst = ready_or_exit(api_url, inst["id"])
    click.echo(json.dumps(inst, indent=2))


@instances.command("preview")
@placement_options
def instances_preview(
    model: str,
    nodes: str | None,
    stages: tuple[str, ...],
    min_nodes: int | None,
    max_nodes: int | None,
    api_url: str,
) -> None:
    """Every candidate placement of MODEL, with per-node memory; creates nothing."""
    got = _instances_call(
        "POST", f"{api_url}/v1/instances/preview", _spec(model, nodes, stages, min_nodes, max_nodes)
    )
    for c in got["candidates"]:
        split = " | ".join(f"{s['node']} [{s['layers'][0]}, {s['layers'][1]})" for s in c["stages"])
        click.echo(
            f"{'ok ' if c['ok'] else 'no '} {split}" + ("" if c["ok"] else f"  ({c['reason']})")
        )


@instances.command("list")
@api_option
def instances_list(api_url: str) -> None:
    """Instances and their state."""
    for i in _instances_call("GET", f"{api_url}/v1/instances")["data"]:
        split = " | ".join(f"{s['node']} [{s['layers'][0]}, {s['layers'][1]})" for s in i["stages"])
        click.echo(
            f"{i['id']}  {i['model']}  {i['state']}  {split}"
            + (f"  {i['error']}" if i["error"] else "")
        )


@instances.command("delete")
@click.argument("instance_id")
@api_option
def instances_delete(instance_id: str, api_url: str) -> None:
    """Delete an instance; requests in flight on it end with an error."""
    _instances_call("DELETE", f"{api_url}/v1/instances/{instance_id}")
    click.echo(f"deleted {instance_id}")
