"""Machines that find each other: the broker announces itself over mDNS and a
node started without --broker finds the broker of its own cluster, over its best
link (common/discovery.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from exo.common import discovery
from exo.common.discovery import Found, NotFound, choose, fingerprint, ranked
from tests.helpers import wait_until
from tests.netbed import Bed, need_root


def test_a_node_keeps_its_own_clusters_broker_and_says_what_else_it_saw() -> None:
    ours, theirs = fingerprint("A" * 40), fingerprint("B" * 40)
    assert ours != theirs and fingerprint(None) == "insecure"
    a = Found("lab", theirs, ["10.0.0.1"], 52416)
    b = Found("home", ours, ["10.0.0.2", "192.168.1.2"], 52416)
    assert choose([a, b], ours) is b
    assert b.endpoints() == ["tcp://10.0.0.2:52416", "tcp://192.168.1.2:52416"]
    with pytest.raises(NotFound) as e:
        choose([a], ours)
    assert "lab at 10.0.0.1" in str(e.value) and "--join" in str(e.value)
    with pytest.raises(NotFound) as e:
        choose([], ours)
    assert "no exo broker answered" in str(e.value) and "--broker" in str(e.value)


@dataclass
class Itf:
    type: str
    networks: list[str]


def test_the_best_link_to_the_broker_comes_first() -> None:
    mine = [
        Itf("wifi", ["192.168.1.5/24"]),
        Itf("ethernet", ["10.1.0.5/24"]),
        Itf("thunderbolt", ["169.254.3.5/16"]),
    ]
    broker = ["192.168.1.2", "10.1.0.2", "172.16.0.9", "169.254.3.2"]
    got = ranked(broker, mine)  # type: ignore[arg-type]  # (stand-ins)
    assert got == ["169.254.3.2", "10.1.0.2", "192.168.1.2", "172.16.0.9"]


def test_parse_takes_a_brokers_announcement_and_nothing_else() -> None:
    class Info:
        name = "vm-52416._exo._tcp.local."
        port = 52416
        properties = {b"fp": b"abc", b"pub": b"52417", b"api": b"52415", b"host": b"vm"}

        def parsed_addresses(self) -> list[str]:
            return ["10.0.0.2", "fe80::1"]

    found = discovery.parse(Info())  # type: ignore[arg-type]  # (a stand-in)
    assert found == Found("vm", "abc", ["10.0.0.2"], 52416, 52417, 52415, found.properties)
    Info.properties = {b"pub": b"1"}  # no fingerprint: not a broker's
    assert discovery.parse(Info()) is None  # type: ignore[arg-type]


def test_a_node_in_another_namespace_finds_the_broker_over_its_best_link(
    models_dir: Path, tmp_path: Path
) -> None:
    need_root()
    bed = Bed()
    try:
        wifi, eth = bed.two_hosts()
        c = bed.cluster(
            models_dir, broker_in="a", via={"b": ""}, log_dir=tmp_path, cluster_dir=tmp_path / "k"
        )
        c.node_broker[1] = ""  # node1, on host b: no --broker
        with c:

            def endpoint() -> str | None:
                for n in c.cluster_state()["nodes"]:
                    if n["name"] == "node1":
                        return (n["status"].get("broker") or {}).get("endpoint")
                return None

            # found with no address given, and dialled over the ethernet link, the
            # better of the two that reach the broker
            assert wait_until(endpoint).startswith(f"tcp://{eth[0]}:"), endpoint()
            assert wifi[0] not in str(endpoint())
    finally:
        bed.close()
