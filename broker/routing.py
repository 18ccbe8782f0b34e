"""Which instance serves a request: pure functions over plain data."""

from __future__ import annotations

from dataclasses import dataclass

from exo.broker.instances import Instance
from exo.broker.registry import Peer


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    code: str
    message: str


def choose_instance(
    instances: list[Instance], nodes: dict[str, Peer], model: str
) -> Instance | None:
    """The least loaded ready instance of `model` (load: its first stage's requests)."""
    ready = [
        i for i in instances if i.model == model and i.state == "ready" and i.first_node in nodes
    ]
    if not ready:
        return None
    return min(ready, key=lambda i: (nodes[i.first_node].load(), len(i.stages), i.id))


def no_holder(nodes: list[Peer], model: str, seen: set[str]) -> Refusal:
    """Why a model no connected node holds cannot be served. A model no node has
    ever held (`seen`) is unknown: 404. A known model whose nodes are all gone,
    or no node at all: 503, worth retrying."""
    if model in seen:
        return Refusal(503, "no_node_available", f"no connected node holds the model '{model}'")
    if not nodes:
        return Refusal(503, "no_nodes", "no node is connected to the broker")
    return Refusal(404, "model_not_found", f"the model '{model}' does not exist on any node")
