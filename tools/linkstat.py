"""`exo-tools linkstat`: the cluster's links, live, from the broker's PUB socket.

The broker re-publishes its whole state every second (topic "cluster"), so a
late subscriber is current after one message: the clone pattern.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import zmq

from exo.broker import protocol as P
from exo.common import keys


class NoBroker(Exception):
    pass


def snapshots(pub: str, timeout_s: float = 5.0) -> Iterator[dict[str, Any]]:
    """Yield the broker's cluster state each time it is published."""
    sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, P.TOPIC_CLUSTER)
    try:
        # The operator's tools speak with the frontend key (the broker's machine).
        cluster = keys.Cluster.load()
        if cluster.frontend is not None:
            keys.connect_as(sub, cluster.frontend, cluster.broker)
    except keys.KeysMissing:
        pass  # an insecure cluster
    sub.connect(pub)
    try:
        while True:
            if not sub.poll(int(timeout_s * 1000)):
                raise NoBroker(
                    f"no cluster state from {pub} in {timeout_s:.0f}s: is exo-broker running there?"
                )
            topic, frame = sub.recv_multipart()
            try:
                msg = P.decode(frame)
            except P.ProtocolError:
                continue
            if isinstance(msg, P.Reply) and isinstance(msg.data, dict):
                yield msg.data
    finally:
        sub.close(linger=0)


def rate(bps: float | None) -> str:
    if bps is None:
        return "-"
    bits = bps * 8
    for unit in ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"):
        if bits < 1000:
            return f"{bits:.1f} {unit}"
        bits /= 1000
    return f"{bits:.1f} Tbit/s"


def carries(state: dict[str, Any], link: dict[str, Any]) -> str:
    """What rides on a link now: a node's broker connection, an instance's steps."""
    here = {f"//{link['a']['address']}:", f"//{link['b']['address']}:"}
    out = []
    for n in state.get("nodes", []):
        endpoint = (n.get("status", {}).get("broker") or {}).get("endpoint", "")
        if any(h in endpoint for h in here):
            out.append(f"broker<-{n.get('name') or n.get('id')}")
    for inst in state.get("instances", []):
        for route in inst.get("routes", []):
            if any(h in str(v) for v in route.values() for h in here):
                out.append(f"{inst['id']} steps")
                break
    return ", ".join(out) or "-"


def failovers(state: dict[str, Any]) -> str:
    """Each node's last failover of its broker connection."""
    lines = []
    for n in state.get("nodes", []):
        last = ((n.get("status", {}).get("broker") or {}).get("failovers") or [None])[-1]
        if last:
            lines.append(f"{n.get('name')}: {last['from']} -> {last['to']}")
    return "; ".join(lines)


def skew(state: dict[str, Any]) -> str:
    """Versions the nodes do not agree on."""
    return "; ".join(
        f"{k} differs: " + ", ".join(f"{v} on {', '.join(ns)}" for v, ns in by.items())
        for k, by in (state.get("version_skew") or {}).items()
    )


def table(state: dict[str, Any]) -> Any:
    from rich.table import Table

    caption = "\n".join(x for x in (failovers(state), skew(state)) if x)
    t = Table(title=f"exo links ({len(state.get('nodes', []))} nodes)", caption=caption)
    for col in ("A", "B", "type", "up", "RTT", "capacity", "A->B", "B->A", "carries"):
        t.add_column(col)
    for link in state.get("links", []):
        a, b = link["a"], link["b"]
        t.add_row(
            f"{a['name'] or a['node']} {a['interface']} {a['address']}",
            f"{b['name'] or b['node']} {b['interface']} {b['address']}",
            link["type"],
            "up" if link["up"] else "DOWN",
            "-" if link["rtt_s"] is None else f"{link['rtt_s'] * 1000:.2f} ms",
            rate(link["bandwidth_Bps"]),
            rate(link["a_to_b_Bps"]),
            rate(link["b_to_a_Bps"]),
            carries(state, link),
        )
    return t
