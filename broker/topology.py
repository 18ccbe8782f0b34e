"""Links between nodes, from what each node reports: a pure function over plain data.

Two interfaces on different nodes whose addresses share a subnet make a link
candidate. A link's type is its slower end's type. Usage comes from the ends'
live interface counters (what A sends is what B receives on that link).
Measured latency and bandwidth come from the link prober (broker/probes.py).
"""

from __future__ import annotations

import ipaddress
from itertools import combinations
from typing import Any

# Best first; a link is as good as its worse end.
RANK = ["thunderbolt5", "thunderbolt", "ethernet", "wifi", "vpn", "other", "loopback"]


def slower(a: str, b: str) -> str:
    ra = RANK.index(a) if a in RANK else len(RANK)
    rb = RANK.index(b) if b in RANK else len(RANK)
    return a if ra >= rb else b


def _ends(
    node: dict[str, Any],
) -> list[tuple[dict[str, Any], ipaddress.IPv4Interface | ipaddress.IPv6Interface]]:
    out = []
    for itf in node.get("info", {}).get("interfaces", []):
        for net in itf.get("networks", []):
            try:
                iface = ipaddress.ip_interface(net)
            except ValueError:
                continue
            if iface.version == 6 and iface.ip.is_link_local:
                continue
            out.append((itf, iface))
    return out


def links(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (node, interface, address) pair that can reach each other directly."""
    found = []
    for a, b in combinations(sorted(nodes, key=lambda n: n["id"]), 2):
        sa, sb = a.get("status", {}), b.get("status", {})
        usage_a, usage_b = sa.get("interface_usage", {}), sb.get("interface_usage", {})
        # Up/down from the heartbeat (every second) over INFO's (every few seconds).
        up_a, up_b = sa.get("interfaces_up", {}), sb.get("interfaces_up", {})
        peer_a, peer_b = sa.get("peer_usage", {}), sb.get("peer_usage", {})
        a_ends, b_ends = _ends(a), _ends(b)
        # Loopback joins two nodes only on one host (and network namespace): when they
        # share an address. Namespaces on one machine each have their own 127.0.0.1.
        same_host = bool(
            {x.ip for _, x in a_ends if not x.ip.is_loopback}
            & {x.ip for _, x in b_ends if not x.ip.is_loopback}
        )
        for ia, na in a_ends:
            for ib, nb in b_ends:
                if na.network != nb.network or na.ip == nb.ip and not na.ip.is_loopback:
                    continue
                if na.ip.is_loopback and not same_host:
                    continue
                ua, ub = usage_a.get(ia["name"], {}), usage_b.get(ib["name"], {})
                found.append(
                    {
                        "a": {
                            "node": a["id"],
                            "name": a.get("name", ""),
                            "interface": ia["name"],
                            "address": str(na.ip),
                            # where its type came from: detected, alias, override file
                            "source": ia.get("source", "detected"),
                        },
                        "b": {
                            "node": b["id"],
                            "name": b.get("name", ""),
                            "interface": ib["name"],
                            "address": str(nb.ip),
                            "source": ib.get("source", "detected"),
                        },
                        "type": slower(ia.get("type", "other"), ib.get("type", "other")),
                        "up": bool(up_a.get(ia["name"], ia.get("up")))
                        and bool(up_b.get(ib["name"], ib.get("up"))),
                        # each end's interface counters: an upper bound on this link's share
                        "a_to_b_Bps": min(ua.get("tx_Bps", 0.0), ub.get("rx_Bps", 0.0)),
                        "b_to_a_Bps": min(ub.get("tx_Bps", 0.0), ua.get("rx_Bps", 0.0)),
                        # counted on the nodes' own peer sockets (pipeline traffic)
                        "a_to_b_peer_Bps": peer_a.get(str(nb.ip), {}).get("tx_Bps", 0.0),
                        "b_to_a_peer_Bps": peer_b.get(str(na.ip), {}).get("tx_Bps", 0.0),
                        "rtt_s": None,
                        "bandwidth_Bps": None,
                    }
                )
    return found


def peer_host(src: dict[str, Any], dst: dict[str, Any], found: list[dict[str, Any]]) -> str:
    """The address `src` should use to reach `dst`'s peer socket: over the best link
    between them that is up (`found`, as links() gives them, with measurements where
    the prober has them): loopback on one host, else by type, then by measured
    bandwidth; with no link known, any address `dst` has."""
    best: tuple[int, float, str] | None = None
    for link in found:
        ends = {link["a"]["node"]: link["a"], link["b"]["node"]: link["b"]}
        if set(ends) != {src["id"], dst["id"]} or not link["up"]:
            continue
        kind = link["type"]
        rank = -1 if kind == "loopback" else RANK.index(kind) if kind in RANK else len(RANK)
        score = (rank, -float(link.get("bandwidth_Bps") or 0.0), ends[dst["id"]]["address"])
        if best is None or score < best:
            best = score
    if best is not None:
        return best[2]
    ips = {x.ip for _, x in _ends(dst) if not x.ip.is_loopback}
    v4 = sorted(str(ip) for ip in ips if ip.version == 4)
    return v4[0] if v4 else "127.0.0.1"
