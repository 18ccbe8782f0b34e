"""Which instance serves a request: pure functions over plain data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from exo.broker.instances import Instance
from exo.broker.registry import Peer
from exo.common.digests import held


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    code: str
    message: str


# A cached prefix draws a request to an instance only while that instance is at
# most this many requests busier than the least loaded: past it, waiting in a queue
# costs more than the prefill the cache saves.
PREFIX_SLACK = 4


def cached(node: Peer, model: str) -> set[str]:
    """The prefix digests `node` reports for `model` (common/digests.py)."""
    report = node.live.prefix_cache
    return set(report.digests.get(model, [])) if report is not None else set()


def choose_instance(
    instances: list[Instance], nodes: dict[str, Peer], model: str, wanted: Sequence[str] = ()
) -> Instance | None:
    """The ready instance of `model` whose first stage caches the longest prefix
    of the request (`wanted`: its digests), unless it is much busier than the
    least loaded; else the least loaded (load: its first stage's requests)."""
    ready = [
        i
        for i in instances
        if i.model == model and i.state == "ready" and all(n in nodes for n in i.nodes)
    ]
    if not ready:
        return None
    load = {i.id: nodes[i.first_node].load() for i in ready}
    least = min(load.values())

    def score(i: Instance) -> tuple[int, int, int, str]:
        near = load[i.id] <= least + PREFIX_SLACK
        hit = held(list(wanted), cached(nodes[i.first_node], model)) if near and wanted else 0
        return (-hit, load[i.id], len(i.stages), i.id)

    return min(ready, key=score)


def no_holder(nodes: list[Peer], model: str, seen: set[str]) -> Refusal:
    """Why a model no connected node holds cannot be served. A model no node has
    ever held (`seen`) is unknown: 404. A known model whose nodes are all gone,
    or no node at all: 503, worth retrying."""
    if model in seen:
        return Refusal(503, "no_node_available", f"no connected node holds the model '{model}'")
    if not nodes:
        return Refusal(503, "no_nodes", "no node is connected to the broker")
    return Refusal(404, "model_not_found", f"the model '{model}' does not exist on any node")
