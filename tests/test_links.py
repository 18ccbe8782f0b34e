"""Links measured in the namespace test bed: two nodes joined by a 100 Mbit/s link
posing as WiFi and a 1 Gbit/s one posing as Ethernet."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exo.tools.netbed import iperf3
from tests.helpers import linkstat_json as linkstat
from tests.helpers import wait_until
from tests.netbed import Bed, need_root


@pytest.fixture(scope="module")
def bed(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    need_root()
    b = Bed()
    try:
        wifi, eth = b.two_hosts()
        with b.cluster(models_dir, log_dir=tmp_path_factory.mktemp("links-logs")) as c:
            yield {"bed": b, "cluster": c, "wifi": wifi, "ethernet": eth}
    finally:
        b.close()


def by_subnet(state: dict[str, Any], ip: str) -> dict[str, Any]:
    (link,) = [lk for lk in state["links"] if ip in (lk["a"]["address"], lk["b"]["address"])]
    return link


def ends(link: dict[str, Any], env: dict[str, Any], kind: str) -> tuple[str, str, str]:
    """(client host, server host, server address) for iperf3 in the probing direction."""
    a_ip, b_ip = env[kind]
    return ("a", "b", b_ip) if link["a"]["address"] == a_ip else ("b", "a", a_ip)


def test_both_links_are_measured_with_their_types_within_10_percent_of_iperf3(bed: dict) -> None:
    c = bed["cluster"]
    state = wait_until(
        lambda: (
            (s := linkstat(c))
            and len(s["links"]) == 2
            and all(lk["bandwidth_Bps"] for lk in s["links"])
            and s
        ),
        timeout=90,
    )
    for kind in ("wifi", "ethernet"):
        link = by_subnet(state, bed[kind][0])
        assert link["type"] == kind and link["up"]
        assert link["rtt_s"] is not None and 0 < link["rtt_s"] < 0.05
        client, server, ip = ends(link, bed, kind)
        reference = iperf3(bed["bed"], client, server, ip)
        assert abs(link["bandwidth_Bps"] - reference) / reference < 0.10, (kind, link, reference)


def test_live_usage_shows_on_the_busy_link_only(bed: dict) -> None:
    c = bed["cluster"]
    b: Bed = bed["bed"]
    link = by_subnet(linkstat(c), bed["wifi"][0])
    client, server, ip = ends(link, bed, "wifi")
    result: list[float] = []
    t = threading.Thread(target=lambda: result.append(iperf3(b, client, server, ip, seconds=6)))
    t.start()
    time.sleep(3)  # past TCP's ramp and the nodes' one-second rate window
    seen = linkstat(c)
    t.join()
    wifi, eth = by_subnet(seen, bed["wifi"][0]), by_subnet(seen, bed["ethernet"][0])
    busy = wifi["a_to_b_Bps"] if link["a"]["address"] == bed["wifi"][0] else wifi["b_to_a_Bps"]
    assert abs(busy - result[0]) / result[0] < 0.10, (busy, result[0])
    assert eth["a_to_b_Bps"] < 0.01 * result[0] and eth["b_to_a_Bps"] < 0.01 * result[0]


def test_a_link_set_down_is_marked_down_and_back_up(bed: dict) -> None:
    c = bed["cluster"]
    b: Bed = bed["bed"]
    ip = bed["ethernet"][0]
    b.set_link("a", ip, up=False)
    try:
        t0 = time.monotonic()
        wait_until(lambda: not by_subnet(c.cluster_state(), ip)["up"], timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        b.set_link("a", ip, up=True)
    wait_until(lambda: by_subnet(c.cluster_state(), ip)["up"], timeout=10)


def test_probe_scheduling_is_one_at_a_time_skips_busy_links_and_repeats_on_change() -> None:
    from exo.broker import probes

    def link(ip: str, up: bool = True, busy: float = 0.0) -> dict[str, Any]:
        return {
            "a": {"node": "a", "address": ip, "interface": "x"},
            "b": {"node": "b", "address": ip + "0", "interface": "y"},
            "type": "ethernet",
            "up": up,
            "a_to_b_Bps": busy,
            "b_to_a_Bps": 0.0,
        }

    one, two = link("10.0.0.1"), link("10.0.1.1")
    last: dict[str, probes.Probed] = {}
    assert probes.due([one, two], last, 100.0, in_flight=True) is None  # one at a time
    first = probes.due([one, two], last, 100.0, in_flight=False)
    assert first is not None
    last[probes.key(first)] = probes.Probed(100.0, probes.signature(first))
    assert probes.due([one, two], last, 101.0, False) is None  # rate-limited
    second = probes.due([one, two], last, 103.0, False)
    assert second is not None and second is not first
    last[probes.key(second)] = probes.Probed(103.0, probes.signature(second))
    assert probes.due([one, two], last, 110.0, False) is None  # both fresh
    changed = {**first, "type": "wifi"}  # the link changed: measure it again
    assert probes.due([changed, second], last, 110.0, False) is changed
    assert probes.due([link("10.0.2.1", busy=5e6)], {}, 0.0, False) is None  # serving first
    assert probes.due([link("10.0.3.1", up=False)], {}, 0.0, False) is None


def test_a_failed_probe_marks_the_link_and_raises_nothing_further() -> None:
    import socket

    from exo.broker import probes
    from exo.nodes.machine.prober import probe

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(OSError):
            probe("127.0.0.1", "127.0.0.1", port, timeout=1)
    lk = {
        "a": {"node": "a", "address": "10.0.0.1", "interface": "x"},
        "b": {"node": "b", "address": "10.0.0.2", "interface": "y"},
        "rtt_s": None,
        "bandwidth_Bps": None,
    }
    nodes = [{"id": "a", "status": {"probes": {probes.key(lk): {"error": "refused", "at": 1.0}}}}]
    (marked,) = probes.attach([lk], nodes)
    assert marked["probe_error"] == "refused" and marked["bandwidth_Bps"] is None


def test_stage_traffic_takes_the_best_link_and_moves_when_it_goes_down(bed: dict) -> None:
    import httpx

    c = bed["cluster"]
    b: Bed = bed["bed"]
    ids = {n["name"]: n["id"] for n in c.cluster_state()["nodes"]}
    (eth_a, eth_b), (wifi_a, wifi_b) = bed["ethernet"], bed["wifi"]
    stages = [
        {"node": ids["node0"], "layers": [0, 2]},
        {"node": ids["node1"], "layers": [2, 4]},
    ]
    r = httpx.post(f"{c.url}/v1/instances", json={"model": "test/tiny-llama", "stages": stages})
    assert r.status_code == 201, r.text
    iid = r.json()["id"]

    def routes() -> list[str]:
        (inst,) = [i for i in c.cluster_state()["instances"] if i["id"] == iid]
        if inst["state"] != "ready":
            return []
        return [inst["routes"][0]["next"], inst["routes"][1]["stage0"]]

    def serve() -> None:
        r = httpx.post(
            f"{c.url}/v1/completions",
            json={"model": "test/tiny-llama", "prompt": "Once upon", "max_tokens": 8},
            timeout=60,
        )
        assert r.status_code == 200, r.text

    def sent_to(host: str) -> int:
        (n0,) = [n for n in c.cluster_state()["nodes"] if n["id"] == ids["node0"]]
        return sum(v for e, v in n0["status"]["peer_bytes_sent"].items() if f"//{host}:" in e)

    try:
        got = wait_until(routes)
        assert f"//{eth_b}:" in got[0] and f"//{eth_a}:" in got[1]  # ethernet beats wifi
        serve()
        b.set_link("a", eth_a, up=False)
        try:
            got = wait_until(lambda: (r := routes()) and f"//{wifi_b}:" in r[0] and r, timeout=15)
            assert f"//{wifi_a}:" in got[1]
            before = sent_to(wifi_b)
            serve()  # over WiFi now
            wait_until(lambda: sent_to(wifi_b) > before, timeout=10)
        finally:
            b.set_link("a", eth_a, up=True)
        wait_until(lambda: (r := routes()) and f"//{eth_b}:" in r[0], timeout=15)
        serve()
    finally:
        httpx.delete(f"{c.url}/v1/instances/{iid}", timeout=10)
