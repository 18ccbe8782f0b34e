"""The multi-host test bed (tests and `bench links`): network namespaces joined by veth pairs, as root.

Each host is a namespace with a management veth to the root namespace (where
the broker runs) and data links to other hosts, each with its own subnet, an
alias giving its type (`linktype=...`) and optionally an htb rate.
"""

from __future__ import annotations

import itertools
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exo.tools.cluster import LocalCluster


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


_MGMT = itertools.count()


@dataclass
class Bed:
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:5])
    hosts: list[str] = field(default_factory=list)
    mgmt: dict[str, str] = field(default_factory=dict)  # host -> broker address seen from it
    inner: dict[str, str] = field(default_factory=dict)  # host -> its own management address
    links: int = 0

    def ns(self, host: str) -> str:
        return f"exo{self.tag}{host}"

    def add_host(self, host: str) -> str:
        # Management subnets live in the root namespace: unique across beds alive
        # at once (a test's own bed beside a module's).
        i = next(_MGMT) % 250 + 1
        ns = self.ns(host)
        sh("ip", "netns", "add", ns)
        self.hosts.append(host)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        outer, inner = f"m{self.tag}{i}", f"mi{self.tag}{i}"
        sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        sh("ip", "link", "set", inner, "netns", ns)
        sh("ip", "addr", "add", f"10.231.{i}.1/30", "dev", outer)
        sh("ip", "link", "set", outer, "up")
        sh("ip", "-n", ns, "addr", "add", f"10.231.{i}.2/30", "dev", inner)
        sh("ip", "-n", ns, "link", "set", inner, "up")
        self.mgmt[host] = f"10.231.{i}.1"
        self.inner[host] = f"10.231.{i}.2"
        return ns

    def link(self, a: str, b: str, kind: str, rate: str | None = None) -> tuple[str, str]:
        """A veth between hosts a and b on subnet 10.232.N.0/24; returns (a's, b's) address."""
        self.links += 1
        n = self.links
        ia, ib = f"d{self.tag}{n}a", f"d{self.tag}{n}b"
        sh(
            "ip",
            "link",
            "add",
            ia,
            "netns",
            self.ns(a),
            "type",
            "veth",
            "peer",
            "name",
            ib,
            "netns",
            self.ns(b),
        )
        for host, dev, ip in ((a, ia, f"10.232.{n}.1"), (b, ib, f"10.232.{n}.2")):
            ns = self.ns(host)
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", "dev", dev, "alias", f"linktype={kind}")
            sh("ip", "-n", ns, "link", "set", dev, "up")
            if rate:
                sh(
                    "tc",
                    "-n",
                    ns,
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "handle",
                    "1:",
                    "htb",
                    "default",
                    "1",
                )
                sh(
                    "tc",
                    "-n",
                    ns,
                    "class",
                    "add",
                    "dev",
                    dev,
                    "parent",
                    "1:",
                    "classid",
                    "1:1",
                    "htb",
                    "rate",
                    rate,
                )
        return f"10.232.{n}.1", f"10.232.{n}.2"

    def two_hosts(self) -> tuple[tuple[str, str], tuple[str, str]]:
        """Hosts a and b, joined by a 100 Mbit/s link tagged wifi and a 1 Gbit/s one
        tagged ethernet (the tests' and benches' usual pair) -> their (a's, b's)
        addresses: (wifi, ethernet)."""
        self.add_host("a")
        self.add_host("b")
        wifi = self.link("a", "b", "wifi", rate="100mbit")
        return wifi, self.link("a", "b", "ethernet", rate="1gbit")

    def set_link(self, host: str, ip: str, up: bool) -> None:
        """Set the interface holding `ip` in `host` up or down."""
        dev = subprocess.run(
            [*self.prefix(host), "ip", "-o", "-4", "addr", "show", "to", ip],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[1]
        sh(*self.prefix(host), "ip", "link", "set", dev, "up" if up else "down")

    def prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host)]

    def cluster(
        self,
        models_dir: Path,
        broker_in: str | None = None,
        via: dict[str, str] | None = None,
        **kw: Any,
    ) -> LocalCluster:
        """One node in each host, in order, and the broker: in the root namespace,
        each node reaching it over its host's management veth; or with `broker_in`
        on that host, its API on the host's management address, its own node on
        loopback and each other node over the address `via` gives for its host (a
        data link's: a cable to pull)."""
        c = LocalCluster.on_free_ports(
            models_dir,
            nodes=len(self.hosts),
            broker_host="0.0.0.0",
            node_prefix={i: self.prefix(h) for i, h in enumerate(self.hosts)},
            **kw,
        )
        c.node_broker = {
            i: f"tcp://{self.mgmt[h]}:{c.router_port}" for i, h in enumerate(self.hosts)
        }
        if broker_in is not None:
            c.broker_prefix = self.prefix(broker_in)
            c.api_host = self.inner[broker_in]
            for i, h in enumerate(self.hosts):
                ip = "127.0.0.1" if h == broker_in else (via or {})[h]
                c.node_broker[i] = f"tcp://{ip}:{c.router_port}"
        return c

    def close(self) -> None:
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", self.ns(host)], capture_output=True)
        self.hosts.clear()


def iperf3(bed: Bed, client: str, server: str, server_ip: str, seconds: float = 2.0) -> float:
    """Receiver-side TCP goodput from `client` to `server_ip` (in `server`), bytes/s."""
    import json
    import time

    srv = subprocess.Popen(
        [*bed.prefix(server), "iperf3", "-s", "-1", "-B", server_ip, "-p", "5299"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):
            out = subprocess.run(
                [
                    *bed.prefix(client),
                    "iperf3",
                    "-c",
                    server_ip,
                    "-p",
                    "5299",
                    "-J",
                    "-t",
                    str(seconds),
                ],
                capture_output=True,
                text=True,
            )
            try:
                got = json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]
                return float(got) / 8
            except (ValueError, KeyError):
                time.sleep(0.1)  # the server is not listening yet
        raise RuntimeError(f"iperf3 failed: {out.stdout[-300:]} {out.stderr[-300:]}")
    finally:
        srv.kill()
        srv.wait()


def ping(bed: Bed, client: str, ip: str, count: int = 10) -> float:
    """Smallest ping round trip to `ip` from `client`, in seconds."""
    out = subprocess.run(
        [*bed.prefix(client), "ping", "-c", str(count), "-i", "0.05", "-q", ip],
        capture_output=True,
        text=True,
        check=True,
    )
    # rtt min/avg/max/mdev = 0.031/0.040/0.052/0.006 ms
    line = [x for x in out.stdout.splitlines() if "min/avg" in x][0]
    return float(line.split("=")[1].split("/")[0]) / 1000
