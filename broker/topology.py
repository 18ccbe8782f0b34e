"""Links between nodes, from what each node reports: a pure function over plain data.

Two interfaces on different nodes whose addresses share a subnet make a link
candidate. A link's type is its slower end's type. Usage comes from the ends'
live interface counters (what A sends is what B receives on that link).
Measured latency and bandwidth (the link prober) are not in yet.
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
        usage_a = a.get("status", {}).get("interface_usage", {})
        usage_b = b.get("status", {}).get("interface_usage", {})
        for ia, na in _ends(a):
            for ib, nb in _ends(b):
                if na.network != nb.network or na.ip == nb.ip and not na.ip.is_loopback:
                    continue
                ua, ub = usage_a.get(ia["name"], {}), usage_b.get(ib["name"], {})
                found.append(
                    {
                        "a": {
                            "node": a["id"],
                            "name": a.get("name", ""),
                            "interface": ia["name"],
                            "address": str(na.ip),
                        },
                        "b": {
                            "node": b["id"],
                            "name": b.get("name", ""),
                            "interface": ib["name"],
                            "address": str(nb.ip),
                        },
                        "type": slower(ia.get("type", "other"), ib.get("type", "other")),
                        "up": bool(ia.get("up")) and bool(ib.get("up")),
                        # each end's interface counters: an upper bound on this link's share
                        "a_to_b_Bps": min(ua.get("tx_Bps", 0.0), ub.get("rx_Bps", 0.0)),
                        "b_to_a_Bps": min(ub.get("tx_Bps", 0.0), ua.get("rx_Bps", 0.0)),
                        "rtt_s": None,
                        "bandwidth_Bps": None,
                    }
                )
    return found
