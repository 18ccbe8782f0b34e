"""The multi-host test bed: network namespaces joined by veth pairs, as root.

Each host is a namespace with a management veth to the root namespace (where
the broker runs) and data links to other hosts, each with its own subnet, an
alias giving its type (`linktype=...`) and optionally an htb rate.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass, field

import pytest


def need_root() -> None:
    """Skip without root, but never when CI is set: there the test must run."""
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("needs root for network namespaces")


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@dataclass
class Bed:
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:5])
    hosts: list[str] = field(default_factory=list)
    mgmt: dict[str, str] = field(default_factory=dict)  # host -> broker address seen from it
    links: int = 0

    def ns(self, host: str) -> str:
        return f"exo{self.tag}{host}"

    def add_host(self, host: str) -> str:
        i = len(self.hosts) + 1
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

    def prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host)]

    def close(self) -> None:
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", self.ns(host)], capture_output=True)
        self.hosts.clear()
