"""bench links: the prober's figures next to iperf3 and ping, in the namespace test bed.

Two namespaces joined by a 100 Mbit/s link (tagged wifi) and a 1 Gbit/s link
(tagged ethernet), a node in each, the broker outside; the broker re-probes
every few seconds so several probes per link are collected, and iperf3 / ping
run on the same links between probes.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from exo.tools.bench import machine
from exo.tools.cluster import LocalCluster, api_headers
from exo.tools.netbed import Bed, iperf3, ping


def run(models_dir: Path, rounds: int) -> dict[str, Any]:
    bed = Bed()
    try:
        wifi, eth = bed.two_hosts()
        subnets = {"wifi 100mbit": wifi, "ethernet 1gbit": eth}
        with bed.cluster(models_dir, log_spec="warning", broker_args=["--probe-every", "4"]) as c:
            return _measure(c, bed, subnets, rounds)
    finally:
        bed.close()


def _measure(
    c: LocalCluster, bed: Bed, subnets: dict[str, tuple[str, str]], rounds: int
) -> dict[str, Any]:
    seen: dict[str, list[dict[str, Any]]] = {name: [] for name in subnets}
    ref_bw: dict[str, list[float]] = {name: [] for name in subnets}
    ref_rtt: dict[str, float] = {}
    deadline = time.monotonic() + 60 + 15 * rounds
    while min(len(v) for v in seen.values()) < rounds and time.monotonic() < deadline:
        state = httpx.get(f"{c.url}/v1/cluster", headers=api_headers(), timeout=10).json()
        for name, (a_ip, b_ip) in subnets.items():
            for link in state["links"]:
                if {link["a"]["address"], link["b"]["address"]} != {a_ip, b_ip}:
                    continue
                got = seen[name]
                if link.get("bandwidth_Bps") and (not got or got[-1]["at"] != link["probed_at"]):
                    got.append(
                        {
                            "at": link["probed_at"],
                            "bw": link["bandwidth_Bps"],
                            "rtt": link["rtt_s"],
                            "probe_s": link.get("probe_s"),
                            "a": link["a"],
                        }
                    )
        time.sleep(0.5)
    cpu = {
        n["name"]: n["status"].get("probe_cpu_s", 0.0)
        for n in httpx.get(f"{c.url}/v1/cluster", headers=api_headers(), timeout=10).json()["nodes"]
    }
    probes_run = sum(len(v) for v in seen.values())
    out: dict[str, Any] = {"bench": "links", "machine": machine(), "rounds": rounds, "links": {}}
    for name, (a_ip, b_ip) in subnets.items():
        got = seen[name]
        if not got:
            out["links"][name] = {"error": "never measured"}
            continue
        client, server, dst = (
            ("a", "b", b_ip) if got[0]["a"]["address"] == a_ip else ("b", "a", a_ip)
        )
        for _ in range(min(rounds, 3)):
            ref_bw[name].append(iperf3(bed, client, server, dst))
        ref_rtt[name] = ping(bed, client, dst)
        bw = statistics.median(x["bw"] for x in got)
        iperf = statistics.median(ref_bw[name])
        out["links"][name] = {
            "probes": len(got),
            "bandwidth_Bps": bw,
            "iperf3_Bps": iperf,
            "bandwidth_ratio": bw / iperf,
            "rtt_s": statistics.median(x["rtt"] for x in got),
            "ping_s": ref_rtt[name],
            "probe_s": statistics.median(x["probe_s"] or 0 for x in got),
        }
    total_cpu = sum(cpu.values())
    per_probe = total_cpu / max(1, probes_run)
    out["cpu_s_per_probe"] = per_probe
    # At the default schedule each link is measured once every 300 s.
    out["cpu_s_per_minute_default"] = per_probe * len(subnets) / 5
    return out


def report(res: dict[str, Any]) -> None:
    print(f"links: namespace test bed, median over {res['rounds']} probes per link")
    print(f"machine: {res['machine']}")
    print(
        f"{'link':16}{'probes':>7}{'exo Mbit/s':>12}{'iperf3':>10}{'ratio':>8}"
        f"{'exo RTT ms':>12}{'ping ms':>9}{'probe s':>9}"
    )
    for name, r in res["links"].items():
        if "error" in r:
            print(f"{name:16} {r['error']}")
            continue
        print(
            f"{name:16}{r['probes']:7d}{r['bandwidth_Bps'] * 8e-6:12.1f}{r['iperf3_Bps'] * 8e-6:10.1f}"
            f"{r['bandwidth_ratio']:8.3f}{r['rtt_s'] * 1e3:12.3f}{r['ping_s'] * 1e3:9.3f}{r['probe_s']:9.2f}"
        )
    print(
        f"CPU per probe (both ends): {res['cpu_s_per_probe']:.3f} s; per minute at the default "
        f"schedule (each link every 300 s): {res['cpu_s_per_minute_default']:.4f} s"
    )
