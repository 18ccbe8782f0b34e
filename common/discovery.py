"""Finding the broker on the local network: mDNS/DNS-SD (python-zeroconf).

The broker announces `_exo._tcp.local.` on every interface with an address, with
its ROUTER, PUB and API ports and its cluster's fingerprint (the first bytes of
the SHA-256 of the broker's public key, "insecure" for a cluster without keys).
`exo-node` started without `--broker` listens for BROWSE_S, keeps the brokers of
its own cluster (the fingerprint of the keys it joined with), and dials the
broker's address over its best link: an address on one of its own networks,
the interface of the better type first (broker/topology.py's ranking); the
other addresses follow, for failover (common/dealer.Session).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zeroconf import ServiceInfo

    from exo.nodes.machine.interfaces import Interface

log = logging.getLogger(__name__)

SERVICE = "_exo._tcp.local."
BROWSE_S = 3.0


def fingerprint(broker_public: str | None) -> str:
    """The cluster's name on the network: its broker key's hash (None: insecure)."""
    if broker_public is None:
        return "insecure"
    return hashlib.sha256(broker_public.encode()).hexdigest()[:16]


@dataclass
class Found:
    """A broker that answered."""

    name: str  # its instance name (the broker machine's host name)
    fingerprint: str
    addresses: list[str]  # its IP addresses
    router_port: int
    pub_port: int = 0
    api_port: int = 0
    properties: dict[str, str] = field(default_factory=dict)

    def endpoints(self) -> list[str]:
        return [f"tcp://{a}:{self.router_port}" for a in self.addresses]


def my_addresses() -> list[str]:
    """This machine's IPv4 addresses but loopback: what the broker announces."""
    import psutil

    return sorted(
        {
            a.address
            for addrs in psutil.net_if_addrs().values()
            for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")
        }
    )


class Announcer:
    """The broker's announcement, on every interface, until closed."""

    def __init__(self, print_: str, router_port: int, pub_port: int, api_port: int) -> None:
        from zeroconf import InterfaceChoice, ServiceInfo, Zeroconf

        host = socket.gethostname().split(".")[0][:48] or "exo"
        addresses = my_addresses()
        self.info = ServiceInfo(
            SERVICE,
            f"{host}-{router_port}.{SERVICE}",
            port=router_port,
            addresses=[socket.inet_aton(a) for a in addresses],
            properties={
                "fp": print_,
                "pub": str(pub_port),
                "api": str(api_port),
                "host": host,
            },
            server=f"{host}-exo.local.",
        )
        self.zc = Zeroconf(interfaces=InterfaceChoice.All)
        self.zc.register_service(self.info, allow_name_change=True)
        log.info("announced on the local network as %s (%s)", self.info.name, ", ".join(addresses))

    def close(self) -> None:
        try:
            self.zc.unregister_service(self.info)
        finally:
            self.zc.close()


def parse(info: ServiceInfo) -> Found | None:
    """A ServiceInfo as a Found, or None when it is not a broker's."""
    if info.port is None:
        return None
    props = {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode() if isinstance(v, bytes) else str(v or "")
        )
        for k, v in (info.properties or {}).items()
    }
    try:
        return Found(
            name=props.get("host") or info.name.split(".")[0],
            fingerprint=props["fp"],
            addresses=[str(a) for a in info.parsed_addresses() if ":" not in str(a)],
            router_port=int(info.port),
            pub_port=int(props.get("pub") or 0),
            api_port=int(props.get("api") or 0),
            properties=props,
        )
    except (KeyError, ValueError, TypeError):
        return None


def browse(seconds: float = BROWSE_S) -> list[Found]:
    """Every broker that answers within `seconds`."""
    import time

    from zeroconf import InterfaceChoice, ServiceBrowser, ServiceListener, Zeroconf

    names: set[str] = set()

    class Listener(ServiceListener):
        def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            names.add(name)

        def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            names.add(name)

        def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            names.discard(name)

    zc = Zeroconf(interfaces=InterfaceChoice.All)
    try:
        ServiceBrowser(zc, SERVICE, Listener())
        time.sleep(seconds)
        found = []
        for name in sorted(names):
            info = zc.get_service_info(SERVICE, name, timeout=1000)
            parsed = parse(info) if info is not None else None
            if parsed is not None and parsed.addresses:
                found.append(parsed)
        return found
    finally:
        zc.close()


def ranked(addresses: list[str], mine: list[Interface]) -> list[str]:
    """`addresses` best first: those on one of this machine's networks (`mine`:
    its interfaces, nodes/machine/interfaces.py), by the interface's type (the
    topology's ranking: Thunderbolt, Ethernet, WiFi...), then the rest."""
    from exo.broker.topology import RANK

    def score(addr: str) -> tuple[int, str]:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return (len(RANK) + 2, addr)
        for itf in mine:
            for net in itf.networks:
                try:
                    if ip in ipaddress.ip_network(net, strict=False):
                        kind = itf.type
                        return (RANK.index(kind) if kind in RANK else len(RANK), addr)
                except ValueError:
                    continue
        return (len(RANK) + 1, addr)

    return sorted(addresses, key=score)


class NotFound(Exception):
    pass


def choose(found: list[Found], print_: str) -> Found:
    """The broker of this node's cluster among those that answered; NotFound with
    what was seen (none, or only other clusters)."""
    mine = [f for f in found if f.fingerprint == print_]
    if mine:
        return mine[0]
    if not found:
        raise NotFound(
            f"no exo broker answered on the local network within {BROWSE_S:.0f} s "
            "(mDNS, _exo._tcp): start exo-broker, or give --broker tcp://HOST:52416"
        )
    seen = "; ".join(
        f"{f.name} at {', '.join(f.addresses)} (cluster {f.fingerprint})" for f in found
    )
    raise NotFound(
        f"no broker of this node's cluster (cluster {print_}) answered; seen: {seen}. "
        "Join one with --join TOKEN (exo-tools keys show on its machine) or name it "
        "with --broker"
    )
