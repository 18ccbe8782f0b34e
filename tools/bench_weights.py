"""bench weights: a model's weights copied node to node, next to iperf3 on the link.

Two namespaces joined by one 1 Gbit/s link (htb, tagged ethernet), a node in
each with its own models folder, the broker outside. Node a holds the model;
`POST /v1/models/pull` asks node b for it, and the broker names a's weights
server (token-authenticated HTTP, not CURVE) as its source over the link. The
copy's rate is the node's own download rate while bytes flow (median of its
progress readings) and the whole pull's (the bytes over the time from the ask
until b lists the model: listing, verifying the sha256 manifest and renaming
included); iperf3 runs on the same link, same direction, after. Target (#20):
the copy at least 0.9x of the link.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from exo.tools.bench import machine
from exo.tools.cluster import api_headers
from exo.tools.netbed import Bed, iperf3


def run(models_dir: Path, model: str, model_path: Path) -> dict[str, Any]:
    size = sum(p.stat().st_size for p in model_path.iterdir() if p.is_file())
    bed = Bed()
    empty = Path(tempfile.mkdtemp(prefix="exo-bench-weights-"))
    try:
        bed.add_host("a")
        bed.add_host("b")
        a_ip, b_ip = bed.link("a", "b", "ethernet", rate="1gbit")
        with bed.cluster(
            models_dir, log_spec="warning", node_extra={1: ["--models-dir", str(empty)]}
        ) as c:
            url, auth = c.url, api_headers()
            t0 = time.monotonic()
            r = httpx.post(
                f"{url}/v1/models/pull", json={"model": model, "node": "node1"}, headers=auth
            )
            r.raise_for_status()
            rates: list[float] = []
            while True:
                nodes = httpx.get(f"{url}/v1/cluster", headers=auth, timeout=10).json()["nodes"]
                (b,) = [n for n in nodes if n["name"] == "node1"]
                if model in b["info"].get("models", []):
                    break
                for d in b["status"].get("downloads", []):
                    if d.get("model") == model and d.get("state") == "failed":
                        raise RuntimeError(f"the copy failed: {d.get('error')}")
                    if d.get("model") == model and d.get("rate"):
                        rates.append(float(d["rate"]))
                if time.monotonic() - t0 > 600:
                    raise RuntimeError("the copy did not finish in 10 minutes")
                time.sleep(0.2)
            whole_s = time.monotonic() - t0
        link = statistics.median(iperf3(bed, "a", "b", b_ip, seconds=3.0) for _ in range(3))
    finally:
        bed.close()
    copy = statistics.median(rates) if rates else size / whole_s
    return {
        "bench": "weights",
        "machine": machine(),
        "model": model,
        "bytes": size,
        "link": "1gbit ethernet",
        "iperf3_Bps": link,
        "copy_Bps": copy,
        "pull_Bps": size / whole_s,
        "pull_s": whole_s,
        "copy_ratio": copy / link,
        "pull_ratio": size / whole_s / link,
        "source": a_ip,
    }


def report(res: dict[str, Any]) -> None:
    mb = 1e6
    print(f"{res['model']}: {res['bytes'] / mb:.0f} MB over {res['link']}")
    print(f"  iperf3            {res['iperf3_Bps'] / mb:8.1f} MB/s")
    print(f"  copy (bytes flow) {res['copy_Bps'] / mb:8.1f} MB/s   x{res['copy_ratio']:.3f}")
    print(
        f"  whole pull        {res['pull_Bps'] / mb:8.1f} MB/s   x{res['pull_ratio']:.3f}"
        f"   ({res['pull_s']:.1f} s: listing, sha256, rename included)"
    )
