"""Which node serves a request: a pure function over plain data."""

from __future__ import annotations

from dataclasses import dataclass

from exo.broker.registry import Peer


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    code: str
    message: str


def choose_node(nodes: list[Peer], model: str, seen: set[str]) -> Peer | Refusal:
    """A node that holds `model`: loaded before merely on disk, then the least busy.

    A model no node has ever held (`seen`) is unknown: 404. A known model whose
    nodes are all gone, or no node at all: 503, worth retrying."""
    holders = [n for n in nodes if model in n.models]
    if not holders:
        if model in seen:
            return Refusal(503, "no_node_available", f"no connected node holds the model '{model}'")
        if not nodes:
            return Refusal(503, "no_nodes", "no node is connected to the broker")
        return Refusal(404, "model_not_found", f"the model '{model}' does not exist on any node")
    return min(holders, key=lambda n: (model not in n.loaded, n.load(), n.peer_id))
