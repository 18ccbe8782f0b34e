"""Links between nodes from their interfaces, and `exo-tools linkstat`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from exo.broker.topology import links, slower
from exo.tools.cluster import LocalCluster, free_port
from tests.helpers import linkstat_json


def node(nid: str, interfaces: list[dict], usage: dict | None = None) -> dict:
    return {
        "id": nid,
        "name": nid,
        "info": {"interfaces": interfaces},
        "status": {"interface_usage": usage or {}},
    }


def itf(name: str, kind: str, *networks: str, up: bool = True) -> dict:
    return {"name": name, "type": kind, "up": up, "networks": list(networks)}


def test_links_pair_interfaces_on_a_shared_subnet_and_take_the_slower_type() -> None:
    a = node(
        "a",
        [
            itf("en0", "ethernet", "10.0.0.1/24"),
            itf("en1", "wifi", "192.168.1.10/24"),
            itf("bridge0", "thunderbolt", "169.254.5.1/16"),
        ],
        usage={"en0": {"tx_Bps": 5e6, "rx_Bps": 1e3}},
    )
    b = node(
        "b",
        [
            itf("eth0", "ethernet", "10.0.0.2/24"),
            itf("wlan0", "wifi", "192.168.1.11/24"),
            itf("tb0", "thunderbolt5", "169.254.9.9/16"),
            itf("wg0", "vpn", "100.64.0.2/32"),
        ],
        usage={"eth0": {"tx_Bps": 2e3, "rx_Bps": 4e6}},
    )
    got = {(lk["a"]["interface"], lk["b"]["interface"]): lk for lk in links([b, a])}
    assert set(got) == {("en0", "eth0"), ("en1", "wlan0"), ("bridge0", "tb0")}
    assert got[("bridge0", "tb0")]["type"] == "thunderbolt"  # the slower end
    assert got[("en1", "wlan0")]["type"] == "wifi"
    assert got[("en0", "eth0")]["a_to_b_Bps"] == 4e6 and got[("en0", "eth0")]["b_to_a_Bps"] == 1e3
    assert slower("thunderbolt5", "wifi") == "wifi"


def test_linkstat_once_json_lists_the_link_between_two_nodes(
    models_dir: Path, tmp_path: Path
) -> None:
    c = LocalCluster.on_free_ports(models_dir, nodes=2, log_dir=tmp_path)
    with c:
        time.sleep(1.5)  # one publication after both nodes' INFO
        data = linkstat_json(c)
    assert len(data["nodes"]) == 2
    lo = [
        lk for lk in data["links"] if lk["a"]["interface"] == "lo" and lk["b"]["interface"] == "lo"
    ]
    assert len(lo) == 1 and lo[0]["type"] == "loopback" and lo[0]["up"]
    assert {lo[0]["a"]["name"], lo[0]["b"]["name"]} == {"node0", "node1"}


def test_linkstat_without_a_broker_says_so() -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "exo.tools.main",
            "linkstat",
            "--pub-port",
            str(free_port()),
            "--once",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0 and "no cluster state" in r.stderr
