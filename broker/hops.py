"""Where a stage's traffic goes: its peer endpoints and whom it hears (LOAD and
ROUTE carry them), and the peer a node downloads a model's weights from; each
over the best link up now (topology.peer_host)."""

from __future__ import annotations

from typing import Any, TypedDict

from exo.broker.registry import Peer
from exo.broker.topology import peer_host

# Every node's public view by id, and the links between them with their measurements.
Topology = tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]


class Hops(TypedDict, total=False):
    """A stage's peer endpoints: `next` (the next stage), `stage0` (tokens and
    errors, from every later stage), and `senders`, the peer keys of the nodes it
    takes messages from (secure clusters)."""

    next: str
    stage0: str
    senders: list[str]


def hops(order: list[str], nodes: dict[str, Peer], view: Topology) -> list[Hops]:
    """Per stage of a pipeline over the nodes `order` (stage 0 first), its Hops."""
    publics, found = view

    def endpoint(src: str, dst: str) -> str:
        port = nodes[dst].facts.peer_port or 0
        return f"tcp://{peer_host(publics[src], publics[dst], found)}:{port}"

    out: list[Hops] = []
    for k, node in enumerate(order):
        route = Hops()
        if k + 1 < len(order):
            route["next"] = endpoint(node, order[k + 1])
        if k > 0:  # tokens (last stage) and errors (any later stage) go to stage 0
            route["stage0"] = endpoint(node, order[0])
        # steps come from the stage before; tokens and errors to stage 0 from the rest
        keys = [nodes[n].facts.peer_key for n in (order[1:] if k == 0 else [order[k - 1]])]
        senders = [key for key in keys if key]
        if senders and len(senders) == len(keys):
            route["senders"] = senders
        out.append(route)
    return out


def weights_source(model: str, node: Peer, peers: list[Peer], view: Topology) -> str | None:
    """A peer that holds `model` complete, as a download source for `node` (over
    the best link between them): weights cross the cluster once, not the internet
    once per machine."""
    holders = [p for p in peers if p is not node and model in p.models and p.facts.weights_port]
    if not holders:
        return None
    publics, found = view
    holder = min(holders, key=lambda p: (p.load(), p.peer_id))
    host = peer_host(publics[node.peer_id], publics[holder.peer_id], found)
    return f"http://{host}:{holder.facts.weights_port}"
